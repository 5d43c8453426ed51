"""How a plan's measured speed-up moves with the machine's state (issue 15).

Benches mobilenet_v2 against a deep plan solved from a shipped table, alternating rounds for
``--seconds``, and groups the rounds by how slow the original ran against the table's quiet
level (its meta ``anchor_quiet_ms``). Per group: the rounds and the median speed-up; then a fit
of log speed-up on log(original / level) over every round: its slope is the share of the
original's slowdown that the plan does not pay. A slope of 0.5 means that a state that slows the
original by 10% raises the speed-up by some 5%.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/state_elasticity.py --backends openvino,onnxruntime
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from bench_runtimes import predicted  # benchmarks/ is the script's folder, so on sys.path
from quiet_fidelity import solved
from mobilenet_setup import SHAPE, mobilenet_v2
from dpcompress.backends import get_backend
from dpcompress.graph.rewrite import merged_model
from dpcompress.latency.timing import alternate, round_medians
from dpcompress.tables import read_latency_table

GROUPS = [(0.0, 1.0), (1.0, 1.03), (1.03, 1.06), (1.06, 1.1), (1.1, 1.15), (1.15, 1.3), (1.3, float("inf"))]
ITERS_PER_ROUND = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="openvino,onnxruntime")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model, traced = mobilenet_v2()
    shape = SHAPE
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, load {os.getloadavg()[0]:.2f}")
    print("| backend | plan | predicted | original / level | rounds | speed-up (median) | plan ms (median) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.backends.split(","):
        path = Path(f"latency_tables/cpu_{name}/mobilenet_v2.csv")
        level = json.loads(path.with_suffix(".meta.json").read_text())["anchor_quiet_ms"]
        table = read_latency_table(path)
        plan, ratio = solved(table, traced.chain, args.ratio)
        expected = predicted(table, plan)
        backend = get_backend(name, threads=args.threads)
        runners = backend.prepare_all([model, merged_model(traced, plan)], shape, "fp32")
        began = time.perf_counter()
        samples = alternate(runners, 10, 10, ITERS_PER_ROUND, max_rounds=1 << 30,
                            until=lambda _: time.perf_counter() - began >= args.seconds)
        original, compressed = (np.array(round_medians(s, ITERS_PER_ROUND)) for s in samples)
        state, speedup = original / level, original / compressed
        for low, high in GROUPS:
            inside = (state >= low) & (state < high)
            if inside.any():
                print(f"| {name} | {ratio:.2f} | {expected:.2f}x | {low:.2f}-{high:.2f} | {int(inside.sum())} | "
                      f"{np.median(speedup[inside]):.3f}x | {np.median(compressed[inside]):.3f} |")
        slope, intercept = np.polyfit(np.log(state), np.log(speedup), 1)
        correlation = np.corrcoef(np.log(state), np.log(speedup))[0, 1]
        print(f"| {name} | fit | | slope {slope:.2f}, at the level {np.exp(intercept):.3f}x | {len(state)} | "
              f"correlation {correlation:.2f} | level {level:.3f} ms |", flush=True)


if __name__ == "__main__":
    main()
