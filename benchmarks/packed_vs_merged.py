"""A profile's packed network against the merged model a plan deploys (issue 15).

A table prices a plan's blocks inside packed networks: the model with the blocks replaced by convs
of their geometry and random weights (``network_timing.packed_network``). The deployed network is
``graph.rewrite.merged_model``: the merged convs with their real weights. This times, alternating
rounds for ``--seconds`` a plan, the model, the packed network of single convs, the plan's merged
model and the plan's packed network, and prints their medians and the per-round ratios.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/packed_vs_merged.py --backend openvino
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from quiet_fidelity import solved  # benchmarks/ is the script's folder, so on sys.path
from mobilenet_setup import SHAPE, mobilenet_v2
from dpcompress.backends import get_backend
from dpcompress.graph.geometry import block_geometry
from dpcompress.graph.rewrite import merged_model
from dpcompress.latency.network_timing import packed_network, packed_plan
from dpcompress.latency.timing import alternate, round_medians
from dpcompress.tables import read_latency_table

ITERS_PER_ROUND = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="openvino")
    parser.add_argument("--ratios", default="0.7,0.5")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model, traced = mobilenet_v2()
    shape = SHAPE
    chain = traced.chain
    table = read_latency_table(f"latency_tables/cpu_{args.backend}/mobilenet_v2.csv")
    geometries = {(s, e, ()): block_geometry(chain, s, e) for s, e in chain.valid_blocks()}
    backend = get_backend(args.backend, threads=args.threads)
    print(f"# {backend.describe()}; {time.strftime('%Y-%m-%d %H:%M')}, load {os.getloadavg()[0]:.2f}")
    print("| plan | rounds | model ms | packed singles ms | merged plan ms | packed plan ms | "
          "packed / merged plan | packed singles / model |")
    print("|---|---|---|---|---|---|---|---|")
    for ratio in (float(r) for r in args.ratios.split(",")):
        plan, ratio = solved(table, chain, ratio)
        merged_blocks = [b for b in plan.blocks if b[1] - b[0] > 1]
        networks = [model, packed_network(traced, packed_plan(chain, []), geometries)[0], merged_model(traced, plan),
                    packed_network(traced, packed_plan(chain, merged_blocks), geometries)[0]]
        runners = backend.prepare_all(networks, shape, "fp32")
        began = time.perf_counter()
        samples = alternate(runners, 10, 10, ITERS_PER_ROUND, max_rounds=1 << 30,
                            until=lambda _: time.perf_counter() - began >= args.seconds)
        model_ms, singles_ms, merged_ms, packed_ms = (np.array(round_medians(s, ITERS_PER_ROUND)) for s in samples)
        print(f"| {ratio:.2f} | {len(model_ms)} | {np.median(model_ms):.3f} | {np.median(singles_ms):.3f} | "
              f"{np.median(merged_ms):.3f} | {np.median(packed_ms):.3f} | {np.median(packed_ms / merged_ms):.3f} | "
              f"{np.median(singles_ms / model_ms):.3f} |", flush=True)


if __name__ == "__main__":
    main()
