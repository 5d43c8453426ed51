"""A plan made for one runtime, run on another: ONNX Runtime vs OpenVINO on the CPU (issue 15).

For one model, a latency table per runtime (shipped ones under latency_tables/, else profiled
in-network into ``--out-dir``), plans solved from each table with uniform importance at each
budget ratio, and every plan benched on both runtimes against the original (alternating rounds,
``--repeats`` benches, median). Prints, per budget, the 2x2 table of measured speed-ups with each
plan's predicted speed-up on each table (the plan's blocks summed in that table plus its rest). With
``--table-state``, a bench on a runtime takes its figures from the rounds in which the original ran
near that runtime's table's quiet level (``anchor_quiet_ms``), going on for ``--min-seconds`` to meet them;
a bench that met none is run again, up to ``--tries`` times in all, and marked * where no try met it.

Usage: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_runtimes.py [--model torchvision:mobilenet_v2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from dpcompress.backends import get_backend
from dpcompress.latency.bench import BenchResult, bench_modules
from dpcompress.pipeline import find_table
from dpcompress.models import build_model
from dpcompress.latency.profile import profile_table
from dpcompress.graph.rewrite import merged_model
from dpcompress.search.solver import resolve_budget, solve_for_model
from dpcompress.tables import read_latency_table
from dpcompress.graph.trace import trace_model

RUNTIMES = ("onnxruntime", "openvino")


def predicted(table, plan) -> float:
    """The plan's predicted speed-up on ``table``: its blocks and the table's rest, against the original."""
    latency = math.fsum([*(table.latency_ms[b] for b in plan.blocks), table.rest_ms])
    return table.original_latency_ms() / latency


def met_table_state(result: BenchResult, level_ms: Optional[float]) -> bool:
    """Whether a bench judged against a table's quiet level took its figures from rounds that met it."""
    return level_ms is None or result.quiet_level_ms == level_ms


def bench_in_table_state(backend, model, merged, level_ms: Optional[float], tries: int,
                         **bench_args) -> Tuple[BenchResult, List[BenchResult]]:
    """``bench_modules`` with the original's rounds judged against ``level_ms`` (a table's ``anchor_quiet_ms``;
    None: its own), run again, up to ``tries`` times in all, while a bench meets no round in that state.
    Returns the last bench and those run before it."""
    missed: List[BenchResult] = []
    while True:
        result = bench_modules(backend, model, merged, quiet_level_ms=level_ms, **bench_args)
        if met_table_state(result, level_ms) or len(missed) + 1 >= tries:
            return result, missed
        missed.append(result)


def benches(cell) -> str:
    """A cell's benches, * marking one that never met its table's state."""
    return ", ".join(f"{m:.2f}" + ("" if ok else "*") for m, ok in zip(cell["measured"], cell["met_table_state"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="torchvision:mobilenet_v2")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--ratios", default="0.9,0.7,0.5")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--min-seconds", type=float, default=0.0, help="each bench lasts at least this long")
    parser.add_argument("--table-state", action="store_true",
                        help="judge each bench's rounds against its runtime's table's quiet level")
    parser.add_argument("--tries", type=int, default=1, help="runs of a bench that does not meet the table's state")
    parser.add_argument("--out-dir", default="out/bench_runtimes")
    args = parser.parse_args()

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = (1, 3, args.size, args.size)
    torch.manual_seed(0)
    model = build_model(args.model, None).eval()
    traced = trace_model(model, shape, spec=args.model)
    backends = {name: get_backend(name, threads=args.threads) for name in RUNTIMES}
    tables = {}
    for name, backend in backends.items():
        found = find_table(Path("latency_tables"), traced.chain.fingerprint(), name, "fp32", 1, backend.threads,
                           "in-network")
        if found is None:
            found = out / f"{name}.csv"
            if not found.exists():
                profile_table(traced.chain, backend, found, model_spec=args.model, input_shape=shape, traced=traced)
        tables[name] = read_latency_table(found)
        print(f"<!-- {name}: {backends[name].describe()}, table {found} -->")
    print(f"# {args.model} at {args.size}, load average {os.getloadavg()[0]:.2f}, {time.strftime('%Y-%m-%d %H:%M')}")
    print("| budget | plan solved on | blocks | predicted on ORT table | measured on ORT | "
          "predicted on OpenVINO table | measured on OpenVINO |")
    print("|---|---|---|---|---|---|---|")
    records = []
    for ratio in (float(r) for r in args.ratios.split(",")):
        for made_for in RUNTIMES:
            table = tables[made_for]
            try:
                plan, _ = solve_for_model(table, None, resolve_budget(table, None, ratio), chain=traced.chain)
            except Exception as err:  # an infeasible budget on this table is a finding
                print(f"| {ratio:g} | {made_for} | {err} | | | | |", flush=True)
                continue
            merged = merged_model(traced, plan)
            cells = {}
            for run_on, backend in backends.items():
                level = tables[run_on].meta.get("anchor_quiet_ms") if args.table_state else None
                speedups, met = [], []
                for _ in range(args.repeats):
                    result, _ = bench_in_table_state(backend, model, merged, level, args.tries, input_shape=shape,
                                                     min_seconds=args.min_seconds)
                    speedups.append(result.measured_speedup)
                    met.append(met_table_state(result, level))
                cells[run_on] = {"predicted": predicted(tables[run_on], plan), "measured": speedups,
                                 "met_table_state": met, "median": statistics.median(speedups)}
            records.append({"ratio": ratio, "made_for": made_for, "blocks": len(plan.blocks), **cells})
            ort, ov = cells["onnxruntime"], cells["openvino"]
            print(f"| {ratio:g} | {made_for} | {len(plan.blocks)} | {ort['predicted']:.2f}x | {ort['median']:.2f}x "
                  f"({benches(ort)}) | {ov['predicted']:.2f}x | {ov['median']:.2f}x ({benches(ov)}) |", flush=True)
    (out / "runtimes.json").write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
