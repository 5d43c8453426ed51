"""Apply a plan to a traced model: the reference network and the merged network.

The reference network keeps every conv and BatchNorm that the plan does not prune,
removes the plan's activations and applies each block's padding once, at the block's
input (the network to fine-tune). The merged network replaces each block by one convolution
computed from the reference network's weights; the two agree to float precision.
Everything outside the trunk (pooling, squeeze-excitation, the head) is kept as is.

Merged kernels are cropped to the taps that can meet the block's input at the traced
input size, so the merged network is exact at that size (its convs are fixed for it).
Composing a block is refused, as a UserError, when it would take more than
``DPCOMPRESS_MAX_MERGE_BYTES`` bytes (default 2 GiB); ``profile`` gives such blocks no row.
"""

from __future__ import annotations

import copy
import operator
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from dpcompress.graph import geometry, merge
from dpcompress.graph.chain import Chain
from dpcompress.graph.geometry import MAX_MERGE_BYTES_ENV, max_merge_bytes, merge_bytes, size_text
from dpcompress.errors import UserError
from dpcompress.graph.plan import Plan, check_plan_against_chain, unchanged_plan
from dpcompress.graph.trace import TracedModel

BLOCK_PREFIX = "dpc_block_"


class ReorderedBlock(nn.Module):
    """Convs of one block run in sequence with the block's total padding applied once at the input.

    Identity residuals inside the block add their shortcut cropped by the padding
    of the convs they skip, so that the tensors line up as in the merged conv.
    ``block`` is its (start, end) in the chain and ``in_size`` the (H, W) of its input,
    which the merged conv is cropped to.

    With pruned convs (LayerMerge's search space) the block holds only the convs that remain:
    ``positions`` are their local positions (1..end-start; default: all), the pruned positions
    pass their input on, and ``channels`` (the channels at each local position 0..end-start) size
    the shortcut of a residual whose convs are all pruned, which doubles its input (x + x).
    """

    def __init__(self, convs: Sequence[nn.Conv2d], norms: Sequence[Optional[nn.BatchNorm2d]],
                 conv_paddings: Sequence[Tuple[int, int]], residuals: Sequence[Tuple[int, int]],
                 block: Tuple[int, int], in_size: Tuple[int, int],
                 positions: Optional[Sequence[int]] = None, channels: Sequence[int] = ()):
        super().__init__()
        self.block = block
        self.in_size = in_size
        self.length = block[1] - block[0]
        self.positions = list(positions) if positions is not None else list(range(1, len(convs) + 1))
        self.channels = list(channels)
        self.convs = nn.ModuleList(convs)
        self.norms = nn.ModuleList([n if n is not None else nn.Identity() for n in norms])
        self.conv_paddings = [tuple(p) for p in conv_paddings]  # the convs' own paddings, for merging
        self.residuals = [tuple(r) for r in residuals]  # (start, end) as local positions 0..length
        # Follows the block's dtype and device (.double(), .to()) where no conv is left to tell them.
        self.register_buffer("dtype_anchor", torch.zeros(0), persistent=False)
        for conv in self.convs:
            conv.padding = (0, 0)
        self.padding = _total_padding(self.convs, self.conv_paddings)
        self._conv_at = {position: index for index, position in enumerate(self.positions)}
        self._crops = {end: (start, _sum_padding([pad for position, pad in zip(self.positions, self.conv_paddings)
                                                  if start < position <= end]))
                       for start, end in self.residuals}
        self._saved = {start for start, _ in self.residuals}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = self.padding
        x = F.pad(x, (pw, pw, ph, ph))
        saved: Dict[int, torch.Tensor] = {0: x} if 0 in self._saved else {}
        for position in range(1, self.length + 1):
            if position in self._conv_at:
                index = self._conv_at[position]
                x = self.norms[index](self.convs[index](x))
            if position in self._crops:
                start, (ch, cw) = self._crops[position]
                shortcut = saved[start]
                x = x + shortcut[:, :, ch:shortcut.shape[2] - ch, cw:shortcut.shape[3] - cw]
            if position in self._saved:
                saved[position] = x
        return x

    def merged(self) -> nn.Conv2d:
        """This block as one convolution (BatchNorm in eval mode folded in)."""
        pieces: List[Tuple[int, int, merge.AffineConv]] = []
        for position, conv, norm, padding in zip(self.positions, self.convs, self.norms, self.conv_paddings):
            weight, bias = conv.weight, conv.bias
            if isinstance(norm, nn.BatchNorm2d):
                weight, bias = merge.fold_batchnorm(weight, bias, norm.running_mean, norm.running_var,
                                                    norm.weight, norm.bias, norm.eps)
            affine = merge.AffineConv.from_conv(weight, bias, tuple(conv.stride), padding,
                                                tuple(conv.dilation), conv.groups)
            pieces.append((position - 1, position, affine))
        if pieces:
            self._check_cost(pieces)
        # Innermost residuals first, so nested shortcuts compose correctly.
        for start, end in sorted(self.residuals, key=lambda r: r[1] - r[0]):
            inside = [p for p in pieces if start <= p[0] and p[1] <= end]
            body = merge.compose_all([p[2] for p in inside]) if inside else self._identity(self.channels[start])
            first = sum(1 for p in pieces if p[1] <= start)
            pieces[first:first + len(inside)] = [(start, end, merge.add_identity(body))]
        result = merge.compose_cropped([p[2] for p in pieces], self.in_size)
        conv = merge.to_conv2d(result)
        return conv.to(dtype=self.dtype_anchor.dtype, device=self.dtype_anchor.device)

    def _identity(self, channels: int) -> merge.AffineConv:
        """The identity as a 1x1 depthwise conv: the body of a residual whose convs are all pruned."""
        weight = torch.ones(channels, 1, 1, 1, dtype=torch.float64, device=self.dtype_anchor.device)
        return merge.AffineConv(weight, weight.new_zeros(channels), (1, 1), (0, 0), channels)

    def _check_cost(self, pieces: Sequence[Tuple[int, int, merge.AffineConv]]) -> None:
        """UserError, before any work, when merging the block would take more memory than allowed."""
        convs = [conv for _, _, conv in pieces]
        needed = merge_bytes([(end, conv) for _, end, conv in pieces], self.residuals, self.in_size)
        limit = max_merge_bytes()
        if needed > limit:
            kernel = geometry.composition_cost(convs).kernel
            raise UserError(
                f"block {self.block} merges into a {convs[0].in_channels}->{convs[-1].out_channels} conv with a "
                f"{kernel[0]}x{kernel[1]} kernel before cropping; composing it needs about {size_text(needed)}, "
                f"over the {size_text(limit)} limit ({MAX_MERGE_BYTES_ENV}); "
                "use a plan with shorter blocks there, or raise the limit")


