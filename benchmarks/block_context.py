"""One merged block's time as its network around it changes (issue 15).

Times, as a profile does (``network_timing.time_networks``, ``--repeats`` times, medians), the
9x9 merged block (30, 42) of mobilenet_v2 inside networks of single convs that differ in what is
merged around it: nothing, the block before it, the block after it, both, and a whole deep plan.
A block whose time moves with its immediate neighbours points at the nodes next to it; one that
moves only with the whole network, at what the network as a whole holds (its memory, its length).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/block_context.py --backends openvino,onnxruntime
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from mobilenet_setup import SHAPE, mobilenet_v2  # benchmarks/ is the script's folder, so on sys.path
from dpcompress.backends import get_backend
from dpcompress.graph.geometry import block_geometry
from dpcompress.latency.network_timing import packed_plan, time_networks

TARGET = (30, 42)
DEEP_PLAN = [(0, 12), (12, 15), (15, 21), (21, 24), (24, 27), (27, 30), TARGET, (42, 45), (45, 48), (48, 51)]
CONTEXTS = {"alone": [TARGET], "merged before": [(27, 30), TARGET], "merged after": [TARGET, (42, 45)],
            "merged before and after": [(27, 30), TARGET, (42, 45)], "deep plan": DEEP_PLAN}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="openvino,onnxruntime")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    _, traced = mobilenet_v2()
    shape = SHAPE
    chain = traced.chain
    geometries = {(s, e, ()): block_geometry(chain, s, e) for s, e in chain.valid_blocks()}
    plans = [packed_plan(chain, blocks) for blocks in CONTEXTS.values()]
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, load {os.getloadavg()[0]:.2f}")
    print(f"| backend | merged around {TARGET} | its time ms | network wall ms |")
    print("|---|---|---|---|")
    for name in args.backends.split(","):
        backend = get_backend(name, threads=args.threads)
        call_ms = backend.call_overhead_ms(shape, "fp32", 10, 50)
        runs = [time_networks(backend, traced, plans, geometries, shape, "fp32", 10, 50, call_ms)
                for _ in range(args.repeats)]
        for index, context in enumerate(CONTEXTS):
            block_ms = statistics.median(run[index].blocks[(*TARGET, ())][0] for run in runs)  # type: ignore
            wall_ms = statistics.median(run[index].wall_ms for run in runs)  # type: ignore
            print(f"| {name} | {context} | {block_ms:.4f} | {wall_ms:.3f} |", flush=True)


if __name__ == "__main__":
    main()
