"""A deterministic backend for tests: a network's 'latency' is a cost model of its convs."""

from __future__ import annotations

from typing import Callable, List, Sequence

import torch
from torch import nn

from dpcompress.backends import Backend, Runner

PER_CONV_MS = 0.05  # a fixed cost per conv, so that merging pays off in this cost model


def conv_cost(module: nn.Module, input_shape: Sequence[int], factor: Callable[[nn.Conv2d], float]) -> float:
    """Sum over the convs run by ``module`` of a fixed cost plus their multiply-adds (in millions) times
    ``factor(conv)``."""
    total = [0.0]

    def hook(conv: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        kh, kw = conv.kernel_size
        total[0] += PER_CONV_MS + factor(conv) * output.numel() * conv.in_channels // conv.groups * kh * kw / 1e6

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        module.eval()(torch.zeros(*input_shape))
    for handle in handles:
        handle.remove()
    return total[0]


class CostRunner(Runner):
    def __init__(self, ms: float) -> None:
        self.ms = ms

    def time(self, warmup: int, iters: int) -> List[float]:
        return [self.ms] * iters


class CostBackend(Backend):
    """'Measures' a network as the cost of its convs, each weighted by ``factor``."""

    name = "cost"
    device = "cpu"

    def __init__(self, factor: Callable[[nn.Conv2d], float] = lambda conv: 1.0) -> None:
        self.factor = factor

    @property
    def version(self) -> str:
        return "1"

    @property
    def device_name(self) -> str:
        return "cost model"

    def prepare(self, module: nn.Module, input_shape: Sequence[int], precision: str = "fp32") -> Runner:
        return CostRunner(conv_cost(module, input_shape, self.factor))