def _sum_padding(paddings: Sequence[Tuple[int, int]]) -> Tuple[int, int]:
    return sum(p[0] for p in paddings), sum(p[1] for p in paddings)


def _total_padding(convs: Sequence[nn.Conv2d], paddings: Sequence[Tuple[int, int]]) -> Tuple[int, int]:
    """Padding at the input equivalent to each conv padding its own input: p1 + s1*(p2 + s2*(...))."""
    total = [0, 0]
    scale = [1, 1]
    for conv, padding in zip(convs, paddings):
        for axis in range(2):
            total[axis] += scale[axis] * padding[axis]
            scale[axis] *= conv.stride[axis]
    return total[0], total[1]


def reference_model(traced: TracedModel, plan: Plan) -> fx.GraphModule:
    """The plan's network before merging: activations removed, pruned convs (with their BatchNorms)
    gone, padding reordered per block. A block whose convs are all pruned is ``nn.Identity``, or,
    where identity residuals lie inside it, a ReorderedBlock with no conv that adds them (x + x)."""
    check_plan_against_chain(plan, traced.chain)
    holder = copy.deepcopy(traced.gm)
    chain = traced.chain

    def make_block(start: int, end: int) -> nn.Module:
        pruned = set(plan.pruned_in(start, end))
        residuals = [(r.start - start, r.end - start) for r in chain.residuals_inside(start, end)]
        if len(pruned) == end - start and not residuals:
            return nn.Identity()
        units = [chain.unit(p) for p in range(start + 1, end + 1) if p not in pruned]
        convs = [_copy_sharing_parameters(holder.get_submodule(u.name)) for u in units]
        norms = [_copy_sharing_parameters(holder.get_submodule(u.batchnorm)) if u.batchnorm else None
                 for u in units]
        first = chain.unit(start + 1)
        channels = [first.in_channels, *(chain.unit(p).out_channels for p in range(start + 1, end + 1))]
        return ReorderedBlock(convs, norms, [u.padding for u in units], residuals,
                              block=(start, end), in_size=(first.in_shape[2], first.in_shape[3]),
                              positions=[u.position - start for u in units], channels=channels)

    return rewrite_blocks(traced, plan, holder, make_block)


