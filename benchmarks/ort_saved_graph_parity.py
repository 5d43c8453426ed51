"""Does a session of ONNX Runtime's saved optimized graph time as the session that optimized it? (issue 12)

Profile and bench build each network's session once at ``ORT_ENABLE_ALL``, keep only the graph it
saves, and time a session that loads that graph without rewriting it (less memory: the rewrite's
NCHWc copies of the weights are never held beside the model's). Here both sessions of one network
run side by side in one process, alternating rounds; the ratio is loaded / direct.

    .venv/bin/python benchmarks/ort_saved_graph_parity.py --models mobilenet_v2,resnet50
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import onnxruntime as ort
import torch

from dpcompress.backends import export_onnx_file, get_backend
from dpcompress.models import build_model


def median_ms(session: ort.InferenceSession, feed: dict, runs: int) -> float:
    samples = []
    for _ in range(runs):
        began = time.perf_counter()
        session.run(None, feed)
        samples.append(time.perf_counter() - began)
    return statistics.median(samples) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mobilenet_v2,resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--runs", type=int, default=30, help="Runs per round and session.")
    args = parser.parse_args()
    backend = get_backend("onnxruntime", threads=args.threads)
    torch.manual_seed(0)
    for name in args.models.split(","):
        example = torch.randn(1, 3, args.size, args.size)
        with tempfile.TemporaryDirectory() as folder:
            path, saved = os.path.join(folder, "model.onnx"), os.path.join(folder, "optimized.onnx")
            export_onnx_file(build_model(f"torchvision:{name}").eval(), example, path)
            options = backend.session_options()
            options.optimized_model_filepath = saved
            direct = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            options = backend.session_options()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            loaded = ort.InferenceSession(saved, options, providers=["CPUExecutionProvider"])
        feed = {"x": example.numpy()}
        for session in (direct, loaded):
            median_ms(session, feed, 10)  # warm-up
        ratios, directs, loadeds = [], [], []
        for _ in range(args.rounds):
            directs.append(median_ms(direct, feed, args.runs))
            loadeds.append(median_ms(loaded, feed, args.runs))
            ratios.append(loadeds[-1] / directs[-1])
        print(f"{name} at {args.size}: loaded / direct {statistics.median(ratios):.3f} "
              f"(rounds {min(ratios):.3f}-{max(ratios):.3f}); direct {statistics.median(directs):.2f} ms, "
              f"loaded {statistics.median(loadeds):.2f} ms; load {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
