"""The ResNet-style digits model of the zoo: it traces with the structure of a torchvision ResNet
(identity residuals mergeable, 1x1-conv shortcuts as barriers), has reducible convs, and merges exactly
with convs pruned."""

import pytest

from dpcompress.graph.plan import Plan
from tests.merge_checks import assert_pruned_merged_matches
from tests.models_for_tests import traced_zoo
from tests.random_plans import random_plan, with_random_pruning

SPEC = "dpcompress.zoo:digits_resnet"


@pytest.fixture(scope="module")
def traced():
    return traced_zoo(SPEC)


def test_traces_with_identity_residuals_and_reducible_convs(traced):
    chain = traced.chain
    assert chain.num_positions == 15  # stem, 6 basic blocks of 2 convs, 2 shortcut convs
    assert len(chain.residuals) == 4  # the identity shortcuts; the two 1x1-conv shortcuts are barriers
    # Every 3x3 conv of a basic block keeps its input's shape, except the two stride-2 ones.
    assert chain.reducible_positions() == [2, 3, 4, 5, 7, 9, 10, 12, 14, 15]
    assert any(end - start > 1 for start, end in chain.valid_blocks())  # some convs merge
    assert len(chain.activation_positions) == 10


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merged_equals_reference_with_random_pruning(traced, seed):
    plan = with_random_pruning(traced.chain, random_plan(traced.chain, seed), seed)
    assert plan.pruned
    assert_pruned_merged_matches(traced, plan, size=32)


def test_a_residual_with_its_whole_body_pruned_merges_exactly(traced):
    """Block (1, 5) holds the residuals (1, 3) and (3, 5); with convs 2-5 pruned it is 4x its input."""
    chain = traced.chain
    boundaries = [0, 1, 5, *range(6, chain.num_positions + 1)]
    plan = Plan(activations=[], boundaries=boundaries, num_positions=chain.num_positions, pruned=[2, 3, 4, 5])
    assert_pruned_merged_matches(traced, plan, size=32)