def _copy_sharing_parameters(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose attributes (a conv's padding) can change on their own, with the same
    parameter tensors: ``holder`` is already the reference's private copy, and the module it replaces
    is dropped with it, so copying the weights too would only hold them twice for a while."""
    return copy.deepcopy(module, {id(p): p for p in module.parameters()})


def merge_reference(reference: fx.GraphModule) -> fx.GraphModule:
    """Replace each ReorderedBlock of a reference network by its single merged convolution."""
    with torch.no_grad():
        # Each block's merged conv stands in for the block in the copy, so the copy never holds
        # the block's convs (as many weights as the model's) beside the merged ones.
        memo: Dict[int, Any] = {id(module): module.merged() for module in reference.children()
                                if isinstance(module, ReorderedBlock)}
    merged = copy.deepcopy(reference, memo)
    return merged.eval()


def merged_model(traced: TracedModel, plan: Plan) -> fx.GraphModule:
    """The compressed network: one convolution per block of the plan."""
    return merge_reference(reference_model(traced, plan).eval())


def unchanged_network(traced: TracedModel) -> fx.GraphModule:
    """The original network rebuilt by the path every plan's network takes (:func:`merged_model` of the plan
    that changes nothing): what a bench compares a plan's network with, so that both reach the runtime
    alike (docs/latency.md, "Sessions")."""
    return merged_model(traced, unchanged_plan(traced.chain))


def rewrite_blocks(traced: TracedModel, plan: Plan, holder: nn.Module,
                   make_block: Callable[[int, int], nn.Module]) -> fx.GraphModule:
    """The traced graph with each block of ``plan`` one module ``make_block(start, end)`` (registered
    on ``holder`` as ``dpc_block_<index>``) and the activations that the plan drops removed.

    A block that is ``nn.Identity`` (every conv pruned) leaves no node: its output is its input.
    That tensor may still be read elsewhere (by a shortcut), so in-place ops reading it (ReLU's
    ``inplace=True``, ``out += shortcut``) run out of place instead.

    Checks on a tensor's metadata (``torch._assert(x.ndim == 4)``) whose tensor a block merged away
    are dropped: no tensor of the new network is that one (inside a reordered block its shape is not
    even the same), they held when traced, and they compute nothing the network returns."""
    chain: Chain = traced.chain
    kept = set(plan.activations)
    skipped: Set[fx.Node] = set()
    block_at: Dict[fx.Node, Tuple[Optional[str], fx.Node]] = {}  # replaced node -> (module name or None, input)
    for index, (start, end) in enumerate(plan.blocks):
        absorbed_ends = {r.end for r in chain.residuals_inside(start, end)}
        for position in range(start + 1, end + 1):
            nodes = traced.unit_nodes(position)
            skipped.update([nodes.conv, *nodes.identities])
            if nodes.batchnorm is not None:
                skipped.add(nodes.batchnorm)
            if nodes.residual_add is not None and position in absorbed_ends:
                skipped.add(nodes.residual_add)
            if position < end:
                skipped.update(nodes.trailing)
                if nodes.activation is not None:
                    skipped.add(nodes.activation)
        last = traced.unit_nodes(end)
        output = last.residual_add if end in absorbed_ends else last.pre_add
        block = make_block(start, end)
        name = None if isinstance(block, nn.Identity) else f"{BLOCK_PREFIX}{index}"
        if name is not None:
            holder.add_module(name, block)
        block_at[output] = (name, traced.unit_nodes(start + 1).input)
        skipped.discard(output)
    removed_activations = {
        traced.unit_nodes(p).activation for p in chain.activation_positions if p not in kept
    }
    skipped |= _checks_on_removed_tensors(traced, skipped)
    # An eval-time identity returns its input tensor itself: it passes an alias on.
    passes_input = {node for nodes in traced.units for node in nodes.trailing}
    graph = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    aliases: Set[fx.Node] = set()  # nodes whose output is the input of an identity block
    for node in traced.gm.graph.nodes:
        if node in skipped:
            continue
        if node in block_at:
            name, source = block_at[node]
            if name is None:
                env[node] = env[source]
                aliases.add(node)
            else:
                env[node] = graph.call_module(name, (env[source],))
        elif node in removed_activations:
            env[node] = env[node.args[0]]
            if node.args[0] in aliases:
                aliases.add(node)
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
            if any(arg in aliases for arg in node.all_input_nodes):
                _run_out_of_place(env[node], holder)
                if node in passes_input:
                    aliases.add(node)
    graph.lint()
    return fx.GraphModule(holder, graph, class_name="DpcompressNet")


def _checks_on_removed_tensors(traced: TracedModel, removed: Set[fx.Node]) -> Set[fx.Node]:
    """The metadata checks that read a removed node, directly or through other checks, and those that
    feed only them (the parameter in ``x.dtype == self.weight.dtype``)."""
    checks = traced.metadata_checks
    dropped: Set[fx.Node] = set()
    for node in traced.gm.graph.nodes:
        if node in checks and any(arg in removed or arg in dropped for arg in node.all_input_nodes):
            dropped.add(node)
    for node in reversed(traced.gm.graph.nodes):
        if node in checks and node.users and all(user in dropped for user in node.users):
            dropped.add(node)
    return dropped


_OUT_OF_PLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                           operator.itruediv: operator.truediv}


def _run_out_of_place(node: fx.Node, holder: nn.Module) -> None:
    """Make ``node`` leave its inputs alone: ``inplace=False`` (module attribute or keyword argument),
    ``operator.iadd`` as ``operator.add``, ``x.relu_()`` as ``x.relu()``."""
    if node.op == "call_module":
        module = holder.get_submodule(str(node.target))
        if getattr(module, "inplace", False):
            module.inplace = False  # holder's copy; out of place computes the same
    elif node.op == "call_function":
        if node.target in _OUT_OF_PLACE_OPERATORS:
            node.target = _OUT_OF_PLACE_OPERATORS[node.target]
        elif node.kwargs.get("inplace"):
            node.kwargs = {**node.kwargs, "inplace": False}
    elif node.op == "call_method" and str(node.target).endswith("_") and not str(node.target).startswith("_"):
        node.target = str(node.target)[:-1]
