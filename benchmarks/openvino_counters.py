"""What OpenVINO's per-node profiling counters report: a running average since compiling, in whole microseconds.

Two 3x3 convs (64 channels, 56x56, one thread) are compiled with profiling on and run 40 times; during
runs 21-31 two busy processes share the machine's cores. Printed per run: the wall time and each conv's
reported ``real_time``. A last-run counter would read the first run once and jump with the busy runs and
drop back after; a running average falls slowly from the first run, moves a little with the busy runs
and stays up after them. Whole microseconds show in every figure, and a node under 1 us a run
would read 0 and NOT_RUN. (In-network timing reads OpenVINO's rounds accordingly: ``running_part_us``.)

    .venv/bin/python benchmarks/openvino_counters.py
"""

from __future__ import annotations

import multiprocessing
import time

import numpy as np
import openvino as ov
import torch

from dpcompress.backends import export_onnx_bytes


def spin() -> None:
    while True:
        pass


def main() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(64, 64, 3, padding=1)).eval()
    x = torch.randn(1, 64, 56, 56)
    core = ov.Core()
    compiled = core.compile_model(core.read_model(export_onnx_bytes(net, x)), "CPU",
                                  {"INFERENCE_NUM_THREADS": 1, "PERF_COUNT": True, "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    request.set_input_tensor(ov.Tensor(np.ascontiguousarray(x.numpy())))
    spinners: list = []
    print("| run | wall us | conv 1 reported us | conv 2 reported us | busy |")
    print("|---|---|---|---|---|")
    for run in range(1, 41):
        if run == 21:
            spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(2)]
            for spinner in spinners:
                spinner.start()
            time.sleep(0.2)
        if run == 32:
            for spinner in spinners:
                spinner.terminate()
                spinner.join()
            spinners = []
        began = time.perf_counter()
        request.infer()
        wall = (time.perf_counter() - began) * 1e6
        convs = [info.real_time.total_seconds() * 1e6 for info in request.get_profiling_info()
                 if info.node_type == "Convolution"]
        print(f"| {run} | {wall:.0f} | {convs[0]:.0f} | {convs[1]:.0f} | {'yes' if spinners else ''} |")


if __name__ == "__main__":
    main()
