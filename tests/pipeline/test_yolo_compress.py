"""compress on an Ultralytics YOLO detector (issue 30): the torch.export capture through the whole job, with
and without pruning options, at a budget the cost model can meet. The merged detector equals its reference on
every output and the whole model's ONNX export is verified. Latency is the cost backend's (no timing here)."""

import pytest
import torch

import dpcompress
from dpcompress.backends.onnx_export import flat_tensors
from tests.cost_backend import CostBackend
from tests.yolo_models import needs_ultralytics, yolo

SHAPE = (1, 3, 160, 160)


@needs_ultralytics
@pytest.mark.slow
@pytest.mark.parametrize("prune", [False, True])
def test_compress_yolov8n_with_and_without_pruning(tmp_path, prune):
    model = yolo("yolov8n.yaml", SHAPE[2])
    result = dpcompress.compress(model, SHAPE, budget_ratio=0.97, backend=CostBackend(), measure=False,
                                 prune=prune, warmup=0, iters=1, out_dir=tmp_path, progress=False)
    plan = result.plan
    assert plan.latency_ms <= 0.97 * plan.original_latency_ms
    assert plan.pruned if prune else (len(plan.blocks) < 64 and not plan.pruned)  # convs pruned, or merged
    x = torch.randn(2, *SHAPE[1:])
    with torch.no_grad():
        merged, reference = flat_tensors(result.model(x)), flat_tensors(result.reference(x))
    assert len(merged) == len(reference) == 6
    for got, expected in zip(merged, reference):
        assert (got - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()
    export = result.report["export"]
    assert export["verification"]["passed"] and export["note"] is None  # the whole detector, in ONNX Runtime
    assert export["after"]["conv_layers"] < export["before"]["conv_layers"] == 64
    assert result.report["importance_method"] == "uniform"
