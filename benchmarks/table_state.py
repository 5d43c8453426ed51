"""Benching a plan in its table's state, for bench_prediction and bench_runtimes.

A bench in another state of the machine than the table's moves a deep plan's speed-up, so these benches can
judge the original's rounds against the table's quiet level (its ``anchor_quiet_ms``, as ``compress``'s closed
loop does) and take their figures from the rounds that met it (docs/latency.md).
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

from dpcompress.latency.bench import BenchResult, bench_modules


def met_table_state(result: BenchResult, level_ms: Optional[float]) -> bool:
    """Whether a bench judged against a table's quiet level took its figures from rounds that met it."""
    return level_ms is None or result.quiet_level_ms == level_ms


def bench_in_table_state(backend: Any, model: Any, merged: Any, level_ms: Optional[float], tries: int,
                         **bench_args: Any) -> Tuple[BenchResult, List[BenchResult]]:
    """``bench_modules`` with the original's rounds judged against ``level_ms`` (a table's ``anchor_quiet_ms``;
    None: its own), run again, up to ``tries`` times in all, while a bench meets no round in that state.
    Returns the last bench and those run before it."""
    missed: List[BenchResult] = []
    while True:
        result = bench_modules(backend, model, merged, quiet_level_ms=level_ms, **bench_args)
        if met_table_state(result, level_ms) or len(missed) + 1 >= tries:
            return result, missed
        missed.append(result)
