"""Exactness: the merged network equals the reference (activation-removed, padding-reordered) network."""

import pytest
import torch

from dpcompress.errors import UserError
from dpcompress.graph.geometry import block_geometry
from dpcompress.graph.plan import Plan
from dpcompress.graph.rewrite import max_merge_bytes, merge_reference, merged_model, reference_model, unchanged_network
from dpcompress.graph.trace import trace_model
from tests.merge_checks import assert_geometry_matches, assert_merged_matches
from tests.models_for_tests import TORCHVISION_MODELS, TinyResidual, calibrated, traced_strided
from tests.random_plans import plan_all_removed, random_plan


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_merged_equals_reference_all_activations_removed(name, torchvision_traced):
    traced = torchvision_traced(name)
    plan = plan_all_removed(traced.chain)
    assert len(plan.blocks) < traced.chain.num_positions  # real merging happens
    assert_merged_matches(traced, plan)


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_merged_equals_reference_random_plan(name, torchvision_traced):
    traced = torchvision_traced(name)
    assert_merged_matches(traced, random_plan(traced.chain, seed=len(name)))


def test_single_conv_blocks_keep_every_activation_reproduce_the_model():
    model = calibrated(TinyResidual(), 16)
    traced = trace_model(model, (1, 3, 16, 16))
    chain = traced.chain
    plan = Plan(activations=chain.activation_positions, boundaries=list(range(chain.num_positions + 1)),
                num_positions=chain.num_positions)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(reference_model(traced, plan)(x), expected, atol=1e-6)
        assert torch.allclose(merge_reference(reference_model(traced, plan))(x), expected, atol=1e-5)
        # The bench's original: the same network, rebuilt by the path a plan's network takes (one conv per
        # position, BatchNorms folded).
        rebuilt = unchanged_network(traced)
        assert torch.allclose(rebuilt(x), expected, atol=1e-5)
    assert (sum(isinstance(m, torch.nn.Conv2d) for m in rebuilt.modules())
            == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in rebuilt.modules())


def test_removing_an_activation_changes_the_output():
    model = calibrated(TinyResidual(), 16)
    traced = trace_model(model, (1, 3, 16, 16))
    chain = traced.chain
    plan = Plan(activations=[1], boundaries=[0, 1, 4, 5], num_positions=5)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        merged = merge_reference(reference_model(traced, plan))
        assert not torch.allclose(merged(x), model(x), atol=1e-3)
        assert torch.allclose(merged(x), reference_model(traced, plan)(x), atol=1e-5)
    # Block (1, 4) holds the whole residual: one dense 3x3 conv replaces three convs and the add.
    convs = [m for m in merged.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 3 + 1  # stem, merged block, d, and the gate's conv
    assert chain.residuals and sorted(c.kernel_size for c in convs)[-1] == (3, 3)


@pytest.mark.parametrize("size", [(5, 5), (6, 9), (12, 7)])
@pytest.mark.parametrize("activations, boundaries", [([], [0, 6]), ([3], [0, 3, 6])])
def test_kernels_larger_than_the_input_are_cropped_exactly(size, activations, boundaries):
    traced = traced_strided(size)
    plan = Plan(activations=activations, boundaries=boundaries, num_positions=traced.chain.num_positions)
    reference = reference_model(traced, plan).double().eval()
    merged = merge_reference(reference)
    x = torch.randn(2, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), reference(x), rtol=1e-9, atol=1e-9)
    assert_geometry_matches(traced.chain, plan, merged)
    geometries = [block_geometry(traced.chain, *block) for block in plan.blocks]
    assert any(g.kernel != g.composed_kernel for g in geometries)
    assert max(geometries[-1].composed_kernel) > max(geometries[-1].in_shape[2:])  # it outgrew its input


def test_a_block_over_the_merge_memory_limit_is_a_user_error(monkeypatch):
    traced = traced_strided((6, 9))
    plan = Plan(activations=[], boundaries=[0, 6], num_positions=traced.chain.num_positions)
    monkeypatch.setenv("DPCOMPRESS_MAX_MERGE_BYTES", "10000")
    with pytest.raises(UserError) as raised:
        merged_model(traced, plan)
    message = str(raised.value)
    assert "\n" not in message
    assert all(part in message for part in ("block (0, 6)", "3->4", "31x31", "DPCOMPRESS_MAX_MERGE_BYTES"))
    monkeypatch.setenv("DPCOMPRESS_MAX_MERGE_BYTES", str(10**9))
    merged_model(traced, plan)


@pytest.mark.parametrize("value", ["lots", "0", "-5"])
def test_merge_memory_limit_must_be_a_positive_number(monkeypatch, value):
    monkeypatch.setenv("DPCOMPRESS_MAX_MERGE_BYTES", value)
    with pytest.raises(UserError, match="DPCOMPRESS_MAX_MERGE_BYTES"):
        max_merge_bytes()
