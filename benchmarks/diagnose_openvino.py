"""Where an OpenVINO table's prediction of a deep-merge plan goes wrong (issue 15).

Solves a plan from the ONNX Runtime table (uniform importance, ``--ratio`` of the original), then,
on each runtime, times in alternating rounds with the profiler's own machinery
(``network_timing.time_networks``): the network of single convs (the original), the plan's network
(its merged blocks, random weights), and for each merged block a network with that block alone
merged. Per block it prints the table's row, the block's time alone in a network of single convs
(how the table was made, give or take the other blocks packed beside it) and its time inside the
plan's network; then the network totals beside the table's prediction. A block slower alone than
in the plan points to attribution by the runtime's node counters depending on the neighbours; a
row far from both, to the table itself.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/diagnose_openvino.py [--ratio 0.5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics

import torch

from dpcompress.backends import get_backend
from dpcompress.graph.geometry import block_geometry
from dpcompress.graph.trace import trace_model
from dpcompress.latency.network_timing import packed_plan, time_networks
from dpcompress.models import build_model
from dpcompress.search.solver import resolve_budget, solve_for_model
from dpcompress.tables import read_latency_table

TABLES = {"onnxruntime": "latency_tables/cpu_onnxruntime/mobilenet_v2.csv",
          "openvino": "latency_tables/cpu_openvino/mobilenet_v2.csv"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--plan-from", default="onnxruntime", choices=sorted(TABLES))
    parser.add_argument("--rounds", type=int, default=3, help="Repeats of the paired timing, medians reported.")
    args = parser.parse_args()

    shape = (1, 3, 224, 224)
    torch.manual_seed(0)
    model = build_model("torchvision:mobilenet_v2", None).eval()
    traced = trace_model(model, shape, spec="torchvision:mobilenet_v2")
    chain = traced.chain
    tables = {name: read_latency_table(path) for name, path in TABLES.items()}
    source = tables[args.plan_from]
    plan, _ = solve_for_model(source, None, resolve_budget(source, None, args.ratio), chain=chain)
    print(f"plan from {args.plan_from} at {args.ratio}: {len(plan.blocks)} blocks, "
          f"{sum(1 for s, e in plan.blocks if e - s > 1)} merged; load {os.getloadavg()[0]:.2f}")
    singles = packed_plan(chain, [])
    merged = packed_plan(chain, [b for b in plan.blocks if b[1] - b[0] > 1])
    geometries = {(s, e, ()): block_geometry(chain, s, e) for s, e in chain.valid_blocks()}

    merged_blocks = [b for b in plan.blocks if b[1] - b[0] > 1]
    networks = [singles, merged] + [packed_plan(chain, [b]) for b in merged_blocks]
    for name, table in tables.items():
        backend = get_backend(name)
        overhead = backend.call_overhead_ms(shape, "fp32", 10, 50)
        runs = [time_networks(backend, traced, networks, geometries, shape, "fp32", 10, 50, overhead)
                for _ in range(args.rounds)]

        def median_ms(network: int, block: tuple) -> float:
            return statistics.median(r[network].blocks[(block[0], block[1], ())][0] for r in runs)

        original_wall = statistics.median(r[0].wall_ms for r in runs)
        plan_wall = statistics.median(r[1].wall_ms for r in runs)
        rest_singles = statistics.median(r[0].rest_ms for r in runs)
        rest_plan = statistics.median(r[1].rest_ms for r in runs)
        predicted_ms = math.fsum([*(table.latency_ms[b] for b in plan.blocks), table.rest_ms])
        singles_in_plan = math.fsum(median_ms(1, b) for b in plan.blocks if b[1] - b[0] == 1)
        singles_in_table = math.fsum(table.latency_ms[b] for b in plan.blocks if b[1] - b[0] == 1)
        print(f"\n== {name} ({backend.version}), call overhead {overhead:.3f} ms, load {os.getloadavg()[0]:.2f}")
        print(f"original: table {table.original_latency_ms():.3f} ms, measured {original_wall:.3f} ms; "
              f"rest: table {table.rest_ms:.3f}, singles network {rest_singles:.3f}, plan network {rest_plan:.3f}")
        print(f"plan: table {predicted_ms:.3f} ms (pred {table.original_latency_ms() / predicted_ms:.2f}x), "
              f"measured {plan_wall:.3f} ms ({original_wall / plan_wall:.2f}x); its single convs: table "
              f"{singles_in_table:.3f} ms, in the plan {singles_in_plan:.3f} ms")
        print("block        kernel   in->out   groups  table ms  alone ms  in plan ms")
        for index, b in enumerate(merged_blocks):
            g = geometries[(b[0], b[1], ())]
            print(f"{str(b):12} {g.kernel[0]:>2}x{g.kernel[1]:<3} {g.in_channels:>4}->{g.out_channels:<5} "
                  f"{g.groups:>5}  {table.latency_ms[b]:8.3f}  {median_ms(2 + index, b):8.3f}  {median_ms(1, b):10.3f}")
        print(f"merged blocks summed: table {math.fsum(table.latency_ms[b] for b in merged_blocks):.3f}, alone "
              f"{math.fsum(median_ms(2 + i, b) for i, b in enumerate(merged_blocks)):.3f}, in plan "
              f"{math.fsum(median_ms(1, b) for b in merged_blocks):.3f}")


if __name__ == "__main__":
    main()
