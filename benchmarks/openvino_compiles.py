"""Do separate compiles of one network run at different speeds? (OpenVINO, issue 15)

Builds mobilenet_v2 (random weights, seed 0) and one merged plan solved from a table, exports each
once, compiles each ``--compiles`` times in this process and times all the compiled copies in turn,
``--runs`` runs each per round, for ``--seconds``. Prints per copy its median over rounds and the
rounds' spread, and the speed-up of every (original copy, merged copy) pair. Copies that keep their
own speed across rounds, beyond the rounds' spread, mean the speed is fixed at compile time.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/openvino_compiles.py --table out/qf_ov_new/openvino_1.csv
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from dpcompress.backends import export_onnx_bytes, get_backend
from dpcompress.graph.rewrite import merged_model
from dpcompress.graph.trace import trace_model
from dpcompress.models import build_model
from dpcompress.search.solver import resolve_budget, solve_for_model
from dpcompress.tables import read_latency_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="torchvision:mobilenet_v2")
    parser.add_argument("--table", required=True)
    parser.add_argument("--ratio", type=float, default=0.7)
    parser.add_argument("--compiles", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()

    shape = (1, 3, 224, 224)
    torch.manual_seed(0)
    model = build_model(args.model, None).eval()
    traced = trace_model(model, shape, spec=args.model)
    table = read_latency_table(args.table)
    plan = solve_for_model(table, None, resolve_budget(table, None, args.ratio), chain=traced.chain)[0]
    backend = get_backend("openvino", threads=args.threads)
    x = torch.randn(*shape)
    copies = {}
    for label, module in (("original", model), ("merged", merged_model(traced, plan).eval())):
        ov_model = backend._core.read_model(export_onnx_bytes(module, x))
        for index in range(args.compiles):
            copies[f"{label} {index}"] = backend._request(ov_model, x)
    for request in copies.values():
        for _ in range(5):
            request.infer()
    rounds = {name: [] for name in copies}
    began = time.perf_counter()
    while time.perf_counter() - began < args.seconds:
        for name, request in copies.items():
            times = []
            for _ in range(args.runs):
                start = time.perf_counter()
                request.infer(share_outputs=True)
                times.append((time.perf_counter() - start) * 1e3)
            rounds[name].append(statistics.median(times))
    print(f"# {args.model}, plan at {args.ratio} from {args.table}; {backend.describe()}; "
          f"{len(rounds['original 0'])} rounds; {time.strftime('%Y-%m-%d %H:%M')}")
    print("| copy | median ms | rounds' q10-q90 ms |")
    print("|---|---|---|")
    for name, values in rounds.items():
        q10, q90 = np.percentile(values, [10, 90])
        print(f"| {name} | {statistics.median(values):.3f} | {q10:.3f}-{q90:.3f} |")
    print("| pair | speed-up (median of per-round ratios) |")
    print("|---|---|")
    for i in range(args.compiles):
        for j in range(args.compiles):
            ratios = [o / m for o, m in zip(rounds[f"original {i}"], rounds[f"merged {j}"])]
            print(f"| original {i} / merged {j} | {statistics.median(ratios):.3f}x |")


if __name__ == "__main__":
    main()
