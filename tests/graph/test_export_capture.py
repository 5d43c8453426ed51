"""Capture by torch.export (issue 30): a model torch.fx cannot trace gets its chain and exact rewritten networks
on every output, and an fx-traceable model gets the same chain from either capture."""

import importlib.util
from typing import Dict, List

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dpcompress.backends.onnx_export import flat_tensors
from dpcompress.errors import UserError
from dpcompress.graph.chain import Chain
from dpcompress.graph.plan import Plan
from dpcompress.graph.rewrite import merge_reference, reference_model
from dpcompress.graph.trace import trace_model
from dpcompress.models import build_model
from tests.bn_calibration import calibrate_batchnorm, randomize_batchnorm_affine
from tests.cli_helpers import error_line, run_cli

SHAPE = (1, 3, 16, 16)
needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")


class Untraceable(nn.Module):
    """What torch.fx cannot trace (a chunk iterated, a branch on a shape), returning a dict that holds a list:
    conv units with several activations, an identity residual inside a split, a concatenation, pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU6())
        self.expand = nn.Sequential(nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16), nn.Hardswish())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.GELU(),
                                  nn.Dropout(0.1))
        self.project = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
        self.act = nn.LeakyReLU(0.1)
        self.fuse = nn.Sequential(nn.Conv2d(16, 12, 3, padding=1), nn.BatchNorm2d(12), nn.PReLU(12))
        self.head = nn.Conv2d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> Dict[str, object]:
        y = self.stem(x)
        a, b = list(self.expand(y).chunk(2, 1))
        b = self.act(self.project(self.body(b)) + b)
        fused = self.fuse(torch.cat([a, b], 1))
        if fused.shape[-1] > 4:
            fused = F.max_pool2d(fused, 2)
        return {"out": self.head(fused), "features": [y, fused]}


def calibrated(model: nn.Module, shape=SHAPE) -> nn.Module:
    randomize_batchnorm_affine(model)
    return calibrate_batchnorm(model, (4, *shape[1:]))


def outputs(model: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    with torch.no_grad():
        return flat_tensors(model.eval()(x))


def assert_same_outputs(got: object, expected: object, tolerance: float) -> None:
    """The same structure (dicts, lists, tuples) and every tensor within ``tolerance`` of its own scale."""
    assert type(got) is type(expected)
    if isinstance(expected, dict):
        assert list(got) == list(expected)
        for key in expected:
            assert_same_outputs(got[key], expected[key], tolerance)
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert_same_outputs(g, e, tolerance)
    else:
        scale = expected.abs().max().item()
        assert scale > 1e-3
        assert (got - expected).abs().max().item() <= tolerance * scale


def test_a_model_fx_cannot_trace_is_captured_by_export_with_its_chain():
    model = calibrated(Untraceable())
    traced = trace_model(model, SHAPE)
    chain = traced.chain
    assert chain.capture == "export" and chain.to_json()["capture"] == "export"
    assert chain.notes[0].startswith("captured with torch.export: torch.fx cannot trace the model (TraceError")
    assert [u.name for u in chain.units] == ["stem.0", "expand.0", "body.0", "project.0", "fuse.0", "head"]
    assert [u.batchnorm for u in chain.units] == ["stem.1", "expand.1", "body.1", "project.1", "fuse.1", None]
    assert [u.activation for u in chain.units] == ["ReLU6", "Hardswish", "GELU", "LeakyReLU", "PReLU", None]
    assert [(r.start, r.end) for r in chain.residuals] == [(2, 4)]  # from the input of conv 3 (a half of the split)
    barriers = {u.position: u.barrier for u in chain.units if u.barrier}
    assert barriers == {2: "position also read by output", 3: "getitem", 5: "cat", 6: "max_pool2d"}
    assert chain.valid_blocks() == [(0, 1), (1, 2), (2, 3), (2, 4), (3, 4), (4, 5), (5, 6)]
    assert chain.reducible_positions() == [2, 3, 4]  # stride 1, output shaped as input
    assert Chain.from_json(chain.to_json()).capture == "export"
    assert traced.model is traced.gm  # the original, as captured
    assert not any(module.training for module in traced.gm.modules())  # .train() on it would set the norms too

    # The capture shares the model's tensors, and every conv of the reference network is the model's own.
    assert traced.gm.get_submodule("stem.0").weight is model.stem[0].weight
    reference = reference_model(traced, single_conv_plan(chain))
    x = torch.randn(3, *SHAPE[1:])  # another batch size than the traced one
    with torch.no_grad():
        assert_same_outputs(reference(x), model(x), 1e-6)


def single_conv_plan(chain: Chain) -> Plan:
    return Plan(activations=chain.activation_positions, boundaries=list(range(chain.num_positions + 1)),
                num_positions=chain.num_positions)


@pytest.mark.parametrize("pruned", [[], [3]])
def test_merged_equals_reference_on_every_output_of_an_export_capture(pruned):
    model = calibrated(Untraceable())
    traced = trace_model(model, SHAPE)
    # GELU at 3 removed and convs 3-4 merged with the residual inside; Hardswish at 2 removed without a merge.
    plan = Plan(activations=[1, 4, 5], boundaries=[0, 1, 2, 4, 5, 6], num_positions=6, pruned=pruned)
    reference = reference_model(traced, plan).double().eval()
    merged = merge_reference(reference)
    assert sum(isinstance(m, nn.Conv2d) for m in merged.modules()) == 5
    x = torch.randn(2, *SHAPE[1:], dtype=torch.float64)
    with torch.no_grad():
        expected = reference(x)
        assert_same_outputs(merged(x), expected, 1e-9)
    # The reference is the model without those activations: the model, GELU and Hardswish made identities.
    model.double()
    model.expand[2], model.body[2] = nn.Identity(), nn.Identity()
    if pruned:
        model.body[0], model.body[1] = nn.Identity(), nn.Identity()
    with torch.no_grad():
        assert_same_outputs(expected, model(x), 1e-9)


def test_capture_fx_refuses_what_fx_cannot_trace_and_export_alone_says_nothing_of_fx():
    with pytest.raises(UserError, match=r"torch.fx cannot trace the model \(TraceError.*try capture 'export'"):
        trace_model(Untraceable(), SHAPE, capture="fx")
    assert trace_model(Untraceable(), SHAPE, capture="export").chain.notes[0].startswith("barrier at")
    with pytest.raises(UserError, match="unknown capture 'dynamo'; choose one of auto, fx, export"):
        trace_model(Untraceable(), SHAPE, capture="dynamo")


def test_the_api_and_the_trace_command_take_a_capture(workdir):
    import json

    from click.testing import CliRunner

    import dpcompress
    from dpcompress.cli import main

    assert dpcompress.trace(Untraceable(), SHAPE).capture == "export"
    with pytest.raises(UserError, match="torch.fx cannot trace"):
        dpcompress.trace(Untraceable(), SHAPE, capture="fx")
    chains = {}
    for capture in ("auto", "export"):
        result = CliRunner().invoke(main, ["trace", "--model", f"{workdir}/nets.py:small", "--input-shape", "1,3,8,8",
                                           "--json", "--capture", capture])
        assert result.exit_code == 0, result.output
        chains[capture] = json.loads(result.output)
    assert chains["auto"]["capture"] == "fx" and chains["export"]["capture"] == "export"
    assert chains["auto"]["fingerprint"] == chains["export"]["fingerprint"]
    assert chains["auto"]["valid_blocks"] == chains["export"]["valid_blocks"] == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]


NEITHER = '''
import torch.nn as nn

class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y if y.sum() > 0 else -y

def data_dependent():
    return DataDependent()
'''


def test_a_model_neither_capture_takes_is_one_line_naming_both_failures(tmp_path):
    (tmp_path / "nets.py").write_text(NEITHER)
    line = error_line(run_cli("trace", "--model", "nets.py:data_dependent", "--input-shape", "1,3,8,8", cwd=tmp_path))
    assert line.startswith("error: neither capture takes the model: torch.fx cannot trace the model (TraceError")
    assert "; torch.export cannot capture the model (" in line


def chain_structure(chain: Chain) -> dict:
    """Everything a plan and a table depend on: positions and their convs, activations, barriers, residuals,
    valid blocks (barrier reasons name ops differently: ``AdaptiveAvgPool2d (avgpool)`` against its ATen op)."""
    return {"fingerprint": chain.fingerprint(), "names": [u.name for u in chain.units],
            "batchnorms": [u.batchnorm for u in chain.units], "activations": [u.activation for u in chain.units],
            "barriers": [u.position for u in chain.units if u.barrier], "residuals": chain.residuals,
            "valid_blocks": chain.valid_blocks(), "reducible": chain.reducible_positions()}


def assert_both_captures_agree(spec: str) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model(spec).eval()
    shape = (1, 3, 64, 64)
    by_fx, by_export = trace_model(model, shape, capture="fx"), trace_model(model, shape, capture="export")
    assert (by_fx.chain.capture, by_export.chain.capture) == ("fx", "export")
    assert chain_structure(by_export.chain) == chain_structure(by_fx.chain)
    assert len(by_fx.chain.valid_blocks()) > by_fx.chain.num_positions  # something merges
    x = torch.randn(2, *shape[1:])
    torch.testing.assert_close(outputs(by_export.gm, x), outputs(model, x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
                                  "shufflenet_v2_x0_5"])
def test_torchvision_classifiers_get_the_same_chain_from_either_capture(name):
    assert_both_captures_agree(f"torchvision:{name}")


@needs_timm
@pytest.mark.parametrize("name", ["mobilenetv2_100", "resnet18", "efficientnet_b0"])
def test_timm_classifiers_get_the_same_chain_from_either_capture(name):
    assert_both_captures_agree(f"timm:{name}")


def test_importance_and_fine_tuning_refuse_a_model_that_returns_no_logits_tensor(tmp_path):
    import dpcompress
    from dpcompress.search.importance import ImportanceSettings, compute_importance
    from dpcompress.training.finetune import finetune
    from tests.cost_backend import CostBackend

    traced = trace_model(Untraceable(), SHAPE)
    with pytest.raises(UserError, match=r"importance 'proxy' needs a model whose forward returns one tensor of "
                                        r"logits; this one returns a dict \(a detector\?\): use uniform"):
        compute_importance(traced, ImportanceSettings(method="proxy"), tmp_path / "importance.csv")
    with pytest.raises(UserError, match="fine-tuning needs a model whose forward returns one tensor of logits"):
        finetune(traced, single_conv_plan(traced.chain), data=None, out=tmp_path / "ckpt.pt")
    with pytest.raises(UserError, match="importance 'proxy' needs a model whose forward returns one tensor"):
        dpcompress.compress(Untraceable(), SHAPE, importance="proxy", backend=CostBackend(), out_dir=tmp_path / "out",
                            progress=False)
    assert not (tmp_path / "out").exists()  # refused before profiling
