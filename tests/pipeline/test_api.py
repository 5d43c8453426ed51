"""The Python API on in-memory models: custom residual nets, detector-like models with feature taps,
containers whose children the model chains, and timm specs."""

from __future__ import annotations

import importlib.util
import json
from collections import OrderedDict

import pytest
import torch
from torch import nn

import dpcompress
from dpcompress.export import flat_tensors
from dpcompress.graph.rewrite import reference_model
from dpcompress.graph.trace import trace_model
from dpcompress.search.solver import solve_with_frontier
from tests.bn_calibration import calibrate_batchnorm, randomize_batchnorm_affine
from tests.cost_backend import CostBackend

SHAPE = (1, 3, 16, 16)


def conv_bn(cin: int, cout: int, stride: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if act else nn.Sequential(*layers)


class ResidualNet(nn.Module):
    """Not from any zoo: two identity residuals, a strided conv between them, a classifier head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.a1, self.a2 = conv_bn(8, 8), conv_bn(8, 8, act=False)
        self.down = conv_bn(8, 16, stride=2)
        self.b1, self.b2 = conv_bn(16, 16), conv_bn(16, 16, act=False)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.a2(self.a1(x)))
        x = self.down(x)
        x = torch.relu(x + self.b2(self.b1(x)))
        return self.head(x)


class TappedBackbone(nn.Module):
    """Returns two feature maps, as a backbone feeding a feature pyramid does."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(conv_bn(3, 8), conv_bn(8, 8), conv_bn(8, 8))
        self.stage2 = nn.Sequential(conv_bn(8, 16, stride=2), conv_bn(16, 16), conv_bn(16, 16))

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        c1 = self.stage1(x)
        return OrderedDict([("c1", c1), ("c2", self.stage2(c1))])


class TinyDetector(nn.Module):
    """A resize in front (the backbone sees another input size than the model), a backbone with two taps,
    and one head per tap."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = TappedBackbone()
        self.heads = nn.ModuleList([nn.Conv2d(8, 4, 1), nn.Conv2d(16, 4, 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
        features = self.backbone(x)
        return torch.cat([head(f).flatten(1) for head, f in zip(self.heads, features.values())], dim=1)


class ChainedFeatures(nn.Module):
    """Calls the children of ``features`` one after another, keeping each output (SSDLite's pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Sequential(conv_bn(3, 8), conv_bn(8, 8)),
                                      nn.Sequential(conv_bn(8, 16, stride=2), conv_bn(16, 16)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for block in self.features:
            x = block(x)
            outputs.append(x.mean(dim=(2, 3)))
        return torch.cat(outputs, dim=1)


def realistic(model: nn.Module, shape=SHAPE) -> nn.Module:
    torch.manual_seed(0)
    randomize_batchnorm_affine(model)
    calibrate_batchnorm(model, shape)
    return model.eval()


def deepest_plan(model: nn.Module, shape, submodule=None):
    """The plan of the smallest latency in the cost model without pruning: it merges all that it can."""
    table = dpcompress.profile(model, shape, backend=CostBackend(), submodule=submodule, progress=False, prune=False)
    chain = dpcompress.trace(model, shape, submodule=submodule)
    _, frontier = solve_with_frontier(table, None, table.original_latency_ms(), chain.activation_positions)
    return dpcompress.solve(table, budget_ms=frontier[0].latency_ms, chain=chain), chain


def test_stages_on_a_custom_residual_model_merge_exactly():
    model = realistic(ResidualNet())
    plan, chain = deepest_plan(model, SHAPE)
    assert chain.num_positions == 6 and len(chain.residuals) == 2
    assert len(plan.blocks) < chain.num_positions, "the cost model makes merging pay: some block must merge"
    merged = dpcompress.merge(model, plan, SHAPE)
    reference = reference_model(trace_model(model, SHAPE), plan).eval()
    x = torch.randn(4, *SHAPE[1:])
    with torch.no_grad():
        torch.testing.assert_close(merged(x), reference(x), rtol=1e-4, atol=1e-5)
    convs = sum(isinstance(m, nn.Conv2d) for m in merged.modules())
    assert convs == len(plan.blocks)
    assert not merged.training


def test_compress_returns_a_merged_model_equal_to_its_reference(tmp_path):
    model = realistic(ResidualNet())
    result = dpcompress.compress(model, SHAPE, budget_ratio=0.9, backend=CostBackend(), out_dir=tmp_path,
                                 progress=False)
    x = torch.randn(2, *SHAPE[1:])
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), result.reference(x), rtol=1e-4, atol=1e-5)
    assert result.report["plan"] == result.plan.to_json()
    assert json.loads((tmp_path / "report.json").read_text())["export"]["verification"]["passed"]
    assert result.plan.latency_ms <= 0.9 * result.plan.original_latency_ms


def test_compress_without_out_dir_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    result = dpcompress.compress(realistic(ResidualNet()), SHAPE, backend=CostBackend(), measure=False,
                                 progress=False)
    assert result.report["export"]["verification"]["passed"]
    assert list(tmp_path.iterdir()) == []


def test_bad_settings_are_one_line_user_errors():
    with pytest.raises(dpcompress.UserError, match="epoch"):
        dpcompress.compress(ResidualNet(), SHAPE, epoch=3, progress=False)
    with pytest.raises(dpcompress.UserError, match="DataLoaders"):
        dpcompress.compress(ResidualNet(), SHAPE, data=42, backend=CostBackend(), progress=False)
    with pytest.raises(dpcompress.UserError, match="no submodule 'backbone.nope'.*backbone.stage1"):
        dpcompress.trace(TinyDetector(), SHAPE, submodule="backbone.nope")


def test_submodule_taps_stay_boundaries_and_the_whole_model_verifies(tmp_path):
    model = realistic(TinyDetector(), SHAPE)
    chain = dpcompress.trace(model, SHAPE, submodule="backbone")
    assert chain.input_shape == (1, 3, 32, 32), "the backbone sees the resized input"
    tap = 3  # stage1's output, read by the backbone's output as well as by stage2
    assert chain.unit(tap + 1).barrier and "output" in chain.unit(tap + 1).barrier
    assert all(not (i < tap < j) for i, j in chain.valid_blocks())

    result = dpcompress.compress(model, SHAPE, budget_ratio=0.95, backend=CostBackend(), submodule="backbone",
                                 out_dir=tmp_path, progress=False)
    assert tap in result.plan.boundaries
    assert isinstance(result.model.heads, nn.ModuleList) and result.model.backbone is not model.backbone
    x = torch.randn(2, *SHAPE[1:])
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), result.reference(x), rtol=1e-4, atol=1e-5)
        taps = result.model.backbone(nn.functional.interpolate(x, scale_factor=2.0))
    assert list(taps) == ["c1", "c2"]
    export = result.report["export"]
    assert export["verification"]["passed"] and "whole model" in export["note"]
    assert result.report["whole_model_bench"]["compressed"]["median_ms"] > 0
    assert "backbone" in (tmp_path / "report.md").read_text()


