"""Two convs of very different cost at the same input: every backend must time the expensive one slower."""

from __future__ import annotations

from torch import nn

from dpcompress.latency.timing import time_runner

CHEAP = (nn.Conv2d(16, 16, 1), (1, 16, 32, 32))
EXPENSIVE = (nn.Sequential(nn.Conv2d(16, 16, 7, padding=3), nn.ReLU()), (1, 16, 32, 32))  # ~49x the FLOPs


def slower_of_two(backend, precision: str = "fp32") -> str:
    medians = {}
    for name, (module, shape) in (("cheap", CHEAP), ("expensive", EXPENSIVE)):
        medians[name] = time_runner(backend.prepare(module, shape, precision), warmup=2, iters=7).median_ms
    return max(medians, key=medians.__getitem__)
