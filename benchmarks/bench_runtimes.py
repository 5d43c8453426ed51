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
       .venv/bin/python benchmarks/bench_runtimes.py --quick   # tiny model at 32x32, one budget, one bench
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import common
from table_state import bench_in_table_state, met_table_state  # benchmarks/ is the script's folder

from dpcompress.backends import get_backend
from dpcompress.graph.rewrite import merged_model, unchanged_network
from dpcompress.latency.profile import profile_table
from dpcompress.pipeline import find_table
from dpcompress.search.solver import resolve_budget, solve_for_model
from dpcompress.tables import read_latency_table

RUNTIMES = common.BACKENDS
QUICK = {"model": common.QUICK_SPEC, "size": common.QUICK_SIZE, "ratios": "0.7", "repeats": 1}


def predicted(table, plan) -> float:
    """The plan's predicted speed-up on ``table``: its blocks and the table's rest, against the original."""
    latency = math.fsum([*(table.latency_ms[b] for b in plan.blocks), table.rest_ms])
    return table.original_latency_ms() / latency


def benches(cell) -> str:
    """A cell's benches, * marking one that never met its table's state."""
    return ", ".join(f"{m:.2f}" + ("" if ok else "*") for m, ok in zip(cell["measured"], cell["met_table_state"]))


def main() -> None:
    parser = common.parser(__doc__, "bench_runtimes")
    parser.add_argument("--model", default="torchvision:mobilenet_v2")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--ratios", default="0.9,0.7,0.5")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=0.0, help="each bench lasts at least this long")
    parser.add_argument("--table-state", action="store_true",
                        help="judge each bench's rounds against its runtime's table's quiet level")
    parser.add_argument("--tries", type=int, default=1, help="runs of a bench that does not meet the table's state")
    args = common.parse(parser, QUICK)

    out = Path(args.out_dir)
    record = common.Record(args)
    shape = (1, 3, args.size, args.size)
    _, traced = common.seeded_traced(args.model, shape, args.seed)
    original = unchanged_network(traced)
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
    print(f"# {args.model} at {args.size}")
    table = common.Table(["budget", "plan solved on", "blocks", "predicted on ORT table", "measured on ORT",
                          "predicted on OpenVINO table", "measured on OpenVINO"])
    records = []
    for ratio in (float(r) for r in args.ratios.split(",")):
        for made_for in RUNTIMES:
            made_table = tables[made_for]
            try:
                plan, _ = solve_for_model(made_table, None, resolve_budget(made_table, None, ratio),
                                          chain=traced.chain)
            except Exception as err:  # an infeasible budget on this table is a finding
                table.row([f"{ratio:g}", made_for, err, "", "", "", ""])
                continue
            merged = merged_model(traced, plan)
            cells = {}
            for run_on, backend in backends.items():
                level = tables[run_on].meta.get("anchor_quiet_ms") if args.table_state else None
                speedups, met = [], []
                for _ in range(args.repeats):
                    result, _ = bench_in_table_state(backend, original, merged, level, args.tries, input_shape=shape,
                                                     min_seconds=args.min_seconds)
                    speedups.append(result.measured_speedup)
                    met.append(met_table_state(result, level))
                cells[run_on] = {"predicted": predicted(tables[run_on], plan), "measured": speedups,
                                 "met_table_state": met, "median": statistics.median(speedups)}
            records.append({"ratio": ratio, "made_for": made_for, "blocks": len(plan.blocks), **cells})
            ort, ov = cells["onnxruntime"], cells["openvino"]
            table.row([f"{ratio:g}", made_for, len(plan.blocks), f"{ort['predicted']:.2f}x",
                       f"{ort['median']:.2f}x ({benches(ort)})", f"{ov['predicted']:.2f}x",
                       f"{ov['median']:.2f}x ({benches(ov)})"])
            record.write(records)
    print(f"record: {record.write(records)}")


if __name__ == "__main__":
    main()
