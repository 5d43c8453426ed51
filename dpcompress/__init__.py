"""dpcompress: latency-aware CNN depth compression via two-stage dynamic programming."""

__version__ = "0.1.0"
