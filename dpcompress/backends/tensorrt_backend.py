"""TensorRT 10 backend: ONNX parser, builder config (fp32 / fp16), serialized engine,
``execute_async_v3`` on tensor addresses of torch CUDA tensors, timed with CUDA events.

Written against the TensorRT 10 Python API (name-based I/O tensors; the
binding-index API of TensorRT 8 is gone).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Sequence

from dpcompress.backends.base import Backend, Runner, check_precision, require_cuda
from dpcompress.backends.onnx_export import export_onnx_bytes
from dpcompress.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn

WORKSPACE_BYTES = 1 << 30


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as err:
        raise UserError("the tensorrt backend needs TensorRT 10 (pip install tensorrt on a CUDA machine); "
                        "use --backend torch --device cuda or --gpu instead") from err
    return tensorrt


class TensorRTBackend(Backend):
    name = "tensorrt"
    device = "cuda"

    def __init__(self) -> None:
        self._trt = import_tensorrt()
        require_cuda("the tensorrt backend")
        self._logger = self._trt.Logger(self._trt.Logger.WARNING)

    @property
    def version(self) -> str:
        return str(self._trt.__version__)

    @property
    def device_name(self) -> str:
        import torch

        return torch.cuda.get_device_name()

    def build_engine(self, onnx_bytes: bytes, precision: str) -> bytes:
        """A serialized engine for the ONNX model (explicit batch, static shapes)."""
        trt = self._trt
        builder = trt.Builder(self._logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(onnx_bytes):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse the ONNX model: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError("TensorRT failed to build an engine (see its log above)")
        return bytes(serialized)

    def prepare(self, module: "torch.nn.Module", input_shape: Sequence[int], precision: str = "fp32") -> Runner:
        import torch

        check_precision(precision, self.device)
        # The ONNX stays fp32; with fp16 the builder may pick fp16 kernels (I/O stays fp32).
        onnx_bytes = export_onnx_bytes(module.eval().float(), torch.randn(*input_shape))
        return self.runner_for_engine(self.build_engine(onnx_bytes, precision))

    def runner_for_engine(self, serialized_engine: bytes) -> Runner:
        runtime = self._trt.Runtime(self._logger)
        engine = runtime.deserialize_cuda_engine(serialized_engine)
        if engine is None:
            raise RuntimeError("TensorRT could not deserialize the engine")
        return _TensorRTRunner(self._trt, runtime, engine)


def torch_dtype(trt: Any, dtype: Any) -> Any:
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int64: torch.int64, trt.int8: torch.int8, trt.bool: torch.bool}
    if dtype not in table:
        raise RuntimeError(f"TensorRT tensor type {dtype} has no torch equivalent here")
    return table[dtype]


class _TensorRTRunner(Runner):
    def __init__(self, trt: Any, runtime: Any, engine: Any) -> None:
        import torch

        self._runtime = runtime  # kept alive as long as the engine
        self._engine = engine
        self._context = engine.create_execution_context()
        self._stream = torch.cuda.Stream()
        self._tensors: Dict[str, Any] = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            shape = tuple(engine.get_tensor_shape(name))
            tensor = torch.empty(shape, dtype=torch_dtype(trt, engine.get_tensor_dtype(name)), device="cuda")
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                tensor.normal_()
            self._tensors[name] = tensor  # the runner owns the buffers the engine reads and writes
            self._context.set_tensor_address(name, tensor.data_ptr())

    def _run(self) -> None:
        if not self._context.execute_async_v3(self._stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")

    def time(self, warmup: int, iters: int) -> List[float]:
        import torch

        with torch.cuda.stream(self._stream):
            for _ in range(warmup):
                self._run()
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(iters)]
            for start, end in events:
                start.record(self._stream)
                self._run()
                end.record(self._stream)
        self._stream.synchronize()
        return [start.elapsed_time(end) for start, end in events]
