"""Reads of a tensor's metadata and eval-time identities after an activation are not readers of its values:
timm's CNNs trace like torchvision's, and the rewritten networks still run and stay exact (issue 30)."""

import copy
import importlib.util
import json
import random
from typing import List, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from click.testing import CliRunner

from dpcompress.cli import main
from dpcompress.graph.chain import Chain
from dpcompress.graph.plan import Plan
from dpcompress.graph.rewrite import ReorderedBlock, merge_reference, reference_model
from dpcompress.graph.trace import TracedModel, trace_model
from tests.bn_calibration import calibrate_batchnorm, randomize_batchnorm_affine

SIZE = 64  # the counts below are the same at 224 (578 valid blocks for both mobilenet_v2s)
needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")


def trace_json(spec: str) -> dict:
    result = CliRunner().invoke(main, ["trace", "--model", spec, "--input-shape", f"1,3,{SIZE},{SIZE}", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def barriers(chain: dict) -> List[Tuple[int, str]]:
    return [(layer["position"] - 1, layer["barrier"]) for layer in chain["layers"] if layer["barrier"]]


@needs_timm
def test_timm_mobilenetv2_traces_like_torchvision_mobilenet_v2():
    timm_chain, tv_chain = trace_json("timm:mobilenetv2_100"), trace_json("torchvision:mobilenet_v2")
    assert timm_chain["num_positions"] == tv_chain["num_positions"] == 52
    assert timm_chain["activation_positions"] == tv_chain["activation_positions"]
    assert len(timm_chain["activation_positions"]) == 34
    assert timm_chain["residuals"] == tv_chain["residuals"] and len(timm_chain["residuals"]) == 10
    assert barriers(timm_chain) == barriers(tv_chain) == []
    assert timm_chain["valid_blocks"] == tv_chain["valid_blocks"]
    assert timm_chain["num_valid_blocks"] == 578
    assert timm_chain["fingerprint"] == tv_chain["fingerprint"]  # shapes, links, activations, residuals


@needs_timm
def test_timm_resnet18_has_no_branch_barrier_that_torchvision_lacks():
    timm_chain, tv_chain = trace_json("timm:resnet18"), trace_json("torchvision:resnet18")
    timm_branches = {b for b in barriers(timm_chain) if b[1].startswith("a branch")}
    tv_branches = {b for b in barriers(tv_chain) if b[1].startswith("a branch")}
    assert timm_branches <= tv_branches
    assert barriers(timm_chain) == barriers(tv_chain)
    assert timm_chain["valid_blocks"] == tv_chain["valid_blocks"]


def random_plan(chain: Chain, seed: int, max_length: int = 4) -> Plan:
    """Random kept activations; each segment between them cut into random valid blocks of at most
    ``max_length`` convs (any block may be chosen from which the segment's end can still be reached)."""
    rng = random.Random(seed)
    kept = sorted(p for p in chain.activation_positions if rng.random() < 0.3)
    ends = [0, *kept, chain.num_positions]
    boundaries = [0]
    for a, b in zip(ends[:-1], ends[1:]):
        reaches_b = {b}  # positions from which valid blocks lead to b
        for i in range(b - 1, a - 1, -1):
            if any(chain.is_valid_block(i, j) for j in range(i + 1, min(i + max_length, b) + 1) if j in reaches_b):
                reaches_b.add(i)
        position = a
        while position < b:
            position = rng.choice([j for j in range(position + 1, min(position + max_length, b) + 1)
                                   if j in reaches_b and chain.is_valid_block(position, j)])
            boundaries.append(position)
    return Plan(activations=kept, boundaries=boundaries, num_positions=chain.num_positions)


def single_conv_plan(chain: Chain) -> Plan:
    """Every activation kept, every conv its own block: the reference network is the model."""
    return Plan(activations=chain.activation_positions, boundaries=list(range(chain.num_positions + 1)),
                num_positions=chain.num_positions)


def assert_merged_equals_reference(traced: TracedModel, plan: Plan, shape: Tuple[int, ...]) -> None:
    reference = reference_model(traced, plan).double().eval()
    merged = merge_reference(reference)
    assert not any(isinstance(m, ReorderedBlock) for m in merged.modules())
    x = torch.randn(2, *shape[1:], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = reference(x), merged(x)
    scale = expected.abs().max().item()
    assert scale > 1e-3
    assert (got - expected).abs().max().item() <= 1e-7 * scale


def assert_reference_equals_model(traced: TracedModel, model: nn.Module, shape: Tuple[int, ...]) -> None:
    reference = reference_model(traced, single_conv_plan(traced.chain)).double().eval()
    x = torch.randn(2, *shape[1:], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reference(x), copy.deepcopy(model).double().eval()(x), rtol=1e-9, atol=1e-9)


def crossed(plan: Plan, positions: List[int]) -> List[int]:
    return [p for p in positions if any(start < p < end for start, end in plan.blocks)]


@needs_timm
def test_timm_mobilenetv2_merged_equals_reference_across_formerly_barred_positions():
    from dpcompress.models import build_model

    shape = (1, 3, SIZE, SIZE)
    model = build_model("timm:mobilenetv2_100?num_classes=10")
    randomize_batchnorm_affine(model)
    calibrate_batchnorm(model, (4, *shape[1:]))
    traced = trace_model(model, shape)
    # Where the next conv reads the unused aa/se slots (nn.Identity) after the activation: a "branch" barrier
    # before identities after the activation were followed (one in each of the 17 inverted residual blocks).
    formerly_barred = [p for p in range(1, traced.chain.num_positions) if traced.unit_nodes(p).trailing]
    assert len(formerly_barred) == 17
    assert all(isinstance(traced.gm.get_submodule(str(node.target)), nn.Identity)
               for p in formerly_barred for node in traced.unit_nodes(p).trailing)
    plan = random_plan(traced.chain, seed=3)
    assert len(crossed(plan, formerly_barred)) >= 5, plan.blocks
    assert_merged_equals_reference(traced, plan, shape)
    assert_reference_equals_model(traced, model, shape)


class ChecksBetweenConvs(nn.Module):
    """Convs with assertions on metadata (as timm's BatchNormAct2d has) and shape reads between them."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1 = nn.Conv2d(8, 16, 1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, "expects N,C,H,W")
        x = self.stem(x)
        y = self.bn1(self.conv1(x))
        torch._assert(y.ndim == 4, "expects N,C,H,W")
        n, c, h, w = y.shape
        torch._assert(h == w, "expects a square input")
        y = F.relu(y)
        torch._assert((y.size(1) == 16) & (y.dim() == 4), "expects 16 channels")
        torch._assert(y.dtype == self.conv2.weight.dtype, "expects the weights' dtype")
        z = F.relu6(self.bn2(self.conv2(y)))
        z = self.conv3(z) + x
        return self.head(z.mean((2, 3)))


def test_assertions_on_metadata_between_convs_are_no_barrier_and_merge_away():
    shape = (1, 3, 12, 12)
    model = ChecksBetweenConvs()
    randomize_batchnorm_affine(model)
    calibrate_batchnorm(model, (4, *shape[1:]))
    traced = trace_model(model, shape)
    chain = traced.chain
    assert chain.num_positions == 4 and [u.linked for u in chain.units] == [False, True, True, True]
    assert chain.residuals and (chain.residuals[0].start, chain.residuals[0].end) == (1, 4)
    assert traced.metadata_checks and chain.activation_positions == [1, 2, 3]
    assert_reference_equals_model(traced, model, shape)

    # One block over convs 2..4 (the residual inside): the tensors the checks read are gone.
    plan = Plan(activations=[1], boundaries=[0, 1, 4], num_positions=4)
    assert_merged_equals_reference(traced, plan, shape)
    merged = merge_reference(reference_model(traced, plan))
    asserts = [n for n in merged.graph.nodes if n.target is torch._assert]
    assert len(asserts) == 1 and asserts[0].args[1] == "expects N,C,H,W"  # the one on the input stays
    assert not any(name.startswith("conv2.") for name, _ in merged.named_parameters())  # read by a check only
    assert merged(torch.randn(*shape)).shape == (1, 4)


class ShapeFeedsComputation(nn.Module):
    """A position's shape used to compute (an interpolation to it): the tensor must then exist."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        return F.interpolate(self.conv2(y), size=y.shape[-2:])


def test_a_shape_read_that_feeds_computation_stays_a_reader():
    traced = trace_model(ShapeFeedsComputation(), (1, 3, 8, 8))
    chain = traced.chain
    assert [u.name for u in chain.units] == ["conv1", "conv2"]
    assert chain.unit(2).barrier == "position also read by getattr"
    assert not traced.metadata_checks
