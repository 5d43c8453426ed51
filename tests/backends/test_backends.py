"""Backends: selection and errors, faithful ONNX export, and agreement on which conv is slower."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from dpcompress.backends import choose_backend, cuda_available, export_onnx_bytes, get_backend
from dpcompress.cli import main
from dpcompress.errors import UserError
from dpcompress.latency.timing import time_runner
from tests.backends.conv_pairs import CHEAP, EXPENSIVE, slower_of_two

try:
    import tensorrt  # noqa: F401

    HAVE_TENSORRT = True
except ImportError:
    HAVE_TENSORRT = False

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_tensorrt = pytest.mark.skipif(not (HAVE_TENSORRT and torch.cuda.is_available()), reason="needs TensorRT")


def test_torch_and_onnxruntime_agree_on_the_slower_conv():
    onnxruntime = get_backend("onnxruntime", threads=1)
    torch_cpu = get_backend("torch", threads=1)
    assert slower_of_two(onnxruntime) == slower_of_two(torch_cpu) == "expensive"


def test_onnx_export_computes_what_the_module_computes():
    import onnxruntime as ort

    module, shape = EXPENSIVE
    x = torch.randn(*shape)
    session = ort.InferenceSession(export_onnx_bytes(module.eval(), x), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(y, module(x).numpy(), rtol=1e-4, atol=1e-4)


def test_onnx_runtime_runs_the_same_graph_whether_or_not_the_exporter_folded_the_norms(tmp_path):
    """Bench exports without constant folding (less memory): the session must fold the batch norms
    into the convs itself, leaving the graph that the folded export gives."""
    import onnx
    import onnxruntime as ort

    from dpcompress.backends import export_onnx_file

    module = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                           nn.Conv2d(8, 8, 3, groups=8, padding=1), nn.BatchNorm2d(8), nn.ReLU6()).eval()
    with torch.no_grad():
        module[1].running_var.uniform_(0.5, 2.0)  # so that folding changes the weights
        module[4].running_mean.uniform_(-1.0, 1.0)
    x = torch.randn(1, 3, 16, 16)
    graphs, outputs = [], []
    for fold in (True, False):
        path, optimized = tmp_path / f"fold{fold}.onnx", tmp_path / f"fold{fold}.optimized.onnx"
        export_onnx_file(module, x, path, fold_constants=fold)
        raw_ops = {n.op_type for n in onnx.load(str(path)).graph.node}
        assert ("BatchNormalization" in raw_ops) == (not fold)
        options = get_backend("onnxruntime", threads=1).session_options()
        options.optimized_model_filepath = str(optimized)
        outputs.append(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                       .run(None, {"x": x.numpy()})[0])
        graphs.append([(n.op_type, n.domain, sorted(str(onnx.helper.get_attribute_value(a)) for a in n.attribute))
                       for n in onnx.load(str(optimized)).graph.node])
    assert graphs[0] == graphs[1] and not any(op == "BatchNormalization" for op, _, _ in graphs[1])
    with torch.no_grad():
        for y in outputs:
            np.testing.assert_allclose(y, module(x).numpy(), rtol=1e-4, atol=1e-5)


def test_an_op_the_torchscript_exporter_cannot_export_goes_to_dynamo_quietly(capfd):
    import onnxruntime as ort

    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(7)).eval()  # 7x7 from 4x4
    x = torch.randn(1, 3, 4, 4)
    session = ort.InferenceSession(export_onnx_bytes(module, x), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(y, module(x).numpy(), rtol=1e-4, atol=1e-5)
    assert "graph" not in capfd.readouterr().err  # torch dumps the graph it failed on unless told not to


def test_onnxruntime_prepares_side_by_side_in_order_leaving_no_files(monkeypatch, tmp_path):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the exports' folders land here
    (cheap, _), (expensive, shape) = CHEAP, EXPENSIVE
    runners = get_backend("onnxruntime", threads=1).prepare_all([cheap, expensive], shape)
    assert len(list(tmp_path.iterdir())) == 2  # each rewritten graph, kept to build more sessions of
    medians = [time_runner(runner, warmup=2, iters=7).median_ms for runner in runners]
    assert medians[0] < medians[1]
    again = runners[1].another()  # a session of its own, of the same graph, which outlives the first
    assert again._session is not runners[1]._session
    del runners
    gc.collect()
    assert time_runner(again, warmup=1, iters=3).median_ms > 0 and len(list(tmp_path.iterdir())) == 1
    del again
    gc.collect()
    assert not list(tmp_path.iterdir())


def test_a_large_models_optimized_graph_is_saved_with_its_weights_beside_it(monkeypatch, tmp_path):
    """A saved graph over 2 GB cannot be one protobuf; past the size limit (here 0) the weights go to a
    file beside it, and the session that loads the graph computes what the module does."""
    import tempfile

    import dpcompress.backends.onnxruntime_backend as onnxruntime_backend

    monkeypatch.setattr(onnxruntime_backend, "SAVE_WEIGHTS_APART_OVER_BYTES", 0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    backend = get_backend("onnxruntime", threads=1)
    saved_folders = []
    build = backend._session

    def session(path, **options):
        made = build(path, **options)
        if options.get("save_optimized"):
            saved_folders.append({p.name: p.stat().st_size for p in Path(options["save_optimized"]).parent.iterdir()})
        return made

    monkeypatch.setattr(backend, "_session", session)
    module = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 8, 1)).eval()
    (runner,) = backend.prepare_all([module], (1, 8, 12, 12))
    (files,) = saved_folders
    weights = sum(p.numel() * 4 for p in module.parameters())
    assert files["model.onnx" + onnxruntime_backend.OPTIMIZED_SUFFIX + ".data"] >= weights // 2
    assert files["model.onnx" + onnxruntime_backend.OPTIMIZED_SUFFIX] < weights // 2
    x = runner._feed["x"]
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    for built in (runner, runner.another()):  # a session built again reads the weights beside the graph too
        np.testing.assert_allclose(built._session.run(None, built._feed)[0], expected, rtol=1e-4, atol=1e-5)
    del runner, built
    gc.collect()
    assert not list(tmp_path.iterdir())


def test_onnxruntime_threads_set_and_spinning_off():
    backend = get_backend("onnxruntime", threads=1)
    options = backend.session_options()
    assert options.intra_op_num_threads == 1 and backend.threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert get_backend("onnxruntime").threads >= 1  # default: all cores, set explicitly


def test_runner_returns_one_positive_sample_per_timed_run():
    module, shape = CHEAP
    for backend in (get_backend("onnxruntime", threads=1), get_backend("torch", threads=1)):
        samples = backend.prepare(module, shape).time(1, 4)
        assert len(samples) == 4 and all(s > 0 for s in samples)


def test_onnxruntime_call_overhead_is_below_a_conv_and_torch_has_none():
    backend = get_backend("onnxruntime", threads=1)
    overhead = backend.call_overhead_ms(EXPENSIVE[1], "fp32", warmup=2, iters=15)
    conv = time_runner(backend.prepare(*EXPENSIVE), warmup=2, iters=15).median_ms
    assert 0 < overhead < conv  # the 7x7 conv does ~12 MFLOP on top of the same call
    assert get_backend("torch", threads=1).call_overhead_ms(EXPENSIVE[1], "fp32", 2, 15) == 0.0


def test_user_errors():
    with pytest.raises(UserError, match="unknown backend"):
        get_backend("tvm")
    with pytest.raises(UserError, match="fp16"):
        get_backend("onnxruntime", threads=1).prepare(*CHEAP, precision="fp16")
    with pytest.raises(UserError, match="either --gpu or --backend"):
        choose_backend("torch", gpu=True)


@pytest.mark.skipif(cuda_available(), reason="checks the error without CUDA")
def test_gpu_without_cuda_is_a_clear_error(tmp_path):
    out = tmp_path / "t.csv"
    result = CliRunner().invoke(main, ["profile", "--model", "torchvision:mobilenet_v2", "--gpu", "--out", str(out)])
    assert result.exit_code == 2
    assert "--gpu needs a CUDA device" in result.output and "Traceback" not in result.output
    assert not out.exists()
    with pytest.raises(UserError, match="CUDA"):
        get_backend("torch", device="cuda")


@pytest.mark.skipif(HAVE_TENSORRT, reason="checks the error without TensorRT")
def test_missing_tensorrt_is_a_clear_error():
    with pytest.raises(UserError, match="needs TensorRT"):
        get_backend("tensorrt")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("cuda_graphs", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_torch_cuda_times_and_orders(cuda_graphs, precision):
    backend = get_backend("torch", device="cuda", cuda_graphs=cuda_graphs, channels_last=True)
    assert backend.options() == {"cuda_graphs": cuda_graphs, "channels_last": True}
    heavy = (nn.Conv2d(128, 128, 7, padding=3), (32, 128, 56, 56))
    light = (nn.Conv2d(128, 128, 1), (32, 128, 56, 56))
    heavy_ms = time_runner(backend.prepare(*heavy, precision), 3, 10).median_ms
    light_ms = time_runner(backend.prepare(*light, precision), 3, 10).median_ms
    assert 0 < light_ms < heavy_ms


@pytest.mark.gpu
@needs_cuda
def test_gpu_flag_picks_a_cuda_backend():
    backend, why = choose_backend(None, gpu=True)
    assert backend.device == "cuda" and backend.name in why
    assert backend.name == ("tensorrt" if HAVE_TENSORRT else "torch")


@pytest.mark.tensorrt
@needs_tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_times_and_orders(precision):
    backend = get_backend("tensorrt")
    heavy = (nn.Conv2d(128, 128, 7, padding=3), (32, 128, 56, 56))
    light = (nn.Conv2d(128, 128, 1), (32, 128, 56, 56))
    heavy_ms = time_runner(backend.prepare(*heavy, precision), 3, 10).median_ms
    light_ms = time_runner(backend.prepare(*light, precision), 3, 10).median_ms
    assert 0 < light_ms < heavy_ms
