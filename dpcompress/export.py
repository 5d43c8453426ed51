"""Write a merged network as torch (TorchScript .pt), ONNX, OpenVINO IR or a TensorRT engine, and verify it."""

from __future__ import annotations

import io
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from dpcompress.backends.onnx_export import flat_tensors, onnx_bytes, write_onnx
from dpcompress.errors import UserError
from dpcompress.fileio import PathLike, atomic_path, staged_beside
from dpcompress.memory import release_freed_memory

FORMATS = ("torch", "onnx", "openvino", "tensorrt")


@dataclass(frozen=True)
class ModelStats:
    parameters: int
    flops: int  # multiply-accumulates of convolutions and linear layers, times two
    conv_layers: int


def model_stats(model: nn.Module, input_shape: Sequence[int]) -> ModelStats:
    """Parameters, FLOPs (2 x MACs of conv and linear layers) and Conv2d count at ``input_shape``, counted
    over the calls of Conv2d and Linear modules while the model runs once (any model: no tracing needed)."""
    counts = {"macs": 0, "convs": 0}

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            counts["convs"] += 1
            counts["macs"] += output.numel() * (module.in_channels // module.groups) * kh * kw
        else:
            counts["macs"] += output.numel() * module.in_features

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(torch.randn(*input_shape, dtype=next(model.parameters()).dtype))
    finally:
        for handle in handles:
            handle.remove()
    return ModelStats(parameters=sum(p.numel() for p in model.parameters()), flops=2 * counts["macs"],
                      conv_layers=counts["convs"])


def export_bytes(model: nn.Module, fmt: str, input_shape: Sequence[int], dynamic_batch: bool = False,
                 precision: str = "fp32", onnx_model: Optional[bytes] = None) -> bytes:
    """``model`` serialised as TorchScript (``torch``) or a TensorRT engine (``tensorrt``); ONNX and
    OpenVINO IR are written to files by :func:`export_plan`."""
    if fmt not in ("torch", "tensorrt"):
        raise ValueError(f"export_bytes writes torch or tensorrt, not {fmt!r}")
    model = model.eval()
    if fmt == "torch":
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            scripted = torch.jit.trace(model, torch.randn(*input_shape))
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
        return buffer.getvalue()
    from dpcompress.backends.tensorrt_backend import TensorRTBackend

    data = onnx_model if onnx_model is not None else onnx_bytes(model, input_shape, dynamic_batch)
    return TensorRTBackend().build_engine(data, precision)


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


@dataclass(frozen=True)
class Verification:
    max_abs_error: float
    max_rel_error: float  # max |a - b| / max |b|
    output_scale: float  # max |b| of the reference output
    passed: bool

    def to_json(self) -> Dict[str, object]:
        return asdict(self)


def verify_onnx(onnx_model: "bytes | str", reference: nn.Module, input_shape: Sequence[int],
                tolerance: float = 1e-3, trials: int = 3, seed: int = 0) -> Verification:
    """Run the exported model (its bytes or its file) in ONNX Runtime and ``reference`` in torch on random
    inputs; compare."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    return compare_outputs(lambda x: session.run(None, {input_name: x}), reference, input_shape, tolerance,
                           trials, seed)


def verify_openvino(model_path: PathLike, reference: nn.Module, input_shape: Sequence[int],
                    tolerance: float = 1e-3, trials: int = 3, seed: int = 0) -> Verification:
    """Run the OpenVINO IR at ``model_path`` on the CPU (fp32 inference) and ``reference`` in torch; compare."""
    from dpcompress.backends.openvino_backend import import_openvino

    ov = import_openvino()
    compiled = ov.Core().compile_model(str(model_path), "CPU", {ov.properties.hint.inference_precision: ov.Type.f32})
    return compare_outputs(lambda x: [compiled({0: x})[output] for output in compiled.outputs], reference,
                           input_shape, tolerance, trials, seed)


def compare_outputs(run: Callable[[np.ndarray], Sequence[np.ndarray]], reference: nn.Module,
                    input_shape: Sequence[int], tolerance: float, trials: int, seed: int) -> Verification:
    """``run`` (an exported model, returning its outputs) against ``reference`` in torch on ``trials`` seeded
    random inputs. Each output is compared relative to its own scale; the worst output counts."""
    generator = torch.Generator().manual_seed(seed)
    max_abs, scale, relative = 0.0, 0.0, 0.0
    reference = reference.eval()
    for _ in range(trials):
        x = torch.randn(*input_shape, generator=generator)
        with torch.no_grad():
            expected = [t.double().numpy() for t in flat_tensors(reference(x))]
        got = [np.asarray(o).astype(np.float64) for o in run(x.numpy())]
        if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected)):
            raise UserError(f"the exported model's outputs {[g.shape for g in got]} do not match the reference's "
                            f"{[e.shape for e in expected]}; the export was not written")
        for g, e in zip(got, expected):
            error, output_scale = float(np.max(np.abs(g - e))), float(np.max(np.abs(e)))
            max_abs, scale = max(max_abs, error), max(scale, output_scale)
            relative = max(relative, error / output_scale if output_scale > 0 else float("inf"))
    return Verification(max_abs_error=max_abs, max_rel_error=relative, output_scale=scale,
                        passed=relative <= tolerance)


def check_verification(result: Verification, tolerance: float) -> None:
    if not result.passed:
        raise UserError(f"verification failed: max relative error {result.max_rel_error:.3g} exceeds "
                        f"{tolerance:g} (max abs {result.max_abs_error:.3g}); the export was not written")


def check_openvino_path(out: PathLike) -> None:
    if Path(out).suffix != ".xml":
        raise UserError(f"--format openvino writes an .xml with its weights in a .bin beside it; give --out a "
                        f"path ending in .xml (got {out})")


def write_openvino_ir(onnx_model: "bytes | PathLike", out: PathLike, reference: Optional[nn.Module] = None,
                      input_shape: Sequence[int] = (), tolerance: float = 1e-3) -> Tuple[int, Optional[Verification]]:
    """``onnx_model`` as OpenVINO IR: ``out`` (.xml) and its weights beside it (.bin, fp32). With ``reference``,
    the IR is first read back and run in OpenVINO against it, and nothing is written if it is off by more than
    ``tolerance``. Returns the bytes written and the verification."""
    from dpcompress.backends.openvino_backend import import_openvino

    check_openvino_path(out)
    ov = import_openvino()
    with tempfile.TemporaryDirectory(prefix="dpcompress_ir_") as folder:
        xml = Path(folder) / "model.xml"
        source = onnx_model if isinstance(onnx_model, bytes) else str(onnx_model)
        ov.save_model(ov.Core().read_model(source), str(xml), compress_to_fp16=False)
        verification = None
        if reference is not None:
            verification = verify_openvino(xml, reference, input_shape, tolerance)
            check_verification(verification, tolerance)
        graph, weights = xml.read_bytes(), xml.with_suffix(".bin").read_bytes()
    write_bytes_atomic(Path(out).with_suffix(".bin"), weights)  # the .xml last: it names a complete model
    write_bytes_atomic(out, graph)
    return len(graph) + len(weights), verification



@dataclass(frozen=True)
class ExportReport:
    before: ModelStats
    after: ModelStats
    verification: Optional[Verification]
    size_bytes: int
    note: Optional[str] = None  # what was exported where it is not simply the model (a submodule alone)

    def to_json(self) -> Dict[str, object]:
        return {"before": asdict(self.before), "after": asdict(self.after), "size_bytes": self.size_bytes,
                "verification": self.verification.to_json() if self.verification else None, "note": self.note}


def export_plan(original: nn.Module, reference: nn.Module, merged: nn.Module, fmt: str, out: PathLike,
                input_shape: Sequence[int], verify: bool = False, tolerance: float = 1e-3,
                dynamic_batch: bool = False, precision: str = "fp32") -> ExportReport:
    """Export ``merged`` (the plan applied to ``original``); with ``verify``, check it against ``reference``
    first (in OpenVINO for ``openvino``, else in ONNX Runtime) and write nothing if it is off by more than
    ``tolerance`` (relative)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    verification = None
    if fmt == "openvino":
        check_openvino_path(out)
        with tempfile.TemporaryDirectory(prefix="dpcompress_onnx_") as folder:
            onnx_path = Path(folder) / "model.onnx"
            write_onnx(merged, onnx_path, input_shape, dynamic_batch)
            size, verification = write_openvino_ir(onnx_path, out, reference if verify else None, input_shape,
                                                   tolerance)
        return ExportReport(before=model_stats(original, input_shape), after=model_stats(merged, input_shape),
                            verification=verification, size_bytes=size)
    if fmt == "onnx":
        import onnx

        # Moved to ``out`` only once verified, with the weights file that the exporter writes beside a
        # model over 1.5 GB (named after the model, so it is written under the final name).
        with staged_beside(out) as staged:
            write_onnx(merged, staged, input_shape, dynamic_batch)
            if verify:
                verification = verify_onnx(str(staged), reference, input_shape, tolerance)
                check_verification(verification, tolerance)
            onnx.checker.check_model(str(staged))
            size = sum(file.stat().st_size for file in staged.parent.iterdir())
        release_freed_memory()  # the export's and the verifying session's copies of the weights
        return ExportReport(before=model_stats(original, input_shape), after=model_stats(merged, input_shape),
                            verification=verification, size_bytes=size)
    onnx_model = None
    if verify:
        onnx_model = onnx_bytes(merged, input_shape, dynamic_batch)
        verification = verify_onnx(onnx_model, reference, input_shape, tolerance)
        check_verification(verification, tolerance)
    data = export_bytes(merged, fmt, input_shape, dynamic_batch, precision,
                        onnx_model=onnx_model if fmt != "torch" else None)
    write_bytes_atomic(out, data)
    return ExportReport(before=model_stats(original, input_shape), after=model_stats(merged, input_shape),
                        verification=verification, size_bytes=len(data))