def test_chained_children_are_compressed_together_and_put_back_as_slices():
    model = realistic(ChainedFeatures())
    plan, chain = deepest_plan(model, SHAPE, submodule="features")
    assert chain.num_positions == 4
    merged = dpcompress.merge(model, plan, SHAPE, submodule="features")
    assert isinstance(merged.features, nn.Sequential) and len(merged.features) == 2
    site_reference = reference_model(trace_model(dpcompress.graph.submodule.submodule_site(
        model, "features", SHAPE).module, SHAPE), plan)
    x = torch.randn(2, *SHAPE[1:])
    with torch.no_grad():
        expected = flat_tensors(site_reference(x))
        stage1 = merged.features[0](x)
        torch.testing.assert_close(stage1, expected[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(merged.features[1](stage1), expected[1], rtol=1e-4, atol=1e-5)


def test_a_submodule_called_twice_is_refused():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = conv_bn(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block(self.block(x))

    with pytest.raises(dpcompress.UserError, match="called 2 times"):
        dpcompress.trace(Twice(), SHAPE, submodule="block")


def test_data_as_a_pair_of_datasets_becomes_train_holdout_and_test():
    from torch.utils.data import DataLoader, TensorDataset

    from dpcompress.api import _data_bundle

    train = TensorDataset(torch.randn(50, *SHAPE[1:]), torch.randint(0, 5, (50,)))
    validation = TensorDataset(torch.randn(10, *SHAPE[1:]), torch.randint(0, 5, (10,)))
    bundle = _data_bundle((DataLoader(train, batch_size=8), validation), SHAPE)
    assert (len(bundle.train), len(bundle.holdout), len(bundle.test)) == (45, 5, 10)
    seen = {int(i) for i in bundle.train.indices} | {int(i) for i in bundle.holdout.indices}
    assert seen == set(range(50))


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")
def test_timm_spec_builds_and_traces_a_small_timm_model():
    from dpcompress.models import build_model

    model = realistic(build_model("timm:mobilenetv3_small_050?num_classes=10"), (1, 3, 32, 32))
    chain = trace_model(model, (1, 3, 32, 32), spec="timm:mobilenetv3_small_050").chain
    assert chain.num_positions > 20
    assert len(chain.activation_positions) > 10, "timm's BatchNormAct2d hides activations unless unfused"
    plan, _ = deepest_plan(model, (1, 3, 32, 32))
    assert len(plan.blocks) < chain.num_positions
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        merged = dpcompress.merge(model, plan, (1, 3, 32, 32))(x)
        reference = reference_model(trace_model(model, (1, 3, 32, 32)), plan)(x)
    # With most activations gone the outputs reach thousands: compare relative to their scale, as export does.
    assert float((merged - reference).abs().max()) <= 1e-3 * float(reference.abs().max())
    with pytest.raises(dpcompress.UserError, match="unknown timm model"):
        build_model("timm:no_such_net")


@pytest.mark.slow
def test_progress_goes_to_stderr_and_json_stays_alone_on_stdout(tmp_path):
    import subprocess
    import sys

    table = tmp_path / "t.csv"
    common = ["--model", "dpcompress.zoo:tiny_mobilenet_v2", "--input-shape", "1,3,16,16"]
    run = subprocess.run([sys.executable, "-m", "dpcompress.cli", "profile", *common, "--iters", "3",
                          "--warmup", "1", "--timing", "standalone", "--out", str(table)],
                         capture_output=True, text=True, check=True)
    assert "profile:" in run.stderr and "100%" in run.stderr, "a log gets plain progress lines, the last at 100%"
    assert "%" not in run.stdout
    run = subprocess.run([sys.executable, "-m", "dpcompress.cli", "bench", *common, "--rounds", "2", "--iters", "2",
                          "--json"], capture_output=True, text=True, check=True)
    assert json.loads(run.stdout)["original"]["median_ms"] > 0
    quiet = subprocess.run([sys.executable, "-m", "dpcompress.cli", "--quiet", "profile", *common, "--iters", "3",
                            "--warmup", "1", "--timing", "standalone", "--out", str(tmp_path / "q.csv")],
                           capture_output=True, text=True, check=True)
    assert quiet.stderr == ""


def test_progress_bar_counts_tasks_apart():
    import io

    from dpcompress.progress import Counted, ProgressBar

    out = io.StringIO()
    bar = ProgressBar(stream=out, interval_s=0)
    bar("[3/7] importance")
    for done in (1, 2, 3):
        bar(Counted(f"segment {done}", done, 3, "importance"))
    bar(Counted("epoch 1/2", 1, 2, "fine-tune"))
    lines = out.getvalue().splitlines()
    assert lines[0] == "[3/7] importance"
    assert lines[3].startswith("importance: 100%") and "3/3" in lines[3] and lines[3].endswith("segment 3")
    assert lines[4].startswith("fine-tune:  50%") and "1/2" in lines[4]
    quiet = io.StringIO()
    ProgressBar(stream=quiet, quiet=True)(Counted("x", 1, 1, "profile"))
    assert quiet.getvalue() == ""


class NormAct(nn.BatchNorm2d):
    """Like timm's BatchNormAct2d: the activation runs inside the norm's forward."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.drop, self.act = nn.Identity(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                                           self.bias, False, 0.0, self.eps)))


def test_norm_act_modules_are_unfused_so_their_activations_can_go():
    model = realistic(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), NormAct(8),
                                    nn.Conv2d(8, 8, 3, padding=1, bias=False), NormAct(8)))
    traced = trace_model(model, SHAPE)
    assert traced.chain.activation_positions == [1] and traced.chain.unit(2).activation == "ReLU"
    assert type(model[1]) is NormAct, "the caller's model is left as it was"
    x = torch.randn(2, *SHAPE[1:])
    with torch.no_grad():
        torch.testing.assert_close(traced.gm(x), model(x))


def test_profile_has_pruning_options_by_default_where_a_conv_is_reducible():
    from dpcompress.zoo import tiny_mobilenet_v2

    model, shape = tiny_mobilenet_v2().eval(), (1, 3, 16, 16)
    assert dpcompress.trace(model, shape).reducible_positions()
    default = dpcompress.profile(model, shape, backend=CostBackend(), progress=False, timing="standalone")
    assert default.pruned_latency_ms and default.meta["prune"] is True
    off = dpcompress.profile(model, shape, backend=CostBackend(), progress=False, timing="standalone", prune=False)
    assert not off.pruned_latency_ms and set(off.latency_ms) == set(default.latency_ms)
