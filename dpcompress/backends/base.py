"""The interface every backend implements, and what the backend modules share.

A :class:`Backend` turns a module plus an input shape into a :class:`Runner` whose
``time(warmup, iters)`` returns one wall-clock latency per timed run, in ms. Each runtime's
backend is one module beside this one that imports only this module (and its runtime).
"""

from __future__ import annotations

import os
import platform
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from dpcompress.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn

BACKEND_NAMES = ("onnxruntime", "openvino", "torch", "tensorrt")
PRECISIONS = ("fp32", "fp16")
DEVICES = ("cpu", "cuda")
MEDIAN_OF_RUNS = "median of the timed runs; std_ms is their standard deviation"  # a table's statistic


class Runner(ABC):
    """One prepared model at one input shape, ready to be timed repeatedly."""

    @abstractmethod
    def time(self, warmup: int, iters: int) -> List[float]:
        """Run ``warmup`` untimed passes, then return the latency of each of ``iters`` timed passes, in ms."""

    def another(self) -> "Runner":
        """A new instance of the same prepared model (a session of its own, from the same export), built
        now. Two sessions of one network can run a few percent apart for as long as they live
        (docs/latency.md, "Sessions"), so a bench spreads each network over several. This runner itself
        where the runtime has no session to build again cheaply (eager PyTorch, TensorRT engines)."""
        return self


@dataclass(frozen=True)
class PartTimes:
    """What a profiled network's parts took per run, over the recorded runs of the rounds counted."""

    parts: Dict[str, Tuple[float, float]]  # part -> (ms per run, spread in ms)
    total_ms: float  # all nodes together, per run (how they were read: ``Backend.network_statistic``)


class NetworkProfile(ABC):
    """A whole network prepared with the runtime's own per-node profiler on.

    Its parts are named submodules; each part's time in one run is the kernel time of
    the nodes the runtime made of it (with the elementwise ops fused after it, such as
    its activation or a residual add), as the network pays it: caches as the layers
    before it left them, no layout conversions at its edges, no call of its own.
    A call of ``run`` with recorded runs is one round; ``part_times`` reads the rounds asked for.
    """

    @abstractmethod
    def run(self, iters: int, warmup: int = 0) -> None:
        """``warmup`` runs that are not recorded, then ``iters`` recorded runs (a round, where iters > 0)."""

    @abstractmethod
    def part_times(self, counted: Optional[Sequence[bool]] = None) -> PartTimes:
        """Each part's time per run, over the recorded runs of the rounds ``counted`` marks (None: every
        round; no round: zeros). Ends profiling."""


class RunByRunProfile(NetworkProfile):
    """A profile whose runtime reports every run's node times (ONNX Runtime's trace): a part's time is
    the median over the counted rounds' runs, its spread their standard deviation."""

    def __init__(self) -> None:
        self._round_runs: List[int] = []

    def run(self, iters: int, warmup: int = 0) -> None:
        self._run(iters, warmup)
        if iters > 0:
            self._round_runs.append(iters)

    @abstractmethod
    def _run(self, iters: int, warmup: int) -> None:
        """The runs themselves: ``warmup`` not recorded, then ``iters`` recorded."""

    @abstractmethod
    def run_times(self) -> Tuple[Dict[str, List[float]], List[float]]:
        """Per recorded run: ms spent in each part, and in all nodes together. Ends profiling."""

    def part_times(self, counted: Optional[Sequence[bool]] = None) -> PartTimes:
        from dpcompress.latency.timing import summarize

        parts, totals = self.run_times()
        counted = [True] * len(self._round_runs) if counted is None else counted
        keep = [c for c, runs in zip(counted, self._round_runs) for _ in range(runs)]

        def median_and_spread(times: List[float]) -> Tuple[float, float]:
            stats = summarize([ms for ms, c in zip(times, keep) if c] or [0.0])
            return stats.median_ms, stats.std_ms

        return PartTimes({part: median_and_spread(times) for part, times in parts.items()},
                         median_and_spread(totals)[0])


class Backend(ABC):
    """A runtime on a device: prepares modules for timing and says what it is."""

    name: str
    device: str  # "cpu" or "cuda"

    @property
    @abstractmethod
    def version(self) -> str:
        """Version of the runtime library (for the table's meta)."""

    @property
    @abstractmethod
    def device_name(self) -> str:
        """Human-readable device: the CPU model or the GPU name."""

    @property
    def threads(self) -> Optional[int]:
        """CPU threads the runtime uses, where it is set (None on GPU)."""
        return None

    @abstractmethod
    def prepare(self, module: "torch.nn.Module", input_shape: Sequence[int], precision: str = "fp32") -> Runner:
        """Build ``module`` for input ``input_shape`` (N, C, H, W) at ``precision`` ("fp32" or "fp16")."""

    def prepare_all(self, modules: Sequence["torch.nn.Module"], input_shape: Sequence[int],
                    precision: str = "fp32") -> List[Runner]:
        """:meth:`prepare` of each module, to be timed side by side. Backends that build from an export
        override this to export them all before building any: an export briefly holds its module's
        weights twice over, best while no runtime holds a copy of its own yet."""
        return [self.prepare(module, input_shape, precision) for module in modules]

    def options(self) -> Dict[str, Any]:
        """Settings that change the timings beyond name, device and threads (for the table's meta)."""
        return {}

    @property
    def profiles_networks(self) -> bool:
        """Whether :meth:`prepare_network_timing` is available (the runtime reports per-node times)."""
        return False

    # How in-network timing reads a block's time from the profiled runs (for the table's meta).
    network_statistic = MEDIAN_OF_RUNS

    @property
    def min_network_runs(self) -> int:
        """Fewest timed runs in-network timing gives a network (if its time allows: see
        ``network_timing.SECONDS_PER_NETWORK``), however few ``iters`` asks for. Runtimes whose
        per-node counters vary more from run to run ask for more."""
        return 0

    def prepare_network_timing(self, module: "torch.nn.Module", input_shape: Sequence[int], precision: str,
                               parts: Sequence[str]) -> Tuple[Runner, NetworkProfile]:
        """``module`` built twice: plain, and with per-node profiling, its nodes attributed to the
        submodules ``parts``. From one export: a network holds all of the model's weights, and each
        export holds them again while it lasts."""
        raise NotImplementedError(f"the {self.name} backend does not profile nodes inside a network")

    def call_overhead_ms(self, input_shape: Sequence[int], precision: str, warmup: int, iters: int) -> float:
        """Fixed cost of one timed call that a layer inside a whole network does not pay, in ms.

        A latency table times each block as a model of its own; where the runtime adds a
        per-call cost (entering the runtime, copying input and output), that cost is in
        every row but paid once per network, so a table would credit each merge with a
        saving that never happens. Default 0: the call cost is part of a layer's cost
        in the network too (eager torch), or is not timed at all (CUDA events).
        """
        return 0.0

    def describe(self) -> str:
        threads = f", {self.threads} threads" if self.threads else ""
        return f"{self.name} {self.version} on {self.device_name}{threads}"


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it, else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def default_threads() -> int:
    """All cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def check_precision(precision: str, device: str) -> None:
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device != "cuda":
        raise UserError("fp16 timing needs a CUDA device; use --precision fp32 on the CPU, or --gpu")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def require_cuda(what: str) -> None:
    if not cuda_available():
        raise UserError(f"{what} needs a CUDA device and torch sees none (torch.cuda.is_available() is False); "
                        "run on a GPU machine or use --backend onnxruntime for the CPU")
