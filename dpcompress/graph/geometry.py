"""Shape arithmetic of merged convolutions, without weights (numpy only).

Composing conv1 (kernel k1, stride s1, padding p1) then conv2 (k2, s2, p2) with
the padding applied once at the input gives kernel ``k1 + s1*(k2-1)``, stride
``s1*s2`` and padding ``p1 + s1*p2``. Dilated kernels count with their dilated
extent ``d*(k-1)+1``. Groups follow the channel connectivity: the merged conv
keeps the largest grouping under which it is still exact. A merged kernel can be
far larger than its input; ``crop_taps`` says which of its taps only ever meet zero
padding at the block's input size, and the merged conv leaves them out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from dpcompress.graph.chain import Chain


def connectivity(in_channels: int, out_channels: int, groups: int) -> np.ndarray:
    """Boolean [out, in] mask: which input channels each output channel of a grouped conv reads."""
    out_group = np.arange(out_channels) // (out_channels // groups)
    in_group = np.arange(in_channels) // (in_channels // groups)
    return out_group[:, None] == in_group[None, :]


def compose_connectivity(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Mask of ``second ∘ first``: output reads input when some middle channel links them."""
    # float32 matmul is exact here (counts stay far below 2**24) and far faster than int64.
    return (second.astype(np.float32) @ first.astype(np.float32)) > 0


