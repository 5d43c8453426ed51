"""Predicted vs measured speed-up of solved plans, per model and budget (issue 11's targets).

For each model: a latency table (a given one, else profiled into ``--out-dir`` with the default
timing and, where the model has reducible convs, pruning options, resumable), plans solved with uniform
importance (which prices a table's pruning options, as compress does) at each budget ratio and at the
smallest feasible latency, and each plan's merged network benched against the original with
``dpcompress.latency.bench.bench_modules`` (alternating rounds in one process), ``--repeats`` times,
on ``--backend`` (ONNX Runtime or OpenVINO). Prints one markdown row per plan: predicted, the
measured speed-ups, their median, the prediction error of the median, and the original's median
in the benches against the table's own figure for it (a bench in another state than the table's
moves a deep plan's speed-up); writes the rows as JSON too. With ``--table-state``, each bench judges
the original's rounds against the table's quiet level (its ``anchor_quiet_ms``, as ``compress``'s
closed loop does) and takes its figures from the rounds that met it; with ``--min-seconds``, each
bench goes on that long, to meet such rounds; a bench that never met the table's state is run again,
up to ``--tries`` times in all, kept in the JSON and marked in the row where no try met it.

Usage: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_prediction.py \
    --models mobilenet_v2,resnet18 [--backend openvino] [--batch-size 8] [--ratios 0.9,0.7,0.5,min] [--repeats 3]
       .venv/bin/python benchmarks/bench_prediction.py --quick   # tiny model at 32x32, two budgets, one bench
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path

import common
from table_state import bench_in_table_state, met_table_state  # benchmarks/ is the script's folder

from dpcompress.backends import get_backend
from dpcompress.graph.rewrite import merged_model, unchanged_network
from dpcompress.latency.profile import default_timing, profile_table
from dpcompress.pipeline import find_table, prune_default
from dpcompress.search.solver import resolve_budget, solve_for_model
from dpcompress.tables import read_latency_table

QUICK = {"models": common.QUICK_SPEC, "size": common.QUICK_SIZE, "ratios": "0.7,min", "repeats": 1, "rounds": 4,
         "iters": 4}


def main() -> None:
    parser = common.parser(__doc__, "bench_prediction", backend=True)
    parser.add_argument("--models", default="mobilenet_v2", help="torchvision names or full specs, comma-separated")
    parser.add_argument("--table", default=None, help="use this table (one model only) instead of profiling")
    parser.add_argument("--tables-dir", default="latency_tables",
                        help="reuse a table made in-network for the same chain and settings from here")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--ratios", default="0.9,0.7,0.5,min")
    parser.add_argument("--repeats", type=int, default=3, help="alternating benches per plan")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--min-seconds", type=float, default=0.0, help="each bench lasts at least this long")
    parser.add_argument("--table-state", action="store_true",
                        help="judge each bench's rounds against the table's quiet level (anchor_quiet_ms)")
    parser.add_argument("--tries", type=int, default=1, help="runs of a bench that does not meet the table's state")
    parser.add_argument("--timing", default=None, help="in-network or standalone (profiling)")
    parser.add_argument("--no-prune", action="store_true",
                        help="merging alone: the table's pruning options dropped (as compress --no-prune)")
    args = common.parse(parser, QUICK)

    out = Path(args.out_dir)
    record = common.Record(args)
    backend = get_backend(args.backend, threads=args.threads)
    shape = (args.batch_size, 3, args.size, args.size)
    print(f"# {backend.describe()}, input {'x'.join(map(str, shape))}")
    rows = common.Table(["model", "budget", "blocks (pruned convs)", "predicted", "measured (each bench)", "measured median",
                         "error", "original in the benches / in the table"])
    records = []
    for name in args.models.split(","):
        spec = common.model_spec(name)
        _, traced = common.seeded_traced(spec, shape, args.seed)
        original = unchanged_network(traced)
        prune = prune_default(None, traced.chain)
        found = find_table(Path(args.tables_dir), traced.chain.fingerprint(), backend.name, "fp32", args.batch_size,
                           backend.threads, args.timing or default_timing(backend, traced), prune)
        if args.table or found:
            table_path = Path(args.table or found)
        else:
            stem = spec.split(":")[-1].replace("?", "_").replace("=", "")
            table_path = out / f"{stem}_{args.size}_b{args.batch_size}_{args.timing or 'default'}.csv"
            if not table_path.exists():
                began = time.perf_counter()
                profile_table(traced.chain, backend, table_path, model_spec=spec, input_shape=shape,
                              traced=traced, timing=args.timing, prune=prune)
                print(f"<!-- profiled {table_path} in {time.perf_counter() - began:.0f} s -->", flush=True)
        table = read_latency_table(table_path)
        if args.no_prune:
            table = replace(table, pruned_latency_ms={})
        smallest = min(p.latency_ms for p in solve_for_model(table, None, table.original_latency_ms(),
                                                              chain=traced.chain, with_frontier=True)[1])
        for ratio in args.ratios.split(","):
            budget = smallest if ratio == "min" else resolve_budget(table, None, float(ratio))
            if budget < smallest:
                rows.row([name, ratio, f"infeasible: smallest is {smallest / table.original_latency_ms():.2f} "
                          "of the original", "", "", "", "", ""])
                continue
            plan, _ = solve_for_model(table, None, budget, chain=traced.chain)
            merged = merged_model(traced, plan)
            level = table.meta.get("anchor_quiet_ms") if args.table_state else None
            measured, originals_ms, met, not_met = [], [], [], []
            for _ in range(args.repeats):
                result, missed = bench_in_table_state(backend, original, merged, level, args.tries, input_shape=shape,
                                                      rounds=args.rounds, iters_per_round=args.iters, plan=plan,
                                                      min_seconds=args.min_seconds)
                not_met.extend(bench.measured_speedup for bench in missed)
                measured.append(result.measured_speedup)
                originals_ms.append(result.original.median_ms)
                met.append(met_table_state(result, level))
            predicted = plan.original_latency_ms / plan.latency_ms
            median = statistics.median(measured)
            label = "min" if ratio == "min" else ratio
            result_row = {"model": spec, "budget": label, "budget_ratio": budget / plan.original_latency_ms,
                          "blocks": [list(b) for b in plan.blocks], "pruned": list(plan.pruned),
                          "predicted": predicted, "measured": measured,
                          "measured_median": median, "error": predicted / median - 1, "table": str(table_path),
                          "input_shape": list(shape), "backend": backend.name, "originals_ms": originals_ms,
                          "table_original_ms": plan.original_latency_ms,
                          "table_quiet_level_ms": level, "met_table_state": met,
                          "benches_not_meeting_it": not_met}
            records.append(result_row)
            benches = ", ".join(f"{m:.2f}x" + ("" if ok else " (never met)") for m, ok in zip(measured, met))
            if not_met:
                benches += f"; {len(not_met)} run again: {', '.join(f'{m:.2f}x' for m in not_met)}"
            rows.row([name, f"{label} ({result_row['budget_ratio']:.2f})", f"{len(plan.blocks)} ({len(plan.pruned)})",
                      f"{predicted:.2f}x",
                      benches, f"{median:.2f}x", f"{result_row['error']:+.1%}",
                      f"{statistics.median(originals_ms) / plan.original_latency_ms:.2f}"])
            record.write(records)
    print(f"record: {record.write(records)}")


if __name__ == "__main__":
    main()
