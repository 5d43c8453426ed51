"""Random convs as nn.Conv2d holds them (hypothesis strategies), and the reference they are checked
against: the convs run one after another in float64, with all padding applied once at the input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from dpcompress.graph import merge

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEWER = settings(SETTINGS, max_examples=50)  # for properties that other tests already exercise in part


@dataclass
class Spec:
    """One conv as nn.Conv2d would hold it (dilated weight, own padding)."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    def extent(self, axis: int) -> int:
        return self.dilation[axis] * (self.weight.shape[2 + axis] - 1) + 1

    def affine(self) -> merge.AffineConv:
        return merge.AffineConv.from_conv(self.weight, self.bias, self.stride, self.padding, self.dilation,
                                          self.groups)

    def run_unpadded(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def conv_specs(draw, in_channels: int, out_channels: Optional[int] = None, stride_one: bool = False) -> Spec:
    """A random conv reading ``in_channels``: dense, grouped, depthwise or depthwise-multiplier."""
    kind = draw(st.sampled_from(["dense", "grouped", "depthwise", "multiplier"]))
    if out_channels is None:
        if kind == "depthwise":
            out_channels = in_channels
        elif kind == "multiplier":
            out_channels = in_channels * draw(st.integers(2, 3))
        else:
            out_channels = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    common = [d for d in divisors(in_channels) if out_channels % d == 0]
    if kind in ("depthwise", "multiplier") and in_channels in common:
        groups = in_channels
    elif kind == "dense":
        groups = 1
    else:
        groups = draw(st.sampled_from(common))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    stride = (1, 1) if stride_one else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_channels, in_channels // groups, kh, kw, generator=generator, dtype=torch.float64)
    bias = torch.randn(out_channels, generator=generator, dtype=torch.float64) if draw(st.booleans()) else None
    return Spec(weight, bias, stride, padding, dilation, groups)


@st.composite
def conv_chains(draw, min_len: int = 2, max_len: int = 4) -> List[Spec]:
    channels = draw(st.sampled_from([1, 2, 3, 4, 6]))
    specs = []
    for _ in range(draw(st.integers(min_len, max_len))):
        spec = draw(conv_specs(channels))
        specs.append(spec)
        channels = spec.out_channels
    return specs


def total_padding(specs: Sequence[Spec]) -> Tuple[int, int]:
    """p1 + s1*p2 + s1*s2*p3 + ...: each conv's padding moved to the chain's input."""
    total, scale = [0, 0], [1, 1]
    for spec in specs:
        for axis in range(2):
            total[axis] += scale[axis] * spec.padding[axis]
            scale[axis] *= spec.stride[axis]
    return total[0], total[1]


def min_input(specs: Sequence[Spec], axis: int) -> int:
    """The smallest unpadded input size for which every conv in sequence still has an output pixel."""
    size = 1
    for spec in reversed(specs):
        size = (size - 1) * spec.stride[axis] + spec.extent(axis)
    return max(1, size - 2 * total_padding(specs)[axis])


def run_sequence(specs: Sequence[Spec], x: torch.Tensor) -> torch.Tensor:
    ph, pw = total_padding(specs)
    x = F.pad(x, (pw, pw, ph, ph))
    for spec in specs:
        x = spec.run_unpadded(x)
    return x


def random_input(channels: int, height: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, channels, height, width, generator=generator, dtype=torch.float64)
