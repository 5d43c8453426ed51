"""dpcompress: latency-aware CNN depth compression via two-stage dynamic programming.

The Python API (each function documented in :mod:`dpcompress.api`)::

    chain  = dpcompress.trace(model, input_shape, submodule=None)
    table  = dpcompress.profile(model, input_shape, backend="onnxruntime", out=None)
    plan   = dpcompress.solve(table, importance=None, budget_ms=None, budget_ratio=None, chain=None)
    merged = dpcompress.merge(model, plan, input_shape, submodule=None)
    result = dpcompress.compress(model, input_shape, budget_ratio=0.7, data=None, submodule=None)

Errors a user can cause are :class:`UserError`, with a one-line message.
"""

__version__ = "0.1.0"

from dpcompress.api import compress, merge, profile, solve, trace  # noqa: E402  (after __version__: cli reads it)
from dpcompress.errors import UserError  # noqa: E402

__all__ = ["__version__", "compress", "merge", "profile", "solve", "trace", "UserError"]
