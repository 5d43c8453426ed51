"""Exactness with pruned convs (LayerMerge's search space): the merged network equals the reference
network in which pruned convs and their BatchNorms are identity, and the reference equals the
original model with those modules replaced by ``nn.Identity``."""

import copy
import random
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

from dpcompress.graph.geometry import block_geometry
from dpcompress.graph.rewrite import merge_reference, reference_model
from dpcompress.graph.trace import trace_model
from dpcompress.models import build_model
from dpcompress.graph.plan import Plan
from tests.merge_checks import assert_pruned_merged_matches
from tests.models_for_tests import calibrated, traced_zoo
from tests.random_plans import random_plan, with_random_pruning

ZOO = ["dpcompress.zoo:tiny_mobilenet_v2", "dpcompress.zoo:digits_mobilenet_v2"]
TORCHVISION = ["resnet18", "mobilenet_v2", "vgg11", "efficientnet_b0", "regnet_x_400mf"]


@pytest.mark.parametrize("spec", ZOO)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zoo_merged_equals_reference_with_random_pruning(spec, seed):
    traced = traced_zoo(spec)
    chain = traced.chain
    assert chain.reducible_positions()
    plan = with_random_pruning(chain, random_plan(chain, seed), seed)
    assert plan.pruned
    assert_pruned_merged_matches(traced, plan, size=32)


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_merged_equals_reference_with_random_pruning(name, torchvision_traced):
    traced = torchvision_traced(name)
    plan = with_random_pruning(traced.chain, random_plan(traced.chain, seed=len(name)), seed=len(name))
    assert plan.pruned
    assert_pruned_merged_matches(traced, plan, size=64)


def single_conv_plan(chain, activations, pruned):
    return Plan(activations=activations, boundaries=list(range(chain.num_positions + 1)),
                num_positions=chain.num_positions, pruned=pruned)


def independently_pruned(model, traced, plan):
    """The original model with each pruned conv and its BatchNorm ``nn.Identity``, and each dropped
    activation too; activations out of place, since an identity hands on a tensor its shortcut reads."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    names = [traced.chain.unit(p).name for p in plan.pruned]
    names += [traced.chain.unit(p).batchnorm for p in plan.pruned if traced.chain.unit(p).batchnorm]
    names += [str(traced.unit_nodes(p).activation.target)
              for p in traced.chain.activation_positions if p not in plan.activations]
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, nn.Identity())
    return model.double().eval()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_reference_equals_the_model_with_pruned_modules_replaced(seed):
    """Single-conv blocks: the reference is the model with the pruned convs, their BatchNorms and the
    dropped activations replaced by identity (zoo: each activation is its own module)."""
    model = calibrated(build_model(ZOO[1]), 32)
    traced = trace_model(model, (1, 3, 32, 32))
    chain = traced.chain
    rng = random.Random(seed)
    pruned = sorted(p for p in chain.reducible_positions() if rng.random() < 0.5)
    activations = sorted(p for p in chain.activation_positions if rng.random() < 0.5)
    plan = single_conv_plan(chain, activations, pruned)
    expected_model = independently_pruned(model, traced, plan)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.testing.assert_close(reference_model(traced, plan).double().eval()(x), expected_model(x),
                                   rtol=1e-9, atol=1e-9)


def test_an_identity_block_hands_on_a_tensor_that_inplace_ops_must_leave_alone():
    """The digits model's first residual (1, 3) reads position 1; with conv 2 pruned and position 1's
    ReLU6 dropped, position 2's ReLU6 (inplace=True) gets position 1's tensor: it must not clip the
    shortcut's copy."""
    model = calibrated(build_model(ZOO[1]), 32)
    traced = trace_model(model, (1, 3, 32, 32))
    chain = traced.chain
    assert (1, 3) in {(r.start, r.end) for r in chain.residuals} and 2 in chain.reducible_positions()
    assert traced.model.get_submodule(str(traced.unit_nodes(2).activation.target)).inplace
    plan = single_conv_plan(chain, [p for p in chain.activation_positions if p != 1], [2])
    reference = reference_model(traced, plan).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = independently_pruned(model, traced, plan)(x)
        torch.testing.assert_close(reference(x), expected, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(merge_reference(reference)(x), expected, rtol=1e-9, atol=1e-9)


def test_resnet_reference_equals_the_model_with_pruned_modules_replaced(torchvision_traced):
    """resnet18 shares one ReLU (inplace) per residual block: every activation kept, convs pruned, among
    them the first conv of a residual block, whose identity hands on the tensor the shortcut reads."""
    traced = torchvision_traced("resnet18")
    chain = traced.chain
    pruned = [2, 4, 5, 9, 10, 19]  # 4 and 5: a residual's whole body
    assert {(3, 5), (1, 3)} <= {(r.start, r.end) for r in chain.residuals}
    plan = single_conv_plan(chain, chain.activation_positions, pruned)
    expected_model = independently_pruned(traced.model, traced, plan)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    reference = reference_model(traced, plan).double().eval()
    with torch.no_grad():
        torch.testing.assert_close(reference(x), expected_model(x), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(merge_reference(reference)(x), reference(x), rtol=1e-9, atol=1e-9)


def test_a_block_with_every_conv_pruned_is_an_identity():
    traced = traced_zoo(ZOO[0])
    chain = traced.chain
    start, end = next((p - 1, p) for p in chain.reducible_positions())
    g = block_geometry(chain, start, end, (end,))
    assert g.identity and g.kernel == (1, 1) and g.in_channels == g.out_channels
    boundaries = list(range(chain.num_positions + 1))
    plan = Plan(activations=[], boundaries=boundaries, num_positions=chain.num_positions, pruned=[end])
    reference = reference_model(traced, plan)
    index = plan.blocks.index((start, end))
    assert f"dpc_block_{index}" not in dict(reference.named_children())
    assert_pruned_merged_matches(traced, plan, size=32)


def test_a_residual_whose_body_is_pruned_doubles_its_input(torchvision_traced):
    """resnet18's block (3, 5) holds the residual (3, 5); with both convs pruned it is x + x, a 1x1
    depthwise conv of weight 2; merged with a kept conv before it, it still merges exactly."""
    traced = torchvision_traced("resnet18")
    chain = traced.chain
    g = block_geometry(chain, 3, 5, (4, 5))
    assert not g.identity and (g.kernel, g.groups, g.padding) == ((1, 1), 64, (0, 0))
    plan = Plan(activations=[], boundaries=[0, 1, 3, 5, *range(6, chain.num_positions + 1)],
                num_positions=chain.num_positions, pruned=[4, 5])
    reference = reference_model(traced, plan).double().eval()
    block = reference.get_submodule("dpc_block_2")
    assert block.block == (3, 5) and len(block.convs) == 0
    x = torch.randn(1, 64, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block(x), 2 * x)
        conv = block.merged()
        torch.testing.assert_close(conv(x), 2 * x)
    assert_pruned_merged_matches(traced, plan, size=64)
    # Block (1, 5): conv 2 kept, conv 3 pruned inside residual (1, 3), then the pruned residual (3, 5).
    plan = replace(plan, boundaries=[0, 1, 5, *range(6, chain.num_positions + 1)], pruned=[3, 4, 5])
    assert_pruned_merged_matches(traced, plan, size=64)
    assert block_geometry(chain, 1, 5, (3, 4, 5)).kernel == (3, 3)
