"""How far apart two latency tables made minutes apart are, at default and at more timed runs (issue 15).

For one model and backend, makes ``--tables`` tables in turn for each ``--iters`` value (in-network,
alternating the iters values: A200, A50, B200, B50, ...), then prints each table's predicted
speed-up of fixed plans: those solved from the shipped ONNX Runtime table at ``--ratios``. The
spread of one plan's prediction over tables made alike is the table's own noise, which no method
of attribution removes; a larger ``--iters`` buys more rounds per network (up to 3 s each). With
``--bench N``, the plans are then benched N times each on the backend, to set beside the predictions;
with ``--bench-each N``, N times right after each table, so that each table's predictions meet
measurements made minutes from it (the machine's own state can change in between).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/table_spread.py --backend openvino --iters 50,200 --tables 2
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/table_spread.py --backend openvino --iters 200 --tables 6 --bench-each 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from dpcompress.backends import get_backend
from dpcompress.graph.rewrite import merged_model
from dpcompress.graph.trace import trace_model
from dpcompress.latency.bench import bench_modules
from dpcompress.latency.profile import profile_table
from dpcompress.models import build_model
from dpcompress.search.solver import resolve_budget, solve_for_model
from dpcompress.tables import read_latency_table

from bench_runtimes import predicted  # benchmarks/ is the script's folder, so on sys.path

PLANS_FROM = "latency_tables/cpu_onnxruntime/mobilenet_v2.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="torchvision:mobilenet_v2")
    parser.add_argument("--backend", default="openvino")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", default="50,200", help="Timed runs per network, comma-separated values.")
    parser.add_argument("--tables", type=int, default=2, help="Tables per iters value.")
    parser.add_argument("--ratios", default="0.9,0.7,0.5")
    parser.add_argument("--timing", default="in-network", choices=("in-network", "standalone"))
    parser.add_argument("--bench", type=int, default=0,
                        help="Then bench each plan on the backend this many times (median) to compare.")
    parser.add_argument("--bench-each", type=int, default=0,
                        help="Bench each plan this many times (median) right after each table.")
    parser.add_argument("--out-dir", default="out/table_spread")
    args = parser.parse_args()

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = (1, 3, 224, 224)
    torch.manual_seed(0)
    model = build_model(args.model, None).eval()
    traced = trace_model(model, shape, spec=args.model)
    source = read_latency_table(PLANS_FROM)
    ratios = [float(r) for r in args.ratios.split(",")]
    plans = [solve_for_model(source, None, resolve_budget(source, None, r), chain=traced.chain)[0] for r in ratios]
    backend = get_backend(args.backend, threads=args.threads)
    print(f"# {args.model} on {backend.describe()}, {args.timing}; plans from {PLANS_FROM}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    merged = [merged_model(traced, plan) for plan in plans] if args.bench or args.bench_each else []
    measured_cells = " | ".join(f"measured {r:g} (error)" for r in ratios) if args.bench_each else ""
    print("| table | iters | load | seconds | " + " | ".join(f"plan {r:g}" for r in ratios) + " |"
          + (f" {measured_cells} |" if measured_cells else ""))
    print("|---|---|---|---|" + "---|" * len(ratios) * (2 if args.bench_each else 1))
    by_iters = {int(i): [] for i in args.iters.split(",")}
    for index in range(args.tables):
        for iters in by_iters:
            path = out / f"{args.backend}_{iters}_{index}.csv"
            load = os.getloadavg()[0]
            began = time.perf_counter()
            profile_table(traced.chain, backend, path, model_spec=args.model, input_shape=shape, traced=traced,
                          iters=iters, overwrite=True, timing=args.timing)
            seconds = time.perf_counter() - began
            table = read_latency_table(path)
            speedups = [predicted(table, plan) for plan in plans]
            by_iters[iters].append(speedups)
            row = f"| {index} | {iters} | {load:.2f} | {seconds:.0f} | " + " | ".join(f"{s:.2f}x" for s in speedups)
            if args.bench_each:
                measured = bench_medians(backend, model, merged, shape, args.bench_each)
                row += " | " + " | ".join(f"{m:.2f}x ({100 * (s / m - 1):+.1f}%)" for s, m in zip(speedups, measured))
            print(row + " |", flush=True)
    for iters, rows in by_iters.items():
        spreads = [max(col) / min(col) - 1 for col in zip(*rows)]
        means = [statistics.mean(col) for col in zip(*rows)]
        print(f"iters {iters}: mean " + ", ".join(f"{m:.2f}x" for m in means)
              + "; spread (max/min - 1) " + ", ".join(f"{100 * s:.1f}%" for s in spreads))
    if args.bench:
        measured = [[bench_modules(backend, model, m, input_shape=shape).measured_speedup for m in merged]
                    for _ in range(args.bench)]  # the plans take turns, bench after bench
        print(f"measured (median of {args.bench}, load {os.getloadavg()[0]:.2f}): " + ", ".join(
            f"{statistics.median(col):.2f}x ({min(col):.2f}-{max(col):.2f})" for col in zip(*measured)))


def bench_medians(backend, model, merged, shape, times: int):
    """Each merged network's measured speed-up over ``model``: the median of ``times`` benches, the
    networks taking turns."""
    runs = [[bench_modules(backend, model, m, input_shape=shape).measured_speedup for m in merged]
            for _ in range(times)]
    return [statistics.median(col) for col in zip(*runs)]


if __name__ == "__main__":
    main()
