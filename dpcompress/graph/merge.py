"""Merge math: fold BatchNorm, compose convolutions, absorb identity shortcuts (pure tensor functions).

Every convolution here is an :class:`AffineConv`: zero padding applied once at its
input, then a dilation-1 ``conv2d`` with padding 0. Composing two such convs with no
nonlinearity in between is then exact: conv1 (kernel k1, stride s1, padding p1)
followed by conv2 (k2, s2, p2) equals one conv with kernel ``k1 + s1*(k2-1)``, stride
``s1*s2`` and padding ``p1 + s1*p2`` (per axis). That is how the padding-reordered
network runs a block: the block's total padding goes in front, the inner convs pad
nothing. Groups follow the structural channel connectivity (``dpcompress.graph.geometry``),
so a merged conv has exactly the grouping ``geometry.block_geometry`` predicts.
Once composed, ``crop_to_input`` drops the taps that only ever meet zero padding at
the block's input size (``geometry.crop_taps``), again as ``block_geometry`` predicts.

Composition runs in float64; results come back in the inputs' dtype unless asked.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from dpcompress.graph.geometry import composed_groups, composition_cost, crop_taps, total_padding

IntPair = Union[int, Sequence[int]]


def _pair(value: IntPair) -> Tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, str) or len(value) != 2:
        raise ValueError(f"expected an int or a pair of ints, got {value!r} (resolve paddings like 'same' first)")
    first, second = value
    return (int(first), int(second))


def fold_batchnorm(
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    gamma: Optional[torch.Tensor],
    beta: Optional[torch.Tensor],
    eps: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of one conv equal to ``conv`` then eval-mode BatchNorm.

    ``gamma``/``beta`` are None for ``affine=False``; ``eps`` must be the BN module's own.
    """
    scale = torch.rsqrt(running_var.double() + eps)
    if gamma is not None:
        scale = scale * gamma.double()
    conv_bias = torch.zeros_like(scale) if bias is None else bias.double()
    folded_bias = (conv_bias - running_mean.double()) * scale
    if beta is not None:
        folded_bias = folded_bias + beta.double()
    folded_weight = weight.double() * scale.reshape(-1, 1, 1, 1)
    return folded_weight.to(weight.dtype), folded_bias.to(weight.dtype)


def undilate(weight: torch.Tensor, dilation: IntPair) -> torch.Tensor:
    """The dense kernel of a dilated conv: taps spread ``dilation`` apart, zeros between."""
    dh, dw = _pair(dilation)
    if (dh, dw) == (1, 1):
        return weight
    out_channels, in_per_group, kh, kw = weight.shape
    dense = weight.new_zeros(out_channels, in_per_group, dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    dense[:, :, ::dh, ::dw] = weight
    return dense


def _change_groups(weight: torch.Tensor, groups: int, new_groups: int) -> torch.Tensor:
    """Grouped weight ``[out, in/groups, kh, kw]`` laid out for ``new_groups``, a divisor of ``groups``.

    Each coarse group holds ``groups // new_groups`` fine groups; a row's entries go to
    its fine group's slot inside the coarse group, the other slots are zero.
    """
    if groups % new_groups:
        raise ValueError(f"cannot relayout {groups} groups as {new_groups}: {new_groups} does not divide {groups}")
    out_channels, in_per_group = weight.shape[:2]
    if out_channels % groups:
        raise ValueError(f"{out_channels} output channels do not split into {groups} groups")
    fine_per_coarse = groups // new_groups
    fine_group = torch.arange(out_channels, device=weight.device) // (out_channels // groups)
    slots = weight.new_zeros(out_channels, fine_per_coarse, in_per_group, *weight.shape[2:])
    slots[torch.arange(out_channels, device=weight.device), fine_group % fine_per_coarse] = weight
    return slots.reshape(out_channels, fine_per_coarse * in_per_group, *weight.shape[2:])


def dense_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped weight ``[out, in/groups, kh, kw]`` as a dense ``[out, in, kh, kw]`` (zeros across groups)."""
    return _change_groups(weight, groups, 1)


def regroup(dense: torch.Tensor, groups: int) -> torch.Tensor:
    """Dense ``[out, in, kh, kw]`` in grouped layout ``[out, in/groups, kh, kw]``.

    Raises ValueError when an entry outside the block diagonal is nonzero: dropping it
    would change the conv.
    """
    out_channels, in_channels = dense.shape[:2]
    if out_channels % groups or in_channels % groups:
        raise ValueError(f"[{out_channels}, {in_channels}] channels do not split into {groups} groups")
    in_per_group = in_channels // groups
    blocks = dense.reshape(out_channels, groups, in_per_group, *dense.shape[2:])
    group = torch.arange(out_channels, device=dense.device) // (out_channels // groups)
    grouped = blocks[torch.arange(out_channels, device=dense.device), group]
    if torch.count_nonzero(grouped) != torch.count_nonzero(dense):
        raise ValueError(f"weight has nonzero entries across groups; it is not a {groups}-group conv")
    return grouped


@dataclass(frozen=True, eq=False)
class AffineConv:
    """A conv with zero padding applied once at its input, dilation 1, and a bias.

    ``weight`` is in PyTorch's grouped layout ``[out, in/groups, kh, kw]``.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    groups: int

    def __post_init__(self) -> None:
        if self.weight.dim() != 4:
            raise ValueError(f"conv weight must be 4-d [out, in/groups, kh, kw], got shape {tuple(self.weight.shape)}")
        if self.groups < 1 or self.out_channels % self.groups:
            raise ValueError(f"{self.out_channels} output channels do not split into {self.groups} groups")
        if tuple(self.bias.shape) != (self.out_channels,):
            raise ValueError(f"bias shape {tuple(self.bias.shape)} does not match {self.out_channels} output channels")
        if min(self.stride) < 1 or min(self.padding) < 0:
            raise ValueError(f"bad stride {self.stride} or padding {self.padding}")

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1]) * self.groups

    @property
    def kernel(self) -> Tuple[int, int]:
        return (int(self.weight.shape[2]), int(self.weight.shape[3]))

    @classmethod
    def from_conv(
        cls,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
    ) -> "AffineConv":
        """From an ``nn.Conv2d``'s parameters (zero padding mode; dilated kernels become dense)."""
        dense = undilate(weight, dilation)
        return cls(
            weight=dense,
            bias=weight.new_zeros(weight.shape[0]) if bias is None else bias,
            stride=_pair(stride), padding=_pair(padding), groups=int(groups),
        )

    def to(self, dtype: torch.dtype) -> "AffineConv":
        return AffineConv(self.weight.to(dtype), self.bias.to(dtype), self.stride, self.padding, self.groups)


