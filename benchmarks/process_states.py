"""Is a runtime's speed a property of the session or of the process? (issues 11 and 15)

Builds ``--sessions`` ONNX Runtime sessions of one network in this process, the way profile and bench
build them (``saved``: optimized once, saved, loaded without rewriting) or at ``ORT_ENABLE_ALL`` from
the export (``direct``), times them in alternating rounds and prints each session's median. Run it
several times: sessions of one process agreeing while processes disagree means the state that moves
a table or a bench belongs to the process (or to the minutes it runs in), not to a session.

    for i in 1 2 3 4; do .venv/bin/python benchmarks/process_states.py --build saved; done
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import onnxruntime as ort
import torch

from dpcompress.backends import export_onnx_file, get_backend
from dpcompress.models import build_model

from ort_saved_graph_parity import median_ms  # benchmarks/ is the script's folder, so on sys.path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="torchvision:mobilenet_v2")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--build", choices=("saved", "direct"), default="saved")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=20, help="Runs per round and session.")
    args = parser.parse_args()
    backend = get_backend("onnxruntime", threads=args.threads)
    torch.manual_seed(0)
    example = torch.randn(1, 3, args.size, args.size)
    sessions = []
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        export_onnx_file(build_model(args.model).eval(), example, path)
        for index in range(args.sessions):
            options = backend.session_options()
            if args.build == "direct":
                sessions.append(ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]))
                continue
            options.optimized_model_filepath = saved = os.path.join(folder, f"optimized{index}.onnx")
            ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            options = backend.session_options()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            sessions.append(ort.InferenceSession(saved, options, providers=["CPUExecutionProvider"]))
    feed = {"x": example.numpy()}
    for session in sessions:
        median_ms(session, feed, 5)  # warm-up
    medians = [[] for _ in sessions]
    for _ in range(args.rounds):
        for index, session in enumerate(sessions):
            medians[index].append(median_ms(session, feed, args.runs))
    print(f"{args.model} at {args.size}, {args.build}: per session (ms) "
          + " ".join(f"{statistics.median(m):.2f}" for m in medians) + f"; load {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
