"""Merging within bounded memory: cropped composition, its cost, and blocks too large to build."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import List, Tuple

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dpcompress.errors import UserError
from dpcompress.graph import merge
from dpcompress.graph.geometry import ShapeOnly, block_merge_bytes, composition_cost
from dpcompress.graph.rewrite import merged_model
from dpcompress.latency.profile import profile_table
from dpcompress.graph.plan import Plan
from dpcompress.search.solver import frontier, solve_for_model
from dpcompress.tables import meta_path_for, read_latency_table
from tests.conv_specs import FEWER, Spec, conv_chains, min_input, random_input, run_sequence
from tests.latency.helpers import FlopBackend
from tests.models_for_tests import traced_strided


def strided_specs(count: int, channels: int = 3) -> List[Spec]:
    """``count`` 3x3 convs of stride 2, padding 1: their full kernel is 2**(count+1) - 1 taps wide."""
    generator = torch.Generator().manual_seed(count)
    return [Spec(torch.randn(channels, channels, 3, 3, generator=generator, dtype=torch.float64),
                 torch.randn(channels, generator=generator, dtype=torch.float64), (2, 2), (1, 1), (1, 1), 1)
            for _ in range(count)]


@FEWER
@given(specs=conv_chains(min_len=1, max_len=5), extra=st.tuples(st.integers(0, 3), st.integers(0, 3)),
       seed=st.integers(0, 1000))
def test_cropped_composition_equals_the_full_one_cropped(specs: List[Spec], extra: Tuple[int, int],
                                                         seed: int) -> None:
    size = (min_input(specs, 0) + extra[0], min_input(specs, 1) + extra[1])
    convs = [s.affine() for s in specs]
    stepwise = merge.compose_cropped(convs, size)
    whole = merge.crop_to_input(merge.compose_all(convs), size)
    assert (stepwise.kernel, stepwise.padding, stepwise.stride, stepwise.groups) == \
        (whole.kernel, whole.padding, whole.stride, whole.groups)
    # Weights may differ only at taps that never meet the input (the steps zero some), so compare outputs.
    x = random_input(specs[0].in_channels, *size, seed)
    torch.testing.assert_close(merge.apply(stepwise, x), merge.apply(whole, x), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(merge.apply(stepwise, x), run_sequence(specs, x), rtol=1e-9, atol=1e-9)


def test_cropping_in_steps_lowers_the_memory_of_a_kernel_far_larger_than_its_input() -> None:
    specs = strided_specs(7)  # a 255x255 kernel of stride 128, on a 4x4 input
    convs = [s.affine() for s in specs]
    full = composition_cost(convs)
    cropped = composition_cost(convs, (4, 4))
    assert full.kernel == cropped.kernel == (255, 255)
    # The early steps cannot crop: the later convs read their whole padded output. The last ones can.
    assert cropped.bytes < full.bytes / 2
    merged = merge.compose_cropped(convs, (4, 4))
    assert cropped.bytes >= 8 * merged.weight.numel()
    x = random_input(3, 4, 4, 0)
    torch.testing.assert_close(merge.apply(merged, x), run_sequence(specs, x), rtol=1e-9, atol=1e-9)


def test_shape_only_costs_what_the_weights_cost() -> None:
    convs = [s.affine() for s in strided_specs(5)]
    shapes = [ShapeOnly(c.in_channels, c.out_channels, c.kernel, c.stride, c.padding, c.groups) for c in convs]
    for size in [None, (3, 5), (40, 40)]:
        assert composition_cost(shapes, size) == composition_cost(convs, size)


def test_a_window_moves_taps_and_refuses_to_drop_a_tap_that_meets_the_input() -> None:
    conv = strided_specs(1)[0].affine()  # 3x3, stride 2, padding 1
    size = (5, 5)
    x = random_input(3, *size, 1)
    wider = merge.with_window(conv, (5, 5), (2, 2), size)
    assert wider.kernel == (5, 5) and wider.padding == (2, 2)
    torch.testing.assert_close(merge.apply(wider, x), merge.apply(conv, x))
    torch.testing.assert_close(merge.with_window(wider, (3, 3), (1, 1), size).weight, conv.weight)
    with pytest.raises(ValueError, match="leaves out nonzero taps"):
        merge.with_window(conv, (2, 3), (1, 1), size)  # drops the last row of taps


def test_the_block_merge_memory_is_what_merging_checks(monkeypatch) -> None:
    traced = traced_strided((6, 9))
    plan = Plan(activations=[], boundaries=[0, 6], num_positions=traced.chain.num_positions)
    needed = block_merge_bytes(traced.chain, 0, 6)
    assert needed > 0
    monkeypatch.setenv("DPCOMPRESS_MAX_MERGE_BYTES", str(needed))
    merged_model(traced, plan)
    monkeypatch.setenv("DPCOMPRESS_MAX_MERGE_BYTES", str(needed - 1))
    with pytest.raises(UserError, match=r"block \(0, 6\)"):
        merged_model(traced, plan)


def test_profile_gives_no_row_to_a_block_it_could_not_build_and_solve_never_picks_one(tmp_path, monkeypatch):
    traced = traced_strided((12, 7))
    chain = traced.chain
    needed = {block: block_merge_bytes(chain, *block) for block in chain.valid_blocks()}
    limit = sorted(set(needed.values()))[-2]  # the costliest merges are over it
    over = sorted(block for block, value in needed.items() if value > limit)
    assert over and all(e - s > 1 for s, e in over)
    monkeypatch.setenv("DPCOMPRESS_MAX_MERGE_BYTES", str(limit))
    # Every conv takes the same time: the longest merges would be the fastest plans.
    result = profile_table(chain, FlopBackend(), tmp_path / "t.csv", timing="standalone", prune_margin=None,
                           max_block_seconds=None)
    table = read_latency_table(result.table_path)
    assert set(table.latency_ms) == set(chain.valid_blocks()) - set(over)
    meta = json.loads(meta_path_for(result.table_path).read_text())
    assert meta["max_merge_bytes"] == limit
    assert [tuple(entry) for entry in meta["unbuildable_blocks"]] == over
    for _, _, plan in frontier(table):
        assert not set(plan.blocks) & set(over)
        merged_model(traced, plan)  # every plan on the frontier builds within the limit


def test_solve_leaves_out_the_unbuildable_rows_of_a_table_profiled_under_a_larger_limit(tmp_path, monkeypatch):
    traced = traced_strided((12, 7))
    chain = traced.chain
    result = profile_table(chain, FlopBackend(), tmp_path / "t.csv", timing="standalone", prune_margin=None,
                           max_block_seconds=None)
    table = read_latency_table(result.table_path)
    fastest = min((plan for _, _, plan in frontier(table)), key=lambda plan: plan.latency_ms)
    largest = max(block_merge_bytes(chain, *b) for b in fastest.blocks)
    monkeypatch.setenv("DPCOMPRESS_MAX_MERGE_BYTES", str(largest - 1))
    for meta in [dict(table.meta, max_merge_bytes=largest), {k: v for k, v in table.meta.items()
                                                           if k != "max_merge_bytes"}]:
        old = replace(table, meta=meta)
        plans = solve_for_model(old, None, table.original_latency_ms(), chain=chain, with_frontier=True)[1]
        assert plans and all(block_merge_bytes(chain, *b) < largest for p in plans for b in p.blocks)
        assert min(p.latency_ms for p in plans) > fastest.latency_ms