def apply(conv: AffineConv, x: torch.Tensor) -> torch.Tensor:
    """Run ``conv`` on ``x``: zero-pad once, then a padding-free ``conv2d``."""
    ph, pw = conv.padding
    return F.conv2d(F.pad(x, (pw, pw, ph, ph)), conv.weight, conv.bias, stride=conv.stride, groups=conv.groups)


def _compose_kernels(w1: torch.Tensor, w2: torch.Tensor, stride1: Tuple[int, int], groups: int) -> torch.Tensor:
    """Kernel of ``w2 ∘ w1`` (both laid out with ``groups``): ``[c2, c0/g, k1 + s1*(k2-1)]`` per axis.

    ``K[o, c, s1*t2 + t1] = sum_m W2[o, m, t2] W1[m, c, t1]``: for each tap t2 of the second
    kernel, one batched matmul over the groups gives a whole shifted copy of W1's taps.
    (This is ``conv_transpose2d(W2, W1, stride=s1)``, done as matmuls: several times
    faster in float64 on CPU, and never larger in memory than the result.)
    """
    c2, mid_per_group, k2h, k2w = w2.shape
    c1, in_per_group, k1h, k1w = w1.shape
    s1h, s1w = stride1
    kernel = w2.new_zeros(c2, in_per_group, k1h + s1h * (k2h - 1), k1w + s1w * (k2w - 1))
    w2_taps = w2.reshape(groups, c2 // groups, mid_per_group, k2h, k2w)
    w1_rows = w1.reshape(groups, c1 // groups, in_per_group * k1h * k1w)
    for i in range(k2h):
        for j in range(k2w):
            shifted = torch.bmm(w2_taps[..., i, j], w1_rows).reshape(c2, in_per_group, k1h, k1w)
            kernel[:, :, s1h * i:s1h * i + k1h, s1w * j:s1w * j + k1w] += shifted
    return kernel


def compose(first: AffineConv, second: AffineConv, dtype: Optional[torch.dtype] = None) -> AffineConv:
    """``second ∘ first`` as one conv (no nonlinearity between), exact with padding applied once at the input.

    The result keeps the largest grouping that is exact for the structural channel
    connectivity: depthwise after depthwise stays depthwise, a dense conv anywhere makes
    it dense. ``dtype`` defaults to the promoted dtype of the two weights.
    """
    if second.in_channels != first.out_channels:
        raise ValueError(f"cannot compose: first gives {first.out_channels} channels, "
                         f"second takes {second.in_channels}")
    out_dtype = dtype or torch.promote_types(first.weight.dtype, second.weight.dtype)
    c0, c1, c2 = first.in_channels, first.out_channels, second.out_channels
    groups = composed_groups(c0, c1, c2, first.groups, second.groups)
    # An exact grouping never splits either conv's own groups, so both weights can be
    # re-laid out with the coarser ``groups`` and composed group by group.
    w1 = _change_groups(first.weight.double(), first.groups, groups)  # [c1, c0/g, k1h, k1w]
    w2 = _change_groups(second.weight.double(), second.groups, groups)  # [c2, c1/g, k2h, k2w]
    kernel = _compose_kernels(w1, w2, first.stride, groups)
    # The first conv's bias passes through every tap of the second conv's kernel.
    b1 = first.bias.double().reshape(second.groups, c1 // second.groups)
    second_group = torch.arange(c2, device=second.weight.device) // (c2 // second.groups)
    bias = second.bias.double() + (second.weight.double().sum(dim=(2, 3)) * b1[second_group]).sum(dim=1)
    stride = (first.stride[0] * second.stride[0], first.stride[1] * second.stride[1])
    padding = (
        first.padding[0] + first.stride[0] * second.padding[0],
        first.padding[1] + first.stride[1] * second.padding[1],
    )
    return AffineConv(kernel.to(out_dtype), bias.to(out_dtype), stride, padding, groups)


def compose_all(convs: Sequence[AffineConv], dtype: Optional[torch.dtype] = None) -> AffineConv:
    """``convs[-1] ∘ ... ∘ convs[0]`` as one conv, composed in float64 throughout."""
    if not convs:
        raise ValueError("compose_all needs at least one conv")
    out_dtype = dtype or convs[0].weight.dtype
    merged = convs[0].to(torch.float64)
    for conv in convs[1:]:
        merged = compose(merged, conv, dtype=torch.float64)
    return merged.to(out_dtype)


def crop_to_input(conv: AffineConv, size: Tuple[int, int]) -> AffineConv:
    """``conv`` without the kernel taps that only ever multiply zero padding on an (H, W) = ``size`` input.

    Same output on inputs of that size (``geometry.crop_taps`` gives the rule); the padding
    shrinks by the leading taps dropped and stays one value per axis.
    """
    (lead_h, trail_h), (lead_w, trail_w) = (
        crop_taps(conv.kernel[axis], conv.stride[axis], conv.padding[axis], size[axis]) for axis in range(2))
    kh, kw = conv.kernel
    # A copy, so that the uncropped kernel (possibly huge) is freed with ``conv``.
    weight = conv.weight[:, :, lead_h:kh - trail_h, lead_w:kw - trail_w].clone()
    return AffineConv(weight, conv.bias, conv.stride, (conv.padding[0] - lead_h, conv.padding[1] - lead_w),
                      conv.groups)


def compose_cropped(convs: Sequence[AffineConv], size: Tuple[int, int],
                    dtype: Optional[torch.dtype] = None) -> AffineConv:
    """``crop_to_input(compose_all(convs), size)`` (same outputs on inputs of ``size``), in less memory.

    Composition treats the convs as the padding-reordered block runs them: the total padding at
    the input, none inside. Then what the convs composed so far compute on that padded input is
    exactly the tensor the next conv reads, so the taps of the partial kernel that only meet zero
    padding there can be dropped after every step (``crop_to_input``) and the rest composes as
    before. Early steps drop little (the later convs read all of their padded output), the last
    ones most: mnasnet0_75's block (21, 51) at 64x64 composes a 93x93 kernel in 2.0 GiB instead
    of 4.8 (``geometry.composition_cost`` gives both). Cropping in steps can drop taps that one crop
    of the full kernel keeps (the full kernel's single padding value pins them), so the result is
    laid out on the full crop's window (``with_window``): the conv ``block_geometry`` describes.
    """
    if not convs:
        raise ValueError("compose_cropped needs at least one conv")
    out_dtype = dtype or convs[0].weight.dtype
    padding = total_padding(convs)
    shifted = [replace(conv, padding=padding if index == 0 else (0, 0)) for index, conv in enumerate(convs)]
    merged = crop_to_input(shifted[0].to(torch.float64), size)
    for conv in shifted[1:]:
        merged = crop_to_input(compose(merged, conv, dtype=torch.float64), size)
    full = composition_cost(convs).kernel
    crops = [crop_taps(full[axis], merged.stride[axis], padding[axis], size[axis]) for axis in range(2)]
    window = with_window(merged, (full[0] - sum(crops[0]), full[1] - sum(crops[1])),
                         (padding[0] - crops[0][0], padding[1] - crops[1][0]), size)
    return window.to(out_dtype)


def with_window(conv: AffineConv, kernel: Tuple[int, int], padding: Tuple[int, int],
                size: Tuple[int, int]) -> AffineConv:
    """``conv`` with its taps laid out on a ``kernel`` window at ``padding``: taps the new window adds
    are zero; taps it leaves out must be zero or only meet zero padding on an input of ``size``
    (ValueError if not).

    Tap t of ``conv`` reads input pixel ``o*stride + t - conv.padding`` for output o; it is tap
    ``t + padding - conv.padding`` of the new window, which reads the same pixel.
    """
    if kernel == conv.kernel and padding == conv.padding:
        return conv
    for axis in range(2):
        outputs = (size[axis] + 2 * conv.padding[axis] - conv.kernel[axis]) // conv.stride[axis] + 1
        if (size[axis] + 2 * padding[axis] - kernel[axis]) // conv.stride[axis] + 1 != outputs:
            raise ValueError(f"a {kernel} window at padding {padding} changes the number of outputs of {conv.kernel}")
    shift = (padding[0] - conv.padding[0], padding[1] - conv.padding[1])
    weight = conv.weight.new_zeros(conv.out_channels, conv.weight.shape[1], *kernel)
    # Old taps [lo, hi) per axis land in the new window where 0 <= t + shift < kernel.
    lo = [max(0, -shift[axis]) for axis in range(2)]
    hi = [min(conv.kernel[axis], kernel[axis] - shift[axis]) for axis in range(2)]
    kept = conv.weight[:, :, lo[0]:hi[0], lo[1]:hi[1]]
    weight[:, :, lo[0] + shift[0]:hi[0] + shift[0], lo[1] + shift[1]:hi[1] + shift[1]] = kept
    dropped = torch.ones(conv.kernel, dtype=torch.bool)
    dropped[lo[0]:hi[0], lo[1]:hi[1]] = False
    for axis in range(2):
        # Taps that meet the input for some output: p - (n-1)*s <= t <= p + size - 1.
        outputs = (size[axis] + 2 * conv.padding[axis] - conv.kernel[axis]) // conv.stride[axis] + 1
        first = max(0, conv.padding[axis] - (outputs - 1) * conv.stride[axis])
        last = min(conv.kernel[axis] - 1, conv.padding[axis] + size[axis] - 1)
        meets = torch.zeros(conv.kernel[axis], dtype=torch.bool)
        meets[first:last + 1] = True
        dropped &= meets[:, None] if axis == 0 else meets[None, :]
    if torch.count_nonzero(conv.weight[:, :, dropped]):
        raise ValueError(f"a {kernel} window at padding {padding} leaves out nonzero taps of {conv.kernel} "
                         f"that meet an input of {size}")
    return AffineConv(weight, conv.bias, conv.stride, padding, conv.groups)


def add_identity(conv: AffineConv) -> AffineConv:
    """``f(x) + x`` as one conv: the identity becomes a 1 at tap (padding_h, padding_w) of channel o→o.

    That tap is where output pixel (0, 0) reads input pixel (0, 0) of the unpadded
    input, i.e. the shortcut is the padded input cropped by ``conv.padding``.
    """
    if conv.in_channels != conv.out_channels:
        raise ValueError(f"identity shortcut needs in == out channels, got {conv.in_channels} -> {conv.out_channels}")
    if conv.stride != (1, 1):
        raise ValueError(f"identity shortcut needs stride 1, got {conv.stride}")
    ph, pw = conv.padding
    kh, kw = conv.kernel
    if ph >= kh or pw >= kw:
        raise ValueError(f"identity tap ({ph}, {pw}) lies outside the {kh}x{kw} kernel")
    channels = conv.out_channels
    # Square groups (in == out) always contain their diagonal, so the grouping stays exact.
    per_group = channels // conv.groups
    weight = conv.weight.clone()
    rows = torch.arange(channels, device=weight.device)
    weight[rows, rows % per_group, ph, pw] += 1
    return AffineConv(weight, conv.bias, conv.stride, conv.padding, conv.groups)


def to_conv2d(conv: AffineConv) -> torch.nn.Conv2d:
    """An ``nn.Conv2d`` computing ``conv`` (symmetric zero padding), weights copied."""
    module = torch.nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel, stride=conv.stride, padding=conv.padding,
        groups=conv.groups, bias=True, device=conv.weight.device, dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        module.weight.copy_(conv.weight)
        module.bias.copy_(conv.bias)
    return module
