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

import os
from dataclasses import dataclass
from typing import Dict, FrozenSet, List, NamedTuple, Optional, Protocol, Sequence, Tuple

import numpy as np

from dpcompress.errors import UserError
from dpcompress.graph.chain import Chain

MAX_MERGE_BYTES_ENV = "DPCOMPRESS_MAX_MERGE_BYTES"
DEFAULT_MAX_MERGE_BYTES = 2 * 2**30  # with the rest of a run, under 4 GB


def max_merge_bytes() -> int:
    """The most memory composing one block may take: ``$DPCOMPRESS_MAX_MERGE_BYTES`` or 2 GiB."""
    value = os.environ.get(MAX_MERGE_BYTES_ENV)
    if value is None:
        return DEFAULT_MAX_MERGE_BYTES
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        raise UserError(f"{MAX_MERGE_BYTES_ENV}={value!r} must be a positive number of bytes")
    return limit


def size_text(n_bytes: int) -> str:
    """``n_bytes`` for a message: bytes, KiB, MiB, GiB or TiB."""
    if n_bytes < 1024:
        return f"{n_bytes} bytes"
    size = n_bytes / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


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


def _composed_group_links(mid_channels: int, first_groups: int, second_groups: int) -> np.ndarray:
    """Boolean [second_groups, first_groups]: second's group a reads some middle channel of first's group b.

    The middle channels of group a form one interval, and so do first's group b's
    outputs; the groups link iff the intervals overlap.
    """
    second_width = mid_channels // second_groups
    first_width = mid_channels // first_groups
    a = np.arange(second_groups)[:, None]
    b = np.arange(first_groups)[None, :]
    return (a * second_width < (b + 1) * first_width) & (b * first_width < (a + 1) * second_width)


