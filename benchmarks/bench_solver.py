"""Solver speed and memory on synthetic latency/importance tables (numpy only, no model).

    .venv/bin/python benchmarks/bench_solver.py [--repeats 5] [--sizes 100,300,1000]
        [--latency-table LAT.csv --importance IMP.csv [--name NAME]]
    .venv/bin/python benchmarks/bench_solver.py --quick   # one run of each, scaling at L=100 only

Instances:
- ``mobilenet_v2-sized``: L=50 convs, ~170 valid blocks (spans up to 4 convs, a few
  missing), ~300 importance segments (spans up to 6 convs).
- ``scaling L=N``: every block spanning up to 40 convs is valid except a random 20%
  of the multi-conv ones; importance segments span up to 40 convs (``table``) or are
  every pair stage 1 can cover (``uniform``).
- ``mobilenet_v2-sized, table, pruning``: the first with LayerMerge's pruning options. Every
  4th conv is reducible; each block gets one option per non-empty subset of its reducible
  convs, and the importance table one row per segment and pruned set that its splits reach
  (``pruned_sets``).
- ``mobilenet_v2 blocks, pruning <= N``: the blocks of the shipped ONNX Runtime table of
  mobilenet_v2 (456, spans up to 40 convs, since edde401 dropped those over the merge memory
  limit; 578 up to 52 before), its 13 reducible convs (the stride-1 depthwise ones) and 34
  activations. Each block gets one option per number of pruned convs (a random subset; profiling
  keeps one subset per merged geometry), and the importance table has every segment and every
  pruned set of at most N convs that its splits reach.
- ``--latency-table``/``--importance``: real tables, e.g. mobilenet_v2's from ``dpcompress profile
  --prune`` and ``dpcompress importance --method uniform --prune`` (made once, outside the bench:
  profiling takes minutes), benchmarked first.
The blocks column counts the latency rows with their options (and, where there are options, how
many blocks have one); segments, the (segment, pruned set) pairs that stage 2 chooses from, and of
how many importance rows where pruning drops the dominated ones.

"segments ms" is building the segments from the importance table, which includes stage 1 for
each pruned segment. Each instance is solved at a budget of 70% of the original latency (budget-pruned
DP, what ``dpcompress solve`` runs) and, separately, for the whole frontier. Time is
the median of ``--repeats`` runs of stage 1 + stage 2 in-process (solve@70%: with the fastest and
slowest run, and the 1-minute load average when the instance began: the machine may be shared);
memory is the tracemalloc peak of one run (numpy allocations included).
"""

from __future__ import annotations

import itertools
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import common
import numpy as np

from dpcompress.search.solver import (
    build_segments,
    pruned_sets,
    run_stage1,
    solve,
    stage2_frontier,
)
from dpcompress.tables import (
    ImportanceTable,
    LatencyTable,
    read_importance_table,
    read_latency_table,
    write_importance_table,
    write_latency_table,
)

Block = Tuple[int, int]
QUICK = {"repeats": 1, "sizes": "100"}
HEAD = ["instance", "L", "blocks", "segments", "stage 1 ms", "segments ms", "solve@70% ms (min-max)", "solve MiB",
        "whole frontier ms", "frontier MiB", "frontier points", "load"]


def synthetic_tables(L: int, max_block_span: int, max_segment_span: Optional[int], missing: float,
                     seed: int) -> Tuple[LatencyTable, Optional[ImportanceTable]]:
    rng = np.random.default_rng(seed)
    conv_ms = rng.uniform(0.05, 0.5, size=L + 1)
    prefix = np.concatenate(([0.0], np.cumsum(conv_ms[1:])))
    latency: Dict[Block, float] = {}
    for i in range(L):
        for j in range(i + 1, min(L, i + max_block_span) + 1):
            if j > i + 1 and rng.random() < missing:
                continue
            # A merged block costs somewhere around the convs it replaces, sometimes more.
            latency[(i, j)] = float((prefix[j] - prefix[i]) * rng.uniform(0.45, 1.2))
    table = LatencyTable(L, latency, source=f"synthetic L={L}")
    if max_segment_span is None:
        return table, None
    importance = {}
    for i in range(L):
        for j in range(i + 1, min(L, i + max_segment_span) + 1):
            # Longer segments (more activations removed) tend to lose more accuracy.
            importance[(i, j)] = float(-0.02 * (j - i - 1) ** 1.5 + rng.normal(0, 0.05))
    return table, ImportanceTable(importance, source=f"synthetic L={L}")