def largest_exact_groups(mask: np.ndarray) -> int:
    """The largest g dividing both channel counts whose block-diagonal structure covers ``mask``."""
    out_channels, in_channels = mask.shape
    rows, cols = np.nonzero(mask)
    for g in range(min(out_channels, in_channels), 0, -1):
        if out_channels % g or in_channels % g:
            continue
        if np.array_equal(rows // (out_channels // g), cols // (in_channels // g)):
            return g
    return 1


def crop_taps(kernel: int, stride: int, padding: int, size: int) -> Tuple[int, int]:
    """Leading and trailing taps (per axis) a conv can drop on an input of ``size``, keeping one padding value.

    Output o's tap t reads input ``o*stride + t - padding``, a real pixel for t in
    ``[padding - o*stride, padding + size - 1 - o*stride]``. Of the n outputs, those whose range
    meets the kernel are o in [first, last], so the first ``a = max(0, padding - last*stride)``
    and the last ``b = max(0, kernel - padding - size + first*stride)`` taps only ever multiply
    zero padding. Dropping a' leading and b' trailing taps with padding ``padding - a'`` on
    *both* sides keeps output o reading the same pixels, and keeps n outputs iff
    ``0 <= r - a' + b' < stride``, where ``r = size + 2*padding - kernel - (n-1)*stride`` are the
    padded rows the last window leaves unread. One padding value per axis keeps the conv a plain
    ``nn.Conv2d`` (profiling, ONNX, TensorRT), and costs nothing in the case that matters: a
    kernel overhanging both ends of an input that every output reads has ``b - a = -r``, so all
    of a and b go. Returns (0, 0) when no tap meets the input (the output is the bias alone).
    """
    outputs = (size + 2 * padding - kernel) // stride + 1
    if size < 1 or outputs < 1:
        raise ValueError(f"a kernel of {kernel} with padding {padding} has no output on an input of {size}")
    first = max(0, -((kernel - 1 - padding) // stride))  # ceil((padding - kernel + 1) / stride)
    last = min(outputs - 1, (padding + size - 1) // stride)
    if first > last:
        return (0, 0)
    lead = max(0, padding - last * stride)
    trail = max(0, kernel - padding - size + first * stride)
    unread = size + 2 * padding - kernel - (outputs - 1) * stride
    lead = min(lead, trail + unread)
    return (lead, min(trail, lead + stride - 1 - unread))


@dataclass(frozen=True)
class BlockGeometry:
    """What block (start, end) becomes: one convolution, plus the activation at ``end``.

    ``kernel`` and ``padding`` are those of the merged conv as built, cropped to the block's
    input size (``crop_taps``); ``composed_kernel`` is the kernel composition computes before
    cropping, which is what merging the block costs.
    """

    start: int
    end: int
    in_channels: int
    out_channels: int
    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    groups: int
    in_shape: Tuple[int, int, int, int]
    out_shape: Tuple[int, int, int, int]
    activation: Optional[str]
    bias: bool
    composed_kernel: Tuple[int, int]


def effective_kernel(kernel: Sequence[int], dilation: Sequence[int]) -> Tuple[int, int]:
    return (dilation[0] * (kernel[0] - 1) + 1, dilation[1] * (kernel[1] - 1) + 1)


def block_geometry(chain: Chain, start: int, end: int) -> BlockGeometry:
    """The merged convolution that valid block (start, end) of ``chain`` turns into."""
    if not chain.is_valid_block(start, end):
        raise ValueError(f"({start}, {end}) is not a valid block of this chain")
    first = chain.unit(start + 1)
    kernel = list(effective_kernel(first.kernel, first.dilation))
    stride = list(first.stride)
    padding = list(first.padding)
    # Connectivity masks per position, so that identity residuals can be OR-ed in.
    mask_at = {start: np.eye(first.in_channels, dtype=bool)}
    mask = connectivity(first.in_channels, first.out_channels, first.groups)
    mask_at[start + 1] = mask
    has_bias = first.bias or first.batchnorm is not None
    for p in range(start + 2, end + 1):
        u = chain.unit(p)
        k = effective_kernel(u.kernel, u.dilation)
        for axis in range(2):
            kernel[axis] += stride[axis] * (k[axis] - 1)
            padding[axis] += stride[axis] * u.padding[axis]
            stride[axis] *= u.stride[axis]
        mask = compose_connectivity(mask, connectivity(u.in_channels, u.out_channels, u.groups))
        mask_at[p] = mask
        has_bias = has_bias or u.bias or u.batchnorm is not None
    for r in chain.residuals_inside(start, end):
        # x_end = f(x_start) + x_start: the shortcut carries x_start's own connectivity.
        mask = mask_at[r.end] | mask_at[r.start]
        mask_at[r.end] = mask
        for p in range(r.end + 1, end + 1):
            u = chain.unit(p)
            mask = compose_connectivity(mask, connectivity(u.in_channels, u.out_channels, u.groups))
            mask_at[p] = mask
    last = chain.unit(end)
    crops = [crop_taps(kernel[axis], stride[axis], padding[axis], first.in_shape[2 + axis]) for axis in range(2)]
    return BlockGeometry(
        start=start, end=end,
        in_channels=first.in_channels, out_channels=last.out_channels,
        kernel=(kernel[0] - sum(crops[0]), kernel[1] - sum(crops[1])), stride=(stride[0], stride[1]),
        padding=(padding[0] - crops[0][0], padding[1] - crops[1][0]),
        groups=largest_exact_groups(mask_at[end]),
        in_shape=first.in_shape, out_shape=last.out_shape,
        activation=last.activation, bias=has_bias, composed_kernel=(kernel[0], kernel[1]),
    )


def greedy_boundaries(chain: Chain, start: int, end: int, max_kernel: Optional[int] = None) -> List[int]:
    """Split (start, end) into valid blocks greedily, each as long as possible.

    With ``max_kernel``, a block grows only while its merged kernel stays within that
    size (single-conv blocks are always allowed). Returns the inner boundaries.
    Raises ValueError when (start, end) cannot be covered by valid blocks.
    """
    inner: List[int] = []
    position = start
    while position < end:
        best = None
        for stop in range(position + 1, end + 1):
            if not chain.is_valid_block(position, stop):
                continue
            if stop > position + 1 and max_kernel is not None and \
                    max(block_geometry(chain, position, stop).kernel) > max_kernel:
                continue
            best = stop
        if best is None:
            raise ValueError(f"({position}, {end}) cannot be split into valid blocks")
        if best < end:
            inner.append(best)
        position = best
    return inner
