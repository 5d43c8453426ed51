"""ONNX Runtime backend: CPU execution provider, or CUDA where onnxruntime-gpu is installed.

Threads are set explicitly and spinning is off, so that the many small sessions a
latency table creates in one process do not burn cores waiting on each other.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, List, Optional, Sequence

from dpcompress.backends import Backend, Runner, check_precision, cpu_name, default_threads, export_onnx_bytes
from dpcompress.errors import UserError
from dpcompress.timing import time_runner

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, device: str = "cpu", threads: Optional[int] = None) -> None:
        try:
            import onnxruntime
        except ImportError as err:
            raise UserError("the onnxruntime backend needs onnxruntime: pip install onnxruntime "
                            "(or onnxruntime-gpu for CUDA)") from err
        self._ort = onnxruntime
        self.device = device
        if device == "cuda":
            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                raise UserError("onnxruntime has no CUDA execution provider here; install onnxruntime-gpu "
                                "or use --backend torch --device cuda")
            self._providers: List[Any] = ["CUDAExecutionProvider"]
            self._threads: Optional[int] = None
        else:
            self._providers = ["CPUExecutionProvider"]
            self._threads = threads or default_threads()

    @property
    def version(self) -> str:
        return str(self._ort.__version__)

    @property
    def device_name(self) -> str:
        if self.device == "cuda":
            import torch

            return torch.cuda.get_device_name() if torch.cuda.is_available() else "cuda"
        return cpu_name()

    @property
    def threads(self) -> Optional[int]:
        return self._threads

    def session_options(self) -> Any:
        ort = self._ort
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        if self._threads:
            options.intra_op_num_threads = self._threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only
        return options

    def prepare(self, module: "torch.nn.Module", input_shape: Sequence[int], precision: str = "fp32") -> Runner:
        import numpy as np
        import torch

        check_precision(precision, self.device)
        module = module.eval()
        example = torch.randn(*input_shape)
        if precision == "fp16":
            module, example = module.half(), example.half()
        model_bytes = export_onnx_bytes(module, example)
        session = self._ort.InferenceSession(model_bytes, self.session_options(), providers=self._providers)
        feed = {"x": np.ascontiguousarray(example.numpy())}
        return _OnnxRuntimeRunner(session, feed)

    def call_overhead_ms(self, input_shape: Sequence[int], precision: str, warmup: int, iters: int) -> float:
        """Median of ``session.run`` on a graph that only passes its input through, at ``input_shape``.

        Every run of a one-block session pays the Python-to-runtime call and the input
        and output copies (about 5 us on a desktop CPU); inside a whole network's
        session a layer pays neither. On 32x32 inputs that is as much as the convolution.
        """
        import torch

        return time_runner(self.prepare(torch.nn.Identity(), input_shape, precision), warmup, iters).median_ms


class _OnnxRuntimeRunner(Runner):
    def __init__(self, session: Any, feed: dict) -> None:
        self._session = session
        self._feed = feed

    def time(self, warmup: int, iters: int) -> List[float]:
        run, feed = self._session.run, self._feed
        for _ in range(warmup):
            run(None, feed)
        samples = []
        for _ in range(iters):
            # session.run is synchronous on every provider (outputs come back to the host).
            t0 = time.perf_counter()
            run(None, feed)
            samples.append((time.perf_counter() - t0) * 1e3)
        return samples
