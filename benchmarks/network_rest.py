"""The rest outside the blocks in the singles' network against a deep plan's network (issue 15).

A plan's prediction adds the rest measured in the network of single convs (``rest_ms``). This times,
as a profile does (``time_networks``), that network and a packed network of a deep plan's merged
blocks, and prints each one's wall, node-time scale, blocks' sum and rest.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/network_rest.py --backends openvino,onnxruntime
"""

from __future__ import annotations

import argparse

from cold_runs import DEEP_BLOCKS  # benchmarks/ is the script's folder, so on sys.path
from mobilenet_setup import SHAPE, mobilenet_v2
from dpcompress.backends import get_backend
from dpcompress.graph.geometry import block_geometry
from dpcompress.latency.network_timing import packed_plan, time_networks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="openvino,onnxruntime")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    _, traced = mobilenet_v2()
    shape = SHAPE
    chain = traced.chain
    plans = [packed_plan(chain, []), packed_plan(chain, DEEP_BLOCKS)]
    geometries = {(s, e, ()): block_geometry(chain, s, e) for plan in plans for s, e in plan.blocks}
    print("| backend | network | wall ms | scale | blocks | blocks' sum ms | rest ms | call ms |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.backends.split(","):
        backend = get_backend(name, threads=args.threads)
        call_ms = backend.call_overhead_ms(shape, "fp32", 5, 50)
        timings = time_networks(backend, traced, plans, geometries, shape, "fp32", 10, 200, call_ms)
        for label, timing in zip(("single convs", "deep plan's blocks"), timings):
            print(f"| {name} | {label} | {timing.wall_ms:.3f} | {timing.scale:.3f} | {len(timing.blocks)} | "
                  f"{timing.blocks_ms:.3f} | {timing.rest_ms:.3f} | {call_ms:.3f} |")


if __name__ == "__main__":
    main()
