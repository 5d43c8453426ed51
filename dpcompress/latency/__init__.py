"""Latency: profiling blocks on a backend into tables, timing statistics, and benches."""