def composed_connectivity(
    in_channels: int, mid_channels: int, out_channels: int, first_groups: int, second_groups: int
) -> np.ndarray:
    """Structural [out, in] mask of a ``second_groups`` conv after a ``first_groups`` conv.

    Equal to ``compose_connectivity(connectivity(...), connectivity(...))``,
    built from group intervals in O(out*in) rather than a channel-by-channel product
    (which takes tens of seconds at 2048 channels).
    """
    links = _composed_group_links(mid_channels, first_groups, second_groups)
    return np.repeat(np.repeat(links, out_channels // second_groups, axis=0), in_channels // first_groups, axis=1)


def composed_groups(in_channels: int, mid_channels: int, out_channels: int, first_groups: int,
                    second_groups: int) -> int:
    """The largest exact grouping of a ``second_groups`` conv after a ``first_groups`` conv.

    A dense conv on either side makes it dense and depthwise after depthwise stays depthwise,
    without the [out, in] mask (whose group search takes seconds at thousands of channels).
    """
    if first_groups == 1 or second_groups == 1:
        return 1
    if first_groups == in_channels == mid_channels and second_groups == mid_channels == out_channels:
        return in_channels
    return largest_exact_groups(
        composed_connectivity(in_channels, mid_channels, out_channels, first_groups, second_groups))


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


class ConvShape(Protocol):
    """What composing a conv costs depends on: ``merge.AffineConv`` has these, and so does :class:`ShapeOnly`."""

    @property
    def in_channels(self) -> int: ...
    @property
    def out_channels(self) -> int: ...
    @property
    def kernel(self) -> Tuple[int, int]: ...
    @property
    def stride(self) -> Tuple[int, int]: ...
    @property
    def padding(self) -> Tuple[int, int]: ...
    @property
    def groups(self) -> int: ...


class ShapeOnly(NamedTuple):
    """A conv's shape without weights (dilation already expanded into ``kernel``)."""

    in_channels: int
    out_channels: int
    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    groups: int


@dataclass(frozen=True)
class CompositionCost:
    """What composing some convs builds, known before building it."""

    kernel: Tuple[int, int]  # of the composed conv, before any cropping
    groups: int
    bytes: int  # float64 weights held at the costliest step


def total_padding(convs: Sequence[ConvShape]) -> Tuple[int, int]:
    """The padding at the input of the composed conv: ``p1 + s1*(p2 + s2*(...))`` per axis."""
    padding, scale = [0, 0], [1, 1]
    for conv in convs:
        for axis in range(2):
            padding[axis] += scale[axis] * conv.padding[axis]
            scale[axis] *= conv.stride[axis]
    return padding[0], padding[1]


def composition_cost(convs: Sequence[ConvShape], in_size: Optional[Tuple[int, int]] = None) -> CompositionCost:
    """The composed kernel, grouping and peak memory of composing ``convs`` in order, from shapes alone.

    Each step holds the kernel composed so far, its copy laid out in the step's grouping,
    and the step's result, all in float64; the peak is the costliest step. Without ``in_size``
    that is ``merge.compose_all``; with it, ``merge.compose_cropped``, which crops the kernel
    composed so far to the taps that can meet an input of that size after every step, so that
    a long block costs what its cropped kernels hold, not its full kernel.
    """
    first = convs[0]
    in_channels, out_channels = first.in_channels, first.out_channels
    kernel, stride, groups = tuple(first.kernel), tuple(first.stride), first.groups
    full = kernel
    padding = total_padding(convs)

    def cropped(kernel: Tuple[int, ...], padding: Tuple[int, ...]) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        if in_size is None:
            return (kernel[0], kernel[1]), (padding[0], padding[1])
        crops = [crop_taps(kernel[axis], stride[axis], padding[axis], in_size[axis]) for axis in range(2)]
        return ((kernel[0] - sum(crops[0]), kernel[1] - sum(crops[1])),
                (padding[0] - crops[0][0], padding[1] - crops[1][0]))

    kernel, padding = cropped(kernel, padding)
    peak = 0
    for conv in convs[1:]:
        step_groups = composed_groups(in_channels, out_channels, conv.out_channels, groups, conv.groups)
        step_kernel = (kernel[0] + stride[0] * (conv.kernel[0] - 1), kernel[1] + stride[1] * (conv.kernel[1] - 1))
        held = out_channels * kernel[0] * kernel[1] * (in_channels // groups + in_channels // step_groups) \
            + conv.out_channels * step_kernel[0] * step_kernel[1] * (in_channels // step_groups)
        peak = max(peak, held)
        full = (full[0] + stride[0] * (conv.kernel[0] - 1), full[1] + stride[1] * (conv.kernel[1] - 1))
        out_channels, groups = conv.out_channels, step_groups
        stride = (stride[0] * conv.stride[0], stride[1] * conv.stride[1])
        kernel, padding = cropped(step_kernel, padding)
    return CompositionCost((full[0], full[1]), groups, 8 * peak)


def merge_bytes(convs: Sequence[Tuple[int, ConvShape]], residuals: Sequence[Tuple[int, int]],
                in_size: Tuple[int, int]) -> int:
    """Peak memory of merging a block: ``convs`` are its kept convs by local position (1..length),
    ``residuals`` its identity shortcuts as (start, end) local positions.

    As ``rewrite.ReorderedBlock.merged`` builds it: each shortcut's body composed in full, then
    the block's convs composed with cropping to ``in_size``. The whole block is costed from its
    convs one by one (the shortcuts only add an identity tap to their composed body), so a
    residual's inner steps are costed at their own, widest, channels: that errs high, not low.
    """
    if not convs:
        return 0
    bodies = [[conv for position, conv in convs if start < position <= end] for start, end in residuals]
    costs = [composition_cost(body).bytes for body in bodies if body]
    costs.append(composition_cost([conv for _, conv in convs], in_size).bytes)
    return max(costs)


@dataclass(frozen=True)
class BlockGeometry:
    """What block (start, end) becomes: one convolution, plus the activation at ``end``.

    ``kernel`` and ``padding`` are those of the merged conv as built, cropped to the block's
    input size (``crop_taps``); ``composed_kernel`` is the kernel composition computes before
    cropping, which is what merging the block costs.

    With pruned convs (identity, LayerMerge's search space) the conv is the merge of the convs
    that remain. ``identity`` is True when none remains and no shortcut lies inside: the block is
    ``nn.Identity`` and costs nothing; its conv fields then describe the 1x1 depthwise conv of
    the block's shape without bias. Where none remains but identity shortcuts lie inside, the
    block is ``x`` scaled by 2 per shortcut: exactly that 1x1 depthwise conv, and not an identity.
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
    identity: bool = False

    @property
    def conv_key(self) -> Tuple:
        """What tells two merged convs of the same block apart: channels, kernel, stride, padding,
        groups, and whether there is a conv at all."""
        return (self.in_channels, self.out_channels, self.kernel, self.stride, self.padding, self.groups,
                self.identity)


def effective_kernel(kernel: Sequence[int], dilation: Sequence[int]) -> Tuple[int, int]:
    return (dilation[0] * (kernel[0] - 1) + 1, dilation[1] * (kernel[1] - 1) + 1)


class _Connectivity:
    """Channel connectivity of a composition so far, without building the masks that do not matter:
    None stands for the identity (nothing composed yet, or only pruned convs), and once the mask is
    dense it stays dense (every channel of a conv reads some channel), so dense convs of 2048
    channels cost nothing to compose."""

    def __init__(self, channels: int):
        self.channels = channels
        self.mask: Optional[np.ndarray] = None
        self.dense = False

    def then(self, in_channels: int, out_channels: int, groups: int) -> None:
        self.channels = out_channels
        if self.dense or groups == 1:
            self.mask, self.dense = None, True
        elif groups == in_channels == out_channels:
            pass  # depthwise: each channel reads itself, as the identity does
        elif self.mask is None:
            self.mask = connectivity(in_channels, out_channels, groups)
        else:
            self.mask = compose_connectivity(self.mask, connectivity(in_channels, out_channels, groups))

    def add_shortcut(self, shortcut: "_Connectivity") -> None:
        """OR in the connectivity of an identity shortcut (same channels)."""
        if self.dense or (self.mask is None and shortcut.mask is None and not shortcut.dense):
            return  # dense stays dense; identity or identity is the identity
        if shortcut.dense:
            self.mask, self.dense = None, True
        elif self.mask is None or shortcut.mask is None:
            eye = np.eye(self.channels, dtype=bool)
            self.mask = (eye if self.mask is None else self.mask) | (eye if shortcut.mask is None else shortcut.mask)
        else:
            self.mask = self.mask | shortcut.mask

    def copy(self) -> "_Connectivity":
        other = _Connectivity(self.channels)
        other.mask, other.dense = self.mask, self.dense
        return other

    def groups(self, in_channels: int) -> int:
        if self.dense:
            return 1
        if self.mask is None:
            return in_channels  # the identity: depthwise
        return largest_exact_groups(self.mask)


def check_pruned(chain: Chain, start: int, end: int, pruned: Sequence[int]) -> None:
    """ValueError unless ``pruned`` are reducible convs of block (start, end)."""
    for p in pruned:
        if not start < p <= end:
            raise ValueError(f"pruned conv {p} is not in block ({start}, {end})")
        if not chain.unit(p).reducible:
            raise ValueError(f"conv {p} cannot be pruned: it changes its input's shape or has a stride")


def block_geometry(chain: Chain, start: int, end: int, pruned: Sequence[int] = ()) -> BlockGeometry:
    """The merged convolution that valid block (start, end) of ``chain`` turns into, with the convs
    at ``pruned`` (reducible ones) replaced by identity: no kernel, no padding, no stride."""
    if not chain.is_valid_block(start, end):
        raise ValueError(f"({start}, {end}) is not a valid block of this chain")
    check_pruned(chain, start, end, pruned)
    first = chain.unit(start + 1)
    kernel, stride, padding = [1, 1], [1, 1], [0, 0]
    # Connectivity per position, so that identity residuals can be OR-ed in.
    composed = _Connectivity(first.in_channels)
    at: Dict[int, _Connectivity] = {start: composed.copy()}
    shortcuts = {r.end: r.start for r in chain.residuals_inside(start, end)}
    has_bias = False
    for p in range(start + 1, end + 1):
        u = chain.unit(p)
        if p not in pruned:
            k = effective_kernel(u.kernel, u.dilation)
            for axis in range(2):
                kernel[axis] += stride[axis] * (k[axis] - 1)
                padding[axis] += stride[axis] * u.padding[axis]
                stride[axis] *= u.stride[axis]
            composed.then(u.in_channels, u.out_channels, u.groups)
            has_bias = has_bias or u.bias or u.batchnorm is not None
        if p in shortcuts:
            # x_p = f(x_start) + x_start: the shortcut carries x_start's own connectivity.
            composed.add_shortcut(at[shortcuts[p]])
        at[p] = composed.copy()
    last = chain.unit(end)
    crops = [crop_taps(kernel[axis], stride[axis], padding[axis], first.in_shape[2 + axis]) for axis in range(2)]
    return BlockGeometry(
        start=start, end=end,
        in_channels=first.in_channels, out_channels=last.out_channels,
        kernel=(kernel[0] - sum(crops[0]), kernel[1] - sum(crops[1])), stride=(stride[0], stride[1]),
        padding=(padding[0] - crops[0][0], padding[1] - crops[1][0]),
        groups=composed.groups(first.in_channels),
        in_shape=first.in_shape, out_shape=last.out_shape,
        activation=last.activation, bias=has_bias, composed_kernel=(kernel[0], kernel[1]),
        identity=len(pruned) == end - start and not shortcuts,
    )


def block_merge_bytes(chain: Chain, start: int, end: int, pruned: Sequence[int] = ()) -> int:
    """Peak memory of merging valid block (start, end) of ``chain`` with the convs at ``pruned``
    replaced by identity (:func:`merge_bytes`): what export and bench would take to build it."""
    first = chain.unit(start + 1)
    kept = [(p - start, ShapeOnly(u.in_channels, u.out_channels, effective_kernel(u.kernel, u.dilation),
                                  tuple(u.stride), tuple(u.padding), u.groups))
            for p, u in ((p, chain.unit(p)) for p in range(start + 1, end + 1)) if p not in pruned]
    residuals = [(r.start - start, r.end - start) for r in chain.residuals_inside(start, end)]
    return merge_bytes(kept, residuals, (first.in_shape[2], first.in_shape[3]))


# Non-empty pruned sets listed per block, at most (see pruning_options).
MAX_PRUNING_OPTIONS = 8


def pruning_options(chain: Chain, start: int, end: int) -> List[Tuple[int, ...]]:
    """The pruned sets of valid block (start, end) worth a table row: one per distinct merged conv
    (``BlockGeometry.conv_key``), the empty set first, the others by how many convs they prune.

    Many sets give the same merged conv (pruning either of two 3x3 convs leaves a 3x3); a table
    keeps one per conv, so that the options per block stay few: about one per merged kernel size.
    Of the sets giving one conv, the one listed prunes the fewest convs, then the fewest weights,
    then the latest convs. LayerMerge keeps the largest summed L1 norm of the kept weights instead;
    that ties the latency table to one set of weights (a table could not be shipped per
    architecture, nor reused after fine-tuning). Fewest convs and weights pruned is the weights-free
    stand-in: a conv's summed L1 norm grows with its number of weights, and pruning a conv that
    does not shrink the merged conv (a reducible 1x1) removes capacity for no speed.

    Long blocks over many strides could list dozens of kernels; at most ``MAX_PRUNING_OPTIONS``
    non-empty sets are listed, those with the smallest merged kernels (ties: the cost above), as
    shrinking the kernel is what pruning buys; the others are slower merges of the same convs.

    A merged conv's kernel and padding grow by a fixed amount per kept conv (its kernel and padding
    times the stride before it, which pruning leaves alone), so a knapsack over the reducible convs
    keyed by that growth finds each kernel's best set without listing every subset. Groups follow
    the kept convs that are neither depthwise (their connectivity is the identity's) nor, where the
    block keeps a dense conv anyway, grouped; the key holds those, so no grouping is missed.
    """
    if not chain.is_valid_block(start, end):
        raise ValueError(f"({start}, {end}) is not a valid block of this chain")
    positions = range(start + 1, end + 1)
    always_dense = any(chain.unit(p).groups == 1 for p in positions if not chain.unit(p).reducible)
    # key -> (cost, pruned set); key: (kernel and padding growth of the kept reducible convs, the
    # groupings they bring, whether any conv is kept); cost: (convs pruned, weights pruned, the
    # pruned positions latest first, negated, so that the smallest cost prunes the latest convs).
    states: Dict[Tuple, Tuple[Tuple, Tuple[int, ...]]] = {((0, 0, 0, 0), frozenset(), False): ((0, 0, ()), ())}
    scale = [1, 1]
    for p in positions:
        u = chain.unit(p)
        if not u.reducible:
            states = {(growth, groupings, True): value for (growth, groupings, _), value in states.items()}
        else:
            k = effective_kernel(u.kernel, u.dilation)
            step = (scale[0] * (k[0] - 1), scale[1] * (k[1] - 1), scale[0] * u.padding[0], scale[1] * u.padding[1])
            if always_dense or u.groups == u.in_channels:
                grouping: FrozenSet[Tuple[int, int]] = frozenset()
            else:  # (channels, groups); dense convs are all alike
                grouping = frozenset([(0, 1) if u.groups == 1 else (u.in_channels, u.groups)])
            weights = u.out_channels * (u.in_channels // u.groups) * u.kernel[0] * u.kernel[1]
            grown: Dict[Tuple, Tuple[Tuple, Tuple[int, ...]]] = {}
            for (growth, groupings, kept_any), ((count, pruned_weights, latest), pruned) in states.items():
                candidates = [
                    ((tuple(a + b for a, b in zip(growth, step)), groupings | grouping, True),
                     ((count, pruned_weights, latest), pruned)),
                    ((growth, groupings, kept_any), ((count + 1, pruned_weights + weights, (-p, *latest)), (*pruned, p))),
                ]
                for key, value in candidates:
                    if key not in grown or value[0] < grown[key][0]:
                        grown[key] = value
            states = grown
        scale = [scale[0] * u.stride[0], scale[1] * u.stride[1]]
    best: Dict[Tuple, Tuple[Tuple, Tuple[int, ...], int]] = {}  # conv -> (cost, pruned set, kernel area)
    for cost, pruned in states.values():
        geometry = block_geometry(chain, start, end, pruned)
        if geometry.conv_key not in best or cost < best[geometry.conv_key][0]:
            best[geometry.conv_key] = (cost, pruned, geometry.kernel[0] * geometry.kernel[1])
    unpruned, *pruned_options = sorted(best.values())
    kept = sorted(pruned_options, key=lambda option: (option[2], option[0]))[:MAX_PRUNING_OPTIONS]
    return [unpruned[1], *(pruned for _, pruned, _ in sorted(kept))]


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
