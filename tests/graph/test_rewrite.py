"""Exactness: the merged network equals the reference (activation-removed, padding-reordered) network."""

import random

import pytest
import torch
import torch.nn as nn

from dpcompress.errors import UserError
from dpcompress.graph.geometry import block_geometry, greedy_boundaries
from dpcompress.graph.plan import Plan
from dpcompress.graph.rewrite import ReorderedBlock, max_merge_bytes, merge_reference, merged_model, reference_model
from tests.graph.test_trace import MODELS, TinyResidual
from tests.bn_calibration import calibrate_batchnorm, randomize_batchnorm_affine
from dpcompress.graph.trace import trace_model

# Weights per composed (uncropped) block in these tests: keeps them fast; merging itself is
# limited only by DPCOMPRESS_MAX_MERGE_BYTES. VGG11's smallest mergeable pair (128->256->256,
# 5x5) needs the larger cap.
MAX_WEIGHTS = 400_000
MAX_WEIGHTS_VGG = 2_000_000


def small_enough(chain, i, j):
    g = block_geometry(chain, i, j)
    cap = MAX_WEIGHTS_VGG if "vgg" in (chain.model or "") else MAX_WEIGHTS
    kh, kw = g.composed_kernel
    return j == i + 1 or g.out_channels * g.in_channels // g.groups * kh * kw <= cap


def plan_all_removed(chain):
    """No activation kept; each block as long as it can be within the weight cap."""
    boundaries = [0]
    while boundaries[-1] < chain.num_positions:
        start = boundaries[-1]
        boundaries.append(max(j for j in range(start + 1, chain.num_positions + 1)
                              if chain.is_valid_block(start, j) and small_enough(chain, start, j)))
    return Plan(activations=[], boundaries=boundaries, num_positions=chain.num_positions)


def random_plan(chain, seed):
    """Keep a random subset of activations; split each segment at random valid points."""
    rng = random.Random(seed)
    kept = sorted(p for p in chain.activation_positions if rng.random() < 0.5)
    ends = [0, *kept, chain.num_positions]
    boundaries = [0]
    for a, b in zip(ends[:-1], ends[1:]):
        position = a
        while position < b:
            options = [j for j in range(position + 1, b + 1)
                       if chain.is_valid_block(position, j) and small_enough(chain, position, j)]
            reachable = [j for j in options if j == b or _coverable(chain, j, b)]
            position = rng.choice(reachable)
            boundaries.append(position)
    return Plan(activations=kept, boundaries=boundaries, num_positions=chain.num_positions)


def _coverable(chain, start, end):
    try:
        greedy_boundaries(chain, start, end)
        return True
    except ValueError:
        return False


def merged_equal_to_reference(traced, plan, size):
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


def assert_merged_matches(traced, plan, size=64):
    merged = merged_equal_to_reference(traced, plan, size)
    merged_convs = sum(isinstance(m, torch.nn.Conv2d) for m in merged.modules())
    assert_geometry_matches(traced.chain, plan, merged)
    return merged_convs


def assert_geometry_matches(chain, plan, merged):
    """Each block's merged conv is the conv block_geometry predicts (what profiling times), cropped or not."""
    for index, block in enumerate(plan.blocks):
        conv, g = merged.get_submodule(f"dpc_block_{index}"), block_geometry(chain, *block)
        assert (conv.kernel_size, conv.stride, conv.padding, conv.groups) == (g.kernel, g.stride, g.padding, g.groups)
        assert (conv.in_channels, conv.out_channels) == (g.in_channels, g.out_channels)


@pytest.mark.parametrize("name", MODELS)
def test_merged_equals_reference_all_activations_removed(name, torchvision_traced):
    traced = torchvision_traced(name)
    plan = plan_all_removed(traced.chain)
    assert len(plan.blocks) < traced.chain.num_positions  # real merging happens
    assert_merged_matches(traced, plan)


@pytest.mark.parametrize("name", MODELS)
def test_merged_equals_reference_random_plan(name, torchvision_traced):
    traced = torchvision_traced(name)
    assert_merged_matches(traced, random_plan(traced.chain, seed=len(name)))


def test_single_conv_blocks_keep_every_activation_reproduce_the_model():
    model = TinyResidual()
    randomize_batchnorm_affine(model)
    calibrate_batchnorm(model, (4, 3, 16, 16))
    traced = trace_model(model, (1, 3, 16, 16))
    chain = traced.chain
    plan = Plan(activations=chain.activation_positions, boundaries=list(range(chain.num_positions + 1)),
                num_positions=chain.num_positions)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(reference_model(traced, plan)(x), expected, atol=1e-6)
        assert torch.allclose(merge_reference(reference_model(traced, plan))(x), expected, atol=1e-5)


def test_removing_an_activation_changes_the_output():
    model = TinyResidual()
    randomize_batchnorm_affine(model)
    calibrate_batchnorm(model, (4, 3, 16, 16))
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


class Strided(nn.Module):
    """Stride-2 convs around an identity residual: merged whole, a 31x31 kernel of stride 4."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8))
        self.act = nn.ReLU()
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.wide = nn.Sequential(nn.Conv2d(16, 16, 5, padding=2), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        x = self.act(x + self.b(self.a(x)))
        return self.head(self.wide(self.down(x))).mean((2, 3))


def traced_strided(size):
    model = Strided()
    randomize_batchnorm_affine(model)
    calibrate_batchnorm(model, (4, 3, *size))
    return trace_model(model, (1, 3, *size))


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