def with_pruning(table: LatencyTable, importance: ImportanceTable, seed: int,
                 reducible_every: int = 4) -> Tuple[LatencyTable, ImportanceTable]:
    """The tables with pruning options: each pruned conv takes a random share of its block's time
    away, and a random bit of its segment's importance."""
    rng = np.random.default_rng(seed)
    reducible = range(2, table.num_positions + 1, reducible_every)
    pruned_latency = {}
    for (start, end), latency in table.latency_ms.items():
        inside = [p for p in reducible if start < p <= end]
        for size in range(1, len(inside) + 1):
            for pruned in itertools.combinations(inside, size):
                kept = (end - start - size) / (end - start)
                pruned_latency[(start, end, pruned)] = float(latency * kept * rng.uniform(0.8, 1.1))
    with_options = LatencyTable(table.num_positions, table.latency_ms, source=table.source,
                                pruned_latency_ms=pruned_latency)
    pruned_importance = {(start, end, pruned): float(value - rng.uniform(0.0, 0.1) * len(pruned))
                         for (start, end), value in importance.importance.items()
                         for pruned in pruned_sets(with_options, start, end) if pruned}
    return with_options, ImportanceTable(importance.importance, source=importance.source,
                                         pruned_importance=pruned_importance)


MOBILENET_V2_TABLE = Path(__file__).resolve().parents[1] / "latency_tables" / "cpu_onnxruntime" / "mobilenet_v2.csv"
MOBILENET_V2_REDUCIBLE = (2, 8, 14, 17, 23, 26, 29, 32, 35, 38, 44, 47, 50)
MOBILENET_V2_PROJECTIONS = (3, *range(6, 52, 3))  # the 1x1 convs without an activation


def mobilenet_v2_with_pruning(max_pruned: Sequence[int], seed: int = 0
                              ) -> List[Tuple[int, LatencyTable, ImportanceTable]]:
    """The shipped mobilenet_v2 table with pruning options, and importance tables allowing segments
    with at most each of ``max_pruned`` convs pruned."""
    rng = np.random.default_rng(seed)
    table = read_latency_table(MOBILENET_V2_TABLE)
    L = table.num_positions
    pruned_latency = {}
    for (start, end), latency in table.latency_ms.items():
        inside = [p for p in MOBILENET_V2_REDUCIBLE if start < p <= end]
        for size in range(1, len(inside) + 1):
            pruned = tuple(sorted(int(p) for p in rng.choice(inside, size, replace=False)))
            pruned_latency[(start, end, pruned)] = float(latency * (end - start - size) / (end - start)
                                                         * rng.uniform(0.8, 1.1))
    table = LatencyTable(L, table.latency_ms, meta=table.meta, source=table.source, pruned_latency_ms=pruned_latency)
    ends = [0, *(p for p in range(1, L) if p not in MOBILENET_V2_PROJECTIONS), L]
    s1 = run_stage1(table)
    importance, pruned_importance = {}, {}
    for start, end in itertools.combinations(ends, 2):
        if not np.isfinite(s1.topt[start, end]):
            continue
        importance[(start, end)] = float(-0.02 * (end - start) + rng.normal(0, 0.05))
        for pruned in pruned_sets(table, start, end):
            if 0 < len(pruned) <= max(max_pruned):
                cost = 0.05 * len(pruned) * rng.uniform(0.5, 1.5)
                pruned_importance[(start, end, pruned)] = importance[(start, end)] - cost
    return [(most, table, ImportanceTable(importance, source=table.source,
                                          pruned_importance={k: v for k, v in pruned_importance.items()
                                                             if len(k[2]) <= most}))
            for most in max_pruned]


def measure(func: Callable[[], object], repeats: int) -> Tuple[List[float], float]:
    """Seconds of each of ``repeats`` runs and the tracemalloc peak (MiB) of one more."""
    func()  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        func()
        times.append(time.perf_counter() - began)
    tracemalloc.start()
    func()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return times, peak / 2**20


def ms(times: Sequence[float]) -> str:
    return f"{statistics.median(times) * 1e3:.1f}"


