"""Latency backends: one small module per runtime behind one interface, imported lazily.

The interface and what the backends share is :mod:`dpcompress.backends.base`.
``get_backend`` imports a backend's module and its runtime (onnxruntime, openvino, torch,
tensorrt) only when that backend is asked for, so the package works without any of them.
"""

from __future__ import annotations

from typing import Optional, Tuple

from dpcompress.backends.base import (  # noqa: F401  (the package's interface)
    BACKEND_NAMES, Backend, DEVICES, MEDIAN_OF_RUNS, NetworkProfile, PRECISIONS, PartTimes, RunByRunProfile,
    Runner, check_precision, cpu_name, cuda_available, default_threads, require_cuda)
from dpcompress.backends.onnx_export import export_onnx_bytes, export_onnx_file  # noqa: F401
from dpcompress.errors import UserError


def get_backend(name: str, *, device: str = "cpu", threads: Optional[int] = None,
                cuda_graphs: bool = False, channels_last: bool = False) -> Backend:
    """The backend called ``name`` on ``device``; its runtime is imported here, not before.

    ``threads`` applies to CPU runtimes (default: all cores); ``cuda_graphs`` and
    ``channels_last`` to the torch backend.
    """
    if name not in BACKEND_NAMES:
        raise UserError(f"unknown backend {name!r}; use one of {', '.join(BACKEND_NAMES)}")
    if device not in DEVICES:
        raise UserError(f"unknown device {device!r}; use cpu or cuda")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1 (got {threads})")
    if name == "onnxruntime":
        from dpcompress.backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(device=device, threads=threads)
    if name == "openvino":
        if device != "cpu":
            raise UserError("the openvino backend runs on the CPU only; use --device cpu")
        from dpcompress.backends.openvino_backend import OpenVinoBackend

        return OpenVinoBackend(threads=threads)
    if name == "torch":
        from dpcompress.backends.torch_backend import TorchBackend

        return TorchBackend(device=device, threads=threads, cuda_graphs=cuda_graphs, channels_last=channels_last)
    from dpcompress.backends.tensorrt_backend import TensorRTBackend

    return TensorRTBackend()


def select_gpu_backend(*, cuda_graphs: bool = False, channels_last: bool = False) -> Tuple[Backend, str]:
    """``--gpu``: TensorRT where it imports, else eager torch on CUDA. Returns the backend and why it was picked."""
    require_cuda("--gpu")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        backend = get_backend("torch", device="cuda", cuda_graphs=cuda_graphs, channels_last=channels_last)
        return backend, f"--gpu: TensorRT is not installed, using {backend.describe()}"
    backend = get_backend("tensorrt", device="cuda")
    return backend, f"--gpu: using {backend.describe()}"


def choose_backend(name: Optional[str], *, gpu: bool = False, device: str = "cpu", threads: Optional[int] = None,
                   cuda_graphs: bool = False, channels_last: bool = False) -> Tuple[Backend, Optional[str]]:
    """The backend the command line asks for: ``--gpu`` or ``--backend NAME`` (default onnxruntime).

    Returns it and, for ``--gpu``, a line saying which backend was picked and why.
    """
    if gpu:
        if name is not None:
            raise UserError("--gpu picks the backend itself; give either --gpu or --backend, not both")
        return select_gpu_backend(cuda_graphs=cuda_graphs, channels_last=channels_last)
    name = name or "onnxruntime"
    if name == "tensorrt":
        device = "cuda"
    return get_backend(name, device=device, threads=threads, cuda_graphs=cuda_graphs,
                       channels_last=channels_last), None
