"""Checks that a plan's merged network is exact: it equals its reference network (activations removed,
pruned convs identity) in float64, and each block is the conv ``block_geometry`` predicts (what
profiling times)."""

from __future__ import annotations

import torch

from dpcompress.graph.chain import Chain
from dpcompress.graph.geometry import block_geometry
from dpcompress.graph.plan import Plan
from dpcompress.graph.rewrite import ReorderedBlock, merge_reference, reference_model
from dpcompress.graph.trace import TracedModel


def merged_equal_to_reference(traced: TracedModel, plan: Plan, size: int) -> torch.nn.Module:
    """The plan's merged network, checked against its reference in float64 (no block left unmerged)."""
    reference = reference_model(traced, plan).double().eval()
    merged = merge_reference(reference).eval()
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = reference(x), merged(x)
    scale = expected.abs().max().item()
    assert scale > 1e-3, "reference output too small to compare meaningfully"
    assert (got - expected).abs().max().item() <= 1e-7 * scale
    assert not any(isinstance(m, ReorderedBlock) for m in merged.modules())
    return merged


def assert_merged_matches(traced: TracedModel, plan: Plan, size: int = 64) -> None:
    merged = merged_equal_to_reference(traced, plan, size)
    assert_geometry_matches(traced.chain, plan, merged)


def assert_geometry_matches(chain: Chain, plan: Plan, merged: torch.nn.Module) -> None:
    """Each block's merged conv is the conv block_geometry predicts (what profiling times), cropped or not."""
    for index, block in enumerate(plan.blocks):
        conv, g = merged.get_submodule(f"dpc_block_{index}"), block_geometry(chain, *block)
        assert (conv.kernel_size, conv.stride, conv.padding, conv.groups) == (g.kernel, g.stride, g.padding, g.groups)
        assert (conv.in_channels, conv.out_channels) == (g.in_channels, g.out_channels)


def assert_pruned_merged_matches(traced: TracedModel, plan: Plan, size: int) -> None:
    merged = merged_equal_to_reference(traced, plan, size)
    assert_pruned_geometry_matches(traced.chain, plan, merged)


def assert_pruned_geometry_matches(chain: Chain, plan: Plan, merged: torch.nn.Module) -> None:
    """Each block is the conv block_geometry predicts from its pruned convs, or no module at all for
    an identity block."""
    modules = dict(merged.named_children())
    for index, block in enumerate(plan.blocks):
        g = block_geometry(chain, *block, plan.pruned_in(*block))
        name = f"dpc_block_{index}"
        assert g.identity == (name not in modules), block
        if not g.identity:
            conv = modules[name]
            assert (conv.kernel_size, conv.stride, conv.padding, conv.groups) == \
                (g.kernel, g.stride, g.padding, g.groups), block
            assert (conv.in_channels, conv.out_channels) == (g.in_channels, g.out_channels), block
