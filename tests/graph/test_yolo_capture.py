"""Ultralytics YOLO, which torch.fx cannot trace, through the torch.export capture (issue 30): its chain, and
reference and merged networks exact on every output of the detector (boxes and scores, raw head outputs,
feature maps), with and without pruned convs."""

from typing import List

import pytest
import torch

from dpcompress.backends.onnx_export import flat_tensors
from dpcompress.graph.plan import Plan
from dpcompress.graph.rewrite import merge_reference, reference_model
from dpcompress.graph.trace import TracedModel, trace_model
from tests.random_plans import random_plan, with_random_pruning
from tests.yolo_models import needs_ultralytics, yolo

pytestmark = needs_ultralytics
SIZE = 320
# config: (convs, removable activations, identity residuals, valid blocks) at 320x320
EXPECTED = {"yolov8n.yaml": (64, 56, 0, 101), "yolo11n.yaml": (88, 76, 2, 149)}


def run(model: torch.nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    with torch.no_grad():
        return flat_tensors(model.eval()(x))


def assert_outputs_close(got: List[torch.Tensor], expected: List[torch.Tensor], tolerance: float) -> None:
    assert len(got) == len(expected) == 6  # (boxes and scores), {boxes, scores, feats: [P3, P4, P5]}
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        assert (g - e).abs().max().item() <= tolerance * max(e.abs().max().item(), 1.0)


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def traced(request) -> TracedModel:
    return trace_model(yolo(request.param, SIZE), (1, 3, SIZE, SIZE), spec=request.param)


def test_yolo_chain_from_the_export_capture(traced):
    chain = traced.chain
    assert chain.capture == "export" and "torch.fx cannot trace" in chain.notes[0]
    counts = (chain.num_positions, len(chain.activation_positions), len(chain.residuals), len(chain.valid_blocks()))
    assert counts == EXPECTED[chain.model]
    assert all(u.activation in ("SiLU", None) for u in chain.units)
    # The bottlenecks' two 3x3 convs merge (their adds follow the SiLU: barriers); the head's branches merge too.
    bottleneck = next(u.position for u in chain.units if u.name == "model.2.m.0.cv1.conv")
    assert chain.is_valid_block(bottleneck - 1, bottleneck + 1)
    assert chain.unit(chain.num_positions).name.endswith("dfl.conv")  # the head's fixed conv, behind its softmax
    assert not chain.unit(chain.num_positions).linked


def test_yolo_capture_and_its_single_conv_reference_compute_the_model(traced):
    plan = Plan(activations=traced.chain.activation_positions, num_positions=traced.chain.num_positions,
                boundaries=list(range(traced.chain.num_positions + 1)))
    reference = reference_model(traced, plan)
    model = yolo(traced.chain.model, SIZE)  # built again: independent of the capture
    x = torch.randn(2, 3, SIZE, SIZE)
    expected = run(model, x)
    assert_outputs_close(run(traced.gm, x), expected, 0.0)
    assert_outputs_close(run(reference, x), expected, 1e-5)


@pytest.mark.parametrize("pruning", [False, True])
def test_yolo_merged_equals_reference_on_every_output(traced, pruning):
    plan = random_plan(traced.chain, seed=1)
    if pruning:
        plan = with_random_pruning(traced.chain, plan, seed=2)
        assert plan.pruned
    assert len(plan.blocks) < traced.chain.num_positions
    reference = reference_model(traced, plan).double()
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    assert_outputs_close(run(merge_reference(reference), x), run(reference, x), 1e-9)
