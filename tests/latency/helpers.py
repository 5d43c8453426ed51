"""Fake backends, small chains and small networks the profile's tests share (and tests/graph's merge-memory
test and tests/backends' OpenVINO tests)."""

from __future__ import annotations

import csv
import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from dpcompress import zoo
from dpcompress.backends import Backend, Runner
from dpcompress.graph.chain import Chain, ConvUnit, Residual
from dpcompress.graph.trace import trace_model


def unit(position: int, cin: int, cout: int, hw: int, *, kernel: int = 3, stride: int = 1, groups: int = 1,
         activation: Optional[str] = "ReLU", linked: bool = True) -> ConvUnit:
    pad = kernel // 2
    out_hw = (hw + 2 * pad - kernel) // stride + 1
    return ConvUnit(position=position, name=f"conv{position}", in_channels=cin, out_channels=cout,
                    kernel=(kernel, kernel), stride=(stride, stride), padding=(pad, pad), dilation=(1, 1),
                    groups=groups, bias=False, in_shape=(1, cin, hw, hw), out_shape=(1, cout, out_hw, out_hw),
                    batchnorm=f"bn{position}", activation=activation, linked=linked and position > 1,
                    barrier=None if linked else "pool")


def uniform_chain(length: int = 4) -> Chain:
    """``length`` identical 3x3 8->8 convs at 8x8: a block's shape depends only on its length."""
    return Chain(model="test:uniform", input_shape=(1, 8, 8, 8),
                 units=[unit(p, 8, 8, 8) for p in range(1, length + 1)])


def mixed_chain() -> Chain:
    """Stem, a residual (1 -> 3) with a depthwise conv, a barrier before conv 5, then a strided conv."""
    units = [
        unit(1, 3, 8, 8),
        unit(2, 8, 8, 8, groups=8),
        unit(3, 8, 8, 8, kernel=1, activation=None),
        unit(4, 8, 16, 8, kernel=1),
        unit(5, 16, 16, 8, stride=2, linked=False),
        unit(6, 16, 16, 4, kernel=1, activation=None),
    ]
    return Chain(model="test:mixed", input_shape=(1, 3, 8, 8), units=units, residuals=[Residual(1, 3)])


class Prepared(NamedTuple):
    """What the recording backend was asked to time: the whole conv, not just its kernel."""

    kernel: Tuple[int, ...]
    input_shape: Tuple[int, ...]
    out_channels: int
    groups: int
    stride: Tuple[int, ...]
    activation: str


class RecordingBackend(Backend):
    """Counts prepare calls; a block's 'latency' is its kernel area times its output channels."""

    name = "recording"
    device = "cpu"

    def __init__(self, fail_after: Optional[int] = None) -> None:
        self.prepared: List[Prepared] = []
        self.fail_after = fail_after

    @property
    def version(self) -> str:
        return "1"

    @property
    def device_name(self) -> str:
        return "test device"

    def prepare(self, module, input_shape: Sequence[int], precision: str = "fp32") -> Runner:
        if self.fail_after is not None and len(self.prepared) >= self.fail_after:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-run
        conv = module[0]
        self.prepared.append(Prepared(tuple(conv.kernel_size), tuple(input_shape), conv.out_channels, conv.groups,
                                      tuple(conv.stride), type(module[1]).__name__))
        cost = float(conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels)
        return _ConstantRunner(cost)


class _ConstantRunner(Runner):
    def __init__(self, value: float) -> None:
        self.value = value

    def time(self, warmup: int, iters: int) -> List[float]:
        return [self.value] * iters


def read_csv(path) -> List[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class OverheadBackend(RecordingBackend):
    """Recording backend whose every call also pays a fixed cost that grows with the input's channels."""

    def __init__(self, per_channel: float = 10.0, fail_after: Optional[int] = None) -> None:
        super().__init__(fail_after)
        self.per_channel = per_channel
        self.overhead_calls = 0

    def call_overhead_ms(self, input_shape: Sequence[int], precision: str, warmup: int, iters: int) -> float:
        self.overhead_calls += 1
        return self.per_channel * input_shape[1]


FLOPS_PER_MS = 1e4


class FlopBackend(Backend):
    """Every conv 'runs' at ``flops_per_ms``; convs with a kernel of ``slow_kernel`` taps or more take ``slow_ms``."""

    name = "flops"
    device = "cpu"

    def __init__(self, slow_kernel: Optional[int] = None, slow_ms: float = 1e6,
                 flops_per_ms: float = FLOPS_PER_MS) -> None:
        self.slow_kernel, self.slow_ms, self.flops_per_ms = slow_kernel, slow_ms, flops_per_ms
        self.prepared: List[tuple] = []
        self.runs = 0

    @property
    def version(self) -> str:
        return "1"

    @property
    def device_name(self) -> str:
        return "FLOP counter"

    def prepare(self, module, input_shape: Sequence[int], precision: str = "fp32") -> Runner:
        conv = module[0]
        self.prepared.append(tuple(conv.kernel_size))
        n, _, h, w = input_shape
        out_h = (h + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        out_w = (w + 2 * conv.padding[1] - conv.kernel_size[1]) // conv.stride[1] + 1
        flops = 2.0 * n * out_h * out_w * conv.out_channels * conv.in_channels // conv.groups * math.prod(conv.kernel_size)
        slow = self.slow_kernel is not None and conv.kernel_size[0] >= self.slow_kernel
        return _CountingRunner(self, self.slow_ms if slow else flops / self.flops_per_ms)


class _CountingRunner(Runner):
    def __init__(self, backend: FlopBackend, value: float) -> None:
        self.backend, self.value = backend, value

    def time(self, warmup: int, iters: int) -> List[float]:
        self.backend.runs += warmup + iters
        return [self.value] * iters




def trace_tiny_mobilenet():
    """The zoo's tiny mobilenet_v2 traced at 16x16, with the same random weights every time."""
    torch.manual_seed(0)
    return trace_model(zoo.tiny_mobilenet_v2().eval(), (1, 3, 16, 16), spec="dpcompress.zoo:tiny_mobilenet_v2")


class ThreeParts(nn.Module):
    """part_a -> ReLU -> part_b -> SiLU -> (+ residual from part_a's output) -> part_c -> gate (SE-like)."""

    def __init__(self) -> None:
        super().__init__()
        self.part_a = nn.Conv2d(4, 8, 3, padding=1)
        self.part_b = nn.Conv2d(8, 8, 3, padding=1)
        self.part_c = nn.Conv2d(8, 8, 1)
        self.gate = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.part_a(x))
        b = nn.functional.silu(self.part_b(a)) + a
        c = self.part_c(b)
        return c * torch.sigmoid(self.gate(c.mean((2, 3), keepdim=True)))
