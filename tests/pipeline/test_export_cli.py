"""export and trace from the command line: a verified export, and bad inputs as one line with exit status 2."""

import onnx
import pytest

from tests.cli_helpers import error_line, run_cli


def test_export_onnx_verified(workdir):
    result = run_cli("export", "--model", "nets.py:small", "--input-shape", "1,3,16,16", "--plan", "plan.json",
                     "--format", "onnx", "--out", "merged.onnx", "--verify", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "verify:" in result.stdout and "OK" in result.stdout
    model = onnx.load(str(workdir / "merged.onnx"))
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node].count("Conv") == 1  # three convs became one


def test_export_torch_loads_without_dpcompress(workdir):
    result = run_cli("export", "--model", "nets.py:small", "--input-shape", "1,3,16,16", "--plan", "plan.json",
                     "--format", "torch", "--out", "merged.pt", cwd=workdir)
    assert result.returncode == 0, result.stderr
    import torch

    loaded = torch.jit.load(str(workdir / "merged.pt"))
    assert loaded(torch.randn(1, 3, 16, 16)).shape == (1, 4)


@pytest.mark.parametrize("args, message", [
    (["trace", "--model", "torchvision:not_a_model"], "unknown torchvision model"),
    (["trace", "--model", "nets.py:missing"], "has no callable 'missing'"),
    (["trace", "--model", "nowhere.py:small"], "does not exist"),
    (["trace", "--model", "nets.py:small", "--input-shape", "1,3,16"], "--input-shape"),
    (["export", "--model", "nets.py:other", "--input-shape", "1,3,16,16", "--plan", "plan.json",
      "--out", "x.onnx"], "position"),
    (["export", "--model", "nets.py:small", "--input-shape", "1,3,16,16", "--plan", "broken.json",
      "--out", "x.onnx"], "broken.json"),
    (["export", "--model", "nets.py:small", "--input-shape", "1,3,16,16", "--plan", "plan.json",
      "--format", "tensorrt", "--out", "x.engine"], "TensorRT"),
])
def test_bad_inputs_one_line_exit_2_nothing_written(workdir, args, message):
    (workdir / "broken.json").write_text('{"activations": [1, 2,')
    assert message in error_line(run_cli(*args, cwd=workdir))
    assert not list(workdir.glob("x.*"))


def test_export_of_a_block_over_the_merge_memory_limit_writes_nothing(workdir, monkeypatch):
    monkeypatch.setenv("DPCOMPRESS_MAX_MERGE_BYTES", "1000")  # the subprocess inherits it
    result = run_cli("export", "--model", "nets.py:small", "--input-shape", "1,3,16,16", "--plan", "plan.json",
                     "--format", "onnx", "--out", "x.onnx", cwd=workdir)
    line = error_line(result)
    assert "block (0, 3)" in line and "5x5 kernel" in line and "DPCOMPRESS_MAX_MERGE_BYTES" in line
    assert not list(workdir.glob("x.*"))


@pytest.mark.parametrize("kind, message", [
    ("text", "not a file written by torch.save"),
    ("list", "holds a list, not a state_dict"),
    ("module", "it pickles torch.nn.modules.conv.Conv2d"),
    ("no tensors", "holds a dict with no tensors"),
])
def test_weights_that_are_not_a_state_dict_one_line(workdir, kind, message):
    import torch

    path = workdir / "weights.pt"
    if kind == "text":
        path.write_text("these are not weights\n")
    else:
        torch.save({"list": [1, 2, 3], "module": torch.nn.Conv2d(3, 8, 3), "no tensors": {"epoch": 3}}[kind], path)
    result = run_cli("trace", "--model", "nets.py:small", "--input-shape", "1,3,16,16", "--weights", "weights.pt",
                     cwd=workdir)
    line = error_line(result)
    assert message in line and "state_dict()" in line


def test_an_onnx_export_with_its_weights_apart_lands_under_the_final_names(tmp_path, monkeypatch):
    """Past 1.5 GB of weights the exporter writes them to a file named after the model's: the pair must
    reach the output folder as model.onnx and model.onnx.data (the threshold is lowered here to 0)."""
    import numpy as np
    import onnxruntime as ort
    import torch
    import torch.onnx._internal.exporter._onnx_program as onnx_program

    from dpcompress.errors import UserError
    from dpcompress.export import export_plan

    monkeypatch.setattr(onnx_program, "_LARGE_MODEL_THRESHOLD", 0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    out = tmp_path / "model.onnx"
    report = export_plan(model, model, model, "onnx", out, (1, 3, 8, 8), verify=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert report.size_bytes == sum(p.stat().st_size for p in tmp_path.iterdir())
    x = torch.randn(1, 3, 8, 8)
    (y,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(y, model(x).numpy(), rtol=1e-4, atol=1e-5)
    other = tmp_path / "other"
    wrong = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1)).eval()  # verification fails against it
    with pytest.raises(UserError):
        export_plan(model, wrong, model, "onnx", other / "model.onnx", (1, 3, 8, 8), verify=True)
    assert not list(other.iterdir())
