"""The profile's first phase: every block a table has a row for, grouped by the shape that is timed once.

Each block (i, j) is built as one ``nn.Conv2d`` with the geometry of ``block_geometry`` (random weights:
latency does not depend on their values), followed by the activation at position j as in the model, and
timed at the input shape it would see. Blocks with identical geometry (all but their positions) share a
shape and are timed once. With pruning options, each block has one entry per pruned set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, NamedTuple, Optional, Tuple

from dpcompress.errors import UserError
from dpcompress.graph.chain import Chain
from dpcompress.graph.geometry import BlockGeometry, block_geometry, block_merge_bytes, max_merge_bytes, pruning_options
from dpcompress.tables import Pruned

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn

Option = Tuple[int, int, Pruned]  # a block and the convs it replaces by identity (() for none)


class BlockShape(NamedTuple):
    """Everything about a block that affects its latency: its geometry minus its positions."""

    in_channels: int
    out_channels: int
    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    groups: int
    in_chw: Tuple[int, ...]
    activation: Optional[str]
    bias: bool


def block_shape(geometry: BlockGeometry) -> BlockShape:
    g = geometry
    return BlockShape(g.in_channels, g.out_channels, g.kernel, g.stride, g.padding, g.groups,
                      tuple(g.in_shape[1:]), g.activation, g.bias)


def group_by_shape(geometries: Dict[Option, BlockGeometry]) -> Dict[BlockShape, List[Option]]:
    """Blocks (with their pruned convs) grouped by shape, groups in order of their first block."""
    groups: Dict[BlockShape, List[Option]] = {}
    for block, geometry in geometries.items():
        groups.setdefault(block_shape(geometry), []).append(block)
    return groups


def activation_module(kind: Optional[str]) -> "torch.nn.Module":
    """The ``torch.nn`` module for an activation kind as the tracer names it ("ReLU", "relu6", "SiLU", ...)."""
    from torch import nn

    if kind is None:
        return nn.Identity()
    known = {cls.__name__.lower(): cls for cls in (
        nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.GELU, nn.LeakyReLU, nn.ELU,
        nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.PReLU, nn.SELU, nn.CELU, nn.Softplus)}
    cls = known.get(kind.lower())
    if cls is None:
        raise UserError(f"the profiler does not know activation {kind!r}; "
                        f"known: {', '.join(sorted(c.__name__ for c in known.values()))}")
    return cls()


def block_module(geometry: BlockGeometry) -> "torch.nn.Module":
    """The merged convolution of a block plus its end activation, with random weights."""
    from torch import nn

    g = geometry
    conv = nn.Conv2d(g.in_channels, g.out_channels, g.kernel, stride=g.stride, padding=g.padding,
                     groups=g.groups, bias=g.bias)
    return nn.Sequential(conv, activation_module(g.activation)).eval()


def block_input_shape(geometry: BlockGeometry, batch_size: int) -> Tuple[int, int, int, int]:
    _, c, h, w = geometry.in_shape
    return (batch_size, c, h, w)


def block_flops(geometry: BlockGeometry, batch_size: int) -> float:
    """Multiply-adds x 2 of the merged convolution (the activation is not counted)."""
    g = geometry
    _, _, out_h, out_w = g.out_shape
    return 2.0 * batch_size * out_h * out_w * g.out_channels * (g.in_channels // g.groups) * g.kernel[0] * g.kernel[1]


def weight_bytes(geometry: BlockGeometry) -> int:
    """The merged conv's fp32 weights."""
    g = geometry
    return 4 * g.out_channels * (g.in_channels // g.groups) * g.kernel[0] * g.kernel[1]


@dataclass(frozen=True)
class TableBlocks:
    """The blocks of a table: each row's geometry, grouped by shape, and the order shapes are timed in."""

    blocks: List[Option]  # every row, in the chain's order
    geometries: Dict[Option, BlockGeometry]
    unbuildable: List[Option]  # merges over the memory limit: no row
    max_merge_bytes: int
    groups: Dict[BlockShape, List[Option]]  # shape -> its blocks, identities left out (no node to time)
    flops: Dict[BlockShape, float]
    order: List[BlockShape]  # single convs first (every bound is checked against them), then by growing cost
    has_single: Dict[BlockShape, bool]  # every plan is built on the single convs: always timed
    starts_of: Dict[int, List[int]]  # end position -> starts of the valid blocks ending there

    def shape_of(self, block: Option) -> BlockShape:
        return block_shape(self.geometries[block])


def enumerate_blocks(chain: Chain, prune: bool, batch_size: int) -> TableBlocks:
    """Every valid block of ``chain`` (one per pruning option with ``prune``), less those whose merge would
    take more memory than ``DPCOMPRESS_MAX_MERGE_BYTES`` allows (``block_merge_bytes``: composing their
    weights, as export and bench would): the DP then never chooses a block that cannot be built."""
    blocks = [(start, end, pruned) for start, end in chain.valid_blocks()
              for pruned in (pruning_options(chain, start, end) if prune else [()])]
    geometries = {option: block_geometry(chain, *option) for option in blocks}  # computed once: not cheap
    limit = max_merge_bytes()
    unbuildable = sorted(option for option in geometries
                         if option[1] - option[0] > 1 and block_merge_bytes(chain, *option) > limit)
    for option in unbuildable:
        del geometries[option]
    groups = group_by_shape({option: g for option, g in geometries.items() if not g.identity})
    for shape in groups:
        activation_module(shape.activation)  # an unknown activation fails now, not halfway through
    flops = {shape: block_flops(geometries[members[0]], batch_size) for shape, members in groups.items()}
    starts_of: Dict[int, List[int]] = {}
    for start, end in chain.valid_blocks():
        starts_of.setdefault(end, []).append(start)
    return TableBlocks(
        blocks=[option for option in blocks if option in geometries], geometries=geometries, unbuildable=unbuildable,
        max_merge_bytes=limit, groups=groups, flops=flops,
        order=sorted(groups, key=lambda shape: (all(e - s > 1 for s, e, _ in groups[shape]), flops[shape])),
        has_single={shape: any(e - s == 1 for s, e, _ in members) for shape, members in groups.items()},
        starts_of=starts_of)
