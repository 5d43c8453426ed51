"""What is timed is what is shipped: the ONNX export the tables and benches time (TorchScript, opset 17) and
the one ``export`` writes (dynamo) hold the same operators, for every model of the zoo, two torchvision
models at a small input, and a merged network; the only differences are those named in
dpcompress/backends/onnx_export.py."""

from __future__ import annotations

from collections import Counter

import onnx
import pytest
import torch

from dpcompress.backends.onnx_export import export_onnx_file, write_onnx
from dpcompress.graph.plan import Plan
from dpcompress.graph.rewrite import merged_model
from dpcompress.graph.trace import trace_model
from dpcompress.models import build_model

# Nodes that compute nothing (weights and clip bounds as nodes, renamed tensors): the TorchScript export's.
NO_OPS = {"Identity", "Constant"}
# The same computation spelled two ways: TorchScript's op -> dynamo's.
SAME_OP = {"GlobalAveragePool": "ReduceMean", "Flatten": "Reshape"}

MODELS = [("dpcompress.zoo:tiny_mobilenet_v2", (1, 3, 32, 32)), ("dpcompress.zoo:digits_mobilenet_v2", (1, 3, 32, 32)),
          ("dpcompress.zoo:digits_resnet", (1, 3, 32, 32)), ("torchvision:mobilenet_v2", (1, 3, 64, 64)),
          ("torchvision:resnet18", (1, 3, 64, 64))]


def operators(path) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def timed_and_shipped(module: torch.nn.Module, shape, folder) -> "tuple[Counter, Counter]":
    export_onnx_file(module.eval(), torch.randn(*shape), folder / "timed.onnx")
    write_onnx(module, folder / "shipped.onnx", shape)
    return operators(folder / "timed.onnx"), operators(folder / "shipped.onnx")


def assert_same_operators(timed: Counter, shipped: Counter) -> None:
    assert not set(shipped) & (NO_OPS | set(SAME_OP)), shipped
    spelled = Counter()
    for op, count in timed.items():
        if op not in NO_OPS:
            spelled[SAME_OP.get(op, op)] += count
    assert spelled == shipped


@pytest.mark.slow
@pytest.mark.parametrize("spec, shape", MODELS, ids=[spec for spec, _ in MODELS])
def test_the_timed_and_the_shipped_export_hold_the_same_operators(spec, shape, tmp_path):
    timed, shipped = timed_and_shipped(build_model(spec), shape, tmp_path)
    assert timed["Conv"] > 0
    assert_same_operators(timed, shipped)


@pytest.mark.slow
def test_a_merged_network_exports_the_same_operators_both_ways(tmp_path):
    spec, shape = MODELS[1]
    traced = trace_model(build_model(spec), shape, spec=spec)
    chain = traced.chain
    boundaries = [0]  # pairs of convs merged where they may be, the activations between blocks kept
    while boundaries[-1] < chain.num_positions:
        start = boundaries[-1]
        boundaries.append(start + 2 if start + 2 <= chain.num_positions and chain.is_valid_block(start, start + 2)
                          else start + 1)
    plan = Plan(activations=[p for p in chain.activation_positions if p in boundaries[1:-1]], boundaries=boundaries,
                num_positions=chain.num_positions)
    merged = merged_model(traced, plan)
    timed, shipped = timed_and_shipped(merged, shape, tmp_path)
    assert timed["Conv"] == len(plan.blocks) < chain.num_positions  # the merge shows in both
    assert_same_operators(timed, shipped)


def test_the_operator_comparison_sees_a_difference():
    timed = Counter({"Conv": 2, "Relu": 1, "Identity": 3, "GlobalAveragePool": 1, "Flatten": 1})
    assert_same_operators(timed, Counter({"Conv": 2, "Relu": 1, "ReduceMean": 1, "Reshape": 1}))
    with pytest.raises(AssertionError):
        assert_same_operators(timed, Counter({"Conv": 2, "Relu": 2, "ReduceMean": 1, "Reshape": 1}))
    with pytest.raises(AssertionError):
        assert_same_operators(timed, Counter({"Conv": 2, "Relu": 1, "Identity": 1, "ReduceMean": 1, "Reshape": 1}))