def bench_instance(name: str, table: LatencyTable, importance: Optional[ImportanceTable], repeats: int,
                   rows: common.Table) -> Dict[str, Any]:
    """Time and measure one instance; print its row and return its figures."""
    load = common.load_average()[0]
    budget = 0.7 * table.original_latency_ms()
    s1 = run_stage1(table)
    segments = build_segments(s1, importance, table)
    frontier_size = len(stage2_frontier(segments))
    t_budget, mem_budget = measure(lambda: solve(table, importance, budget), repeats)
    t_stage1, _ = measure(lambda: run_stage1(table), repeats)
    t_segments, _ = measure(lambda: build_segments(s1, importance, table), repeats)

    def whole_frontier() -> object:
        first = run_stage1(table)
        return stage2_frontier(build_segments(first, importance, table))

    t_frontier, mem_frontier = measure(whole_frontier, repeats)
    importance_rows = "" if importance is None or not importance.pruned_importance else \
        f" of {len(importance.importance) + len(importance.pruned_importance)}"
    with_options = "" if not table.pruned_latency_ms else \
        f" ({len({(start, end) for start, end, _ in table.pruned_latency_ms})} with options)"
    rows.row([name, table.num_positions, f"{len(table.latency_ms) + len(table.pruned_latency_ms)}{with_options}",
              f"{segments.count()}{importance_rows}", ms(t_stage1), ms(t_segments),
              f"{ms(t_budget)} ({min(t_budget) * 1e3:.1f}-{max(t_budget) * 1e3:.1f})", f"{mem_budget:.1f}",
              ms(t_frontier), f"{mem_frontier:.1f}", frontier_size, f"{load:.1f}"])
    return {"instance": name, "L": table.num_positions, "blocks": len(table.latency_ms) + len(table.pruned_latency_ms),
            "segments": segments.count(), "stage1_s": t_stage1, "segments_s": t_segments, "solve_s": t_budget,
            "solve_mib": mem_budget, "frontier_s": t_frontier, "frontier_mib": mem_frontier,
            "frontier_points": frontier_size, "load": load}


def bench_cli(repeats: int) -> Dict[str, Any]:
    """Wall time of the whole `dpcompress solve` command in a fresh interpreter."""
    table, importance = synthetic_tables(50, 4, 6, 0.1, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        lat_csv, imp_csv = Path(tmp, "lat.csv"), Path(tmp, "imp.csv")
        write_latency_table(lat_csv, [{"start": i, "end": j, "latency_ms": v}
                                      for (i, j), v in sorted(table.latency_ms.items())])
        assert importance is not None
        write_importance_table(imp_csv, [{"start": i, "end": j, "importance": v}
                                         for (i, j), v in sorted(importance.importance.items())])
        command = [sys.executable, "-m", "dpcompress.cli", "solve", "--latency-table", str(lat_csv),
                   "--importance", str(imp_csv), "--budget-ratio", "0.7", "--out", str(Path(tmp, "plan.json"))]
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            times.append(time.perf_counter() - began)
    print(f"\n`dpcompress solve` (L=50 tables, fresh interpreter, {repeats} runs): "
          f"median {statistics.median(times) * 1e3:.0f} ms, min {min(times) * 1e3:.0f} ms, "
          f"max {max(times) * 1e3:.0f} ms")
    return {"instance": "dpcompress solve, fresh interpreter", "L": 50, "solve_s": times}


def main() -> None:
    parser = common.parser(__doc__, "bench_solver")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="100,300,1000", help="scaling instances' L, comma-separated ('' for none)")
    parser.add_argument("--latency-table", type=Path, help="a real latency table to benchmark first")
    parser.add_argument("--importance", type=Path, help="its importance table (with --latency-table)")
    parser.add_argument("--name", default="table", help="the real tables' row name")
    parser.add_argument("--skip-uniform-above", type=int, default=1000,
                        help="skip the uniform-importance runs for larger L")
    args = common.parse(parser, QUICK)
    if (args.latency_table is None) != (args.importance is None):
        parser.error("give --latency-table and --importance together")
    record = common.Record(args)
    rows = common.Table(HEAD)
    results: List[Dict[str, Any]] = []

    def bench(name: str, table: LatencyTable, importance: Optional[ImportanceTable], repeats: int) -> None:
        results.append(bench_instance(name, table, importance, repeats, rows))
        record.write(results)

    seed = args.seed
    if args.latency_table is not None:
        bench(args.name, read_latency_table(args.latency_table), read_importance_table(args.importance), args.repeats)
    bench("mobilenet_v2-sized, table", *synthetic_tables(50, 4, 6, 0.1, seed=seed), args.repeats)
    table, _ = synthetic_tables(50, 4, None, 0.1, seed=seed)
    bench("mobilenet_v2-sized, uniform", table, None, args.repeats)
    table, importance = synthetic_tables(50, 4, 6, 0.1, seed=seed)
    assert importance is not None
    bench("mobilenet_v2-sized, table, pruning", *with_pruning(table, importance, seed=seed), args.repeats)
    for most, table, importance in mobilenet_v2_with_pruning((1, 2), seed=seed):
        bench(f"mobilenet_v2 blocks, pruning <= {most}", table, importance, args.repeats)
    for size in (int(s) for s in args.sizes.split(",") if s):
        repeats = args.repeats if size <= 300 else 1
        bench("scaling, table", *synthetic_tables(size, 40, 40, 0.2, seed=seed + size), repeats)
        if size <= args.skip_uniform_above:
            table, _ = synthetic_tables(size, 40, None, 0.2, seed=seed + size)
            bench("scaling, uniform", table, None, repeats)
    results.append(bench_cli(args.repeats))
    print(f"record: {record.write(results)}")


if __name__ == "__main__":
    main()
