"""Eager PyTorch backend on the CPU or a CUDA device.

On CUDA: cudnn.benchmark picks the fastest algorithm during warm-up, each timed
run is bracketed by CUDA events (GPU time, not launch time), and optionally the
forward is captured once as a CUDA graph and replayed, channels_last memory
format and fp16 are options.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from dpcompress.backends.base import Backend, Runner, check_precision, cpu_name, default_threads, require_cuda

if TYPE_CHECKING:  # pragma: no cover
    import torch
    import torch.nn


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, device: str = "cpu", threads: Optional[int] = None,
                 cuda_graphs: bool = False, channels_last: bool = False) -> None:
        import torch

        self._torch = torch
        self.device = device
        if device == "cuda":
            require_cuda("the torch backend on --device cuda")
            self._threads: Optional[int] = None
        else:
            self._threads = threads or default_threads()
        self.cuda_graphs = cuda_graphs and device == "cuda"
        self.channels_last = channels_last

    @property
    def version(self) -> str:
        torch = self._torch
        if self.device == "cuda":
            return f"{torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})"
        return str(torch.__version__)

    @property
    def device_name(self) -> str:
        return self._torch.cuda.get_device_name() if self.device == "cuda" else cpu_name()

    @property
    def threads(self) -> Optional[int]:
        return self._threads

    def options(self) -> Dict[str, Any]:
        return {"cuda_graphs": self.cuda_graphs, "channels_last": self.channels_last}

    def prepare(self, module: "torch.nn.Module", input_shape: Sequence[int], precision: str = "fp32") -> Runner:
        torch = self._torch
        check_precision(precision, self.device)
        dtype = torch.float16 if precision == "fp16" else torch.float32
        module = module.eval().to(device=self.device, dtype=dtype)
        example = torch.randn(*input_shape, device=self.device, dtype=dtype)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
            example = example.contiguous(memory_format=torch.channels_last)
        if self.device == "cuda":
            torch.backends.cudnn.benchmark = True
            return _CudaRunner(module, example, self.cuda_graphs)
        return _CpuRunner(module, example, self._threads or default_threads())


class _CpuRunner(Runner):
    def __init__(self, module: Any, example: Any, threads: int) -> None:
        self._module = module
        self._example = example
        self._threads = threads

    def time(self, warmup: int, iters: int) -> List[float]:
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(self._threads)
        try:
            with torch.inference_mode():
                for _ in range(warmup):
                    self._module(self._example)
                samples = []
                for _ in range(iters):
                    t0 = time.perf_counter()
                    self._module(self._example)
                    samples.append((time.perf_counter() - t0) * 1e3)
        finally:
            torch.set_num_threads(previous)
        return samples


class _CudaRunner(Runner):
    def __init__(self, module: Any, example: Any, cuda_graphs: bool) -> None:
        self._module = module
        self._example = example
        self._use_graph = cuda_graphs
        self._graph: Any = None

    def _capture(self) -> Any:
        """Record one forward as a CUDA graph (after warm-up, so cudnn.benchmark has chosen)."""
        import torch

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(3):  # the documented warm-up on a side stream before capture
                self._module(self._example)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            self._module(self._example)
        return graph

    def time(self, warmup: int, iters: int) -> List[float]:
        import torch

        with torch.inference_mode():
            for _ in range(warmup):
                self._module(self._example)
            torch.cuda.synchronize()
            if self._use_graph and self._graph is None:
                self._graph = self._capture()
                torch.cuda.synchronize()
            step = self._graph.replay if self._graph is not None else (lambda: self._module(self._example))
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(iters)]
            for start, end in events:
                start.record()
                step()
                end.record()
            torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]
