"""ONNX Runtime backend: CPU execution provider, or CUDA where onnxruntime-gpu is installed.

Threads are set explicitly and spinning is off, so that the many small sessions a
latency table creates in one process do not burn cores waiting on each other.

Networks can also be profiled node by node (``SessionOptions.enable_profiling``): ONNX
Runtime rewrites the graph before it runs it (activations and residual adds fused into
convolutions, the CPU's blocked NCHWc layout) and names a rewritten node after a
tensor or node of the exported graph, so the exported graph tells which submodule
each profiled node came from.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import json
import os
import tempfile
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from dpcompress.backends.base import (Backend, NetworkProfile, RunByRunProfile, Runner, check_precision, cpu_name,
                                 default_threads)
from dpcompress.backends.onnx_export import export_onnx_file
from dpcompress.errors import UserError
from dpcompress.latency.timing import time_runner
from dpcompress.memory import release_freed_memory

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn


# The graph a session rewrote, saved beside its export (so removed with it).
OPTIMIZED_SUFFIX = ".optimized.onnx"
# A saved graph is one protobuf, which cannot exceed 2 GB: the weights of a model folder over this
# size are saved to a file beside it instead (regnet_y_128gf, 2.6 GB of weights, failed to save).
SAVE_WEIGHTS_APART_OVER_BYTES = 1 << 30


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

    @contextlib.contextmanager
    def _exported(self, module: "torch.nn.Module", input_shape: Sequence[int], precision: str,
                  fold_constants: bool = False) -> Iterator[Tuple[str, dict]]:
        """``module`` as an ONNX file at ``precision`` (removed on leaving), and a random input feed for it.
        Sessions read the file themselves: no copy of the weights is held in Python meanwhile. Constants
        are left for the session to fold (less memory while exporting) unless node names must match
        the folded export's (``export_onnx_file``)."""
        import numpy as np
        import torch

        check_precision(precision, self.device)
        module = module.eval()
        example = torch.randn(*input_shape)
        if precision == "fp16":  # on a copy: the module may share its weights with the caller's model
            module, example = copy.deepcopy(module).half(), example.half()
        with tempfile.TemporaryDirectory(prefix="dpcompress_onnx_") as folder:
            path = os.path.join(folder, "model.onnx")
            export_onnx_file(module, example, path, fold_constants=fold_constants)
            release_freed_memory()  # the exporter's transient copies of the weights (several)
            yield path, {"x": np.ascontiguousarray(example.numpy())}

    def prepare(self, module: "torch.nn.Module", input_shape: Sequence[int], precision: str = "fp32") -> Runner:
        with self._exported(module, input_shape, precision) as (path, feed):
            return _OnnxRuntimeRunner(self._session(path), feed)

    def prepare_all(self, modules: Sequence["torch.nn.Module"], input_shape: Sequence[int],
                    precision: str = "fp32") -> List[Runner]:
        """Runners whose :meth:`Runner.another` builds a session again from the graph the first rewrote,
        kept in a folder of the runner's own (removed with the last runner of it)."""
        with contextlib.ExitStack() as exports:
            files = [exports.enter_context(self._exported(module, input_shape, precision)) for module in modules]
            # Each graph is rewritten in a session of its own, kept only as the file it saves; the
            # sessions timed then load those without rewriting again: a rewrite's transient second
            # copy of the weights never meets another network's session.
            kept = []
            for path, feed in files:
                folder = tempfile.TemporaryDirectory(prefix="dpcompress_onnx_optimized_")
                optimized = os.path.join(folder.name, os.path.basename(path) + OPTIMIZED_SUFFIX)
                self._session(path, save_optimized=optimized)
                release_freed_memory()
                kept.append((folder, optimized, feed))
        return [_OnnxRuntimeRunner(self._session(optimized, optimized=True), feed,
                                   rebuild=lambda optimized=optimized: self._session(optimized, optimized=True),
                                   folder=folder)
                for folder, optimized, feed in kept]

    def _session(self, path: str, profiling: bool = False, save_optimized: Optional[str] = None,
                 optimized: bool = False) -> Any:
        """A session of the ONNX file at ``path``; profiling writes its trace into a folder of its own.

        ``save_optimized`` writes the graph as the session rewrote it to that path; a session of
        that file is then built ``optimized`` (no rewriting again): the same nodes and timings,
        without the transient second copy of the weights that rewriting into the NCHWc layout
        takes while a session is built."""
        options = self.session_options()
        if save_optimized is not None:
            options.optimized_model_filepath = save_optimized
            if _folder_bytes(os.path.dirname(path)) > SAVE_WEIGHTS_APART_OVER_BYTES:
                options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                                 os.path.basename(save_optimized) + ".data")
                options.add_session_config_entry(
                    "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        if optimized:
            options.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if profiling:
            options.enable_profiling = True
            options.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="dpcompress_ort_profile_"), "profile")
        return self._ort.InferenceSession(path, options, providers=self._providers)

    @property
    def profiles_networks(self) -> bool:
        return True

    def prepare_network_timing(self, module: "torch.nn.Module", input_shape: Sequence[int], precision: str,
                               parts: Sequence[str]) -> Tuple[Runner, NetworkProfile]:
        with self._exported(module, input_shape, precision, fold_constants=True) as (path, feed):
            owners = graph_part_owners(path, parts)
            plain = _OnnxRuntimeRunner(self._session(path, save_optimized=path + OPTIMIZED_SUFFIX), feed)
            release_freed_memory()
            profiled = self._session(path + OPTIMIZED_SUFFIX, profiling=True, optimized=True)
            return plain, _OnnxRuntimeNetworkProfile(profiled, feed, owners)

    def call_overhead_ms(self, input_shape: Sequence[int], precision: str, warmup: int, iters: int) -> float:
        """Median of ``session.run`` on a graph that only passes its input through, at ``input_shape``.

        Every run of a one-block session pays the Python-to-runtime call and the input
        and output copies (about 5 us on a desktop CPU); inside a whole network's
        session a layer pays neither. On 32x32 inputs that is as much as the convolution.
        """
        import torch

        return time_runner(self.prepare(torch.nn.Identity(), input_shape, precision), warmup, iters).median_ms


def _folder_bytes(folder: str) -> int:
    """What the files of a model's folder hold: the model and any weights exported beside it."""
    return sum(entry.stat().st_size for entry in os.scandir(folder or ".") if entry.is_file())


class _OnnxRuntimeRunner(Runner):
    def __init__(self, session: Any, feed: dict, rebuild: Optional[Callable[[], Any]] = None,
                 folder: Any = None) -> None:
        self._session = session
        self._feed = feed
        self._rebuild = rebuild  # a new session of the same graph, where there is a file to build it from
        self._folder = folder  # that file's folder, held for as long as a runner may rebuild from it

    def another(self) -> Runner:
        if self._rebuild is None:
            return self
        return _OnnxRuntimeRunner(self._rebuild(), self._feed, self._rebuild, self._folder)

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


# Ops that ONNX Runtime runs fused with the convolution before them, or that otherwise
# belong to the layer that ends there (its activation, a residual add at its output).
_FOLLOWERS = {"Relu", "Clip", "LeakyRelu", "Elu", "Selu", "Celu", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh",
              "Softplus", "Mish", "Gelu", "PRelu", "Add"}


def graph_part_owners(model: "bytes | str", parts: Sequence[str]) -> Dict[str, str]:
    """:func:`part_owners` of the graph of an ONNX model (its bytes, or its file); the weights are
    dropped as soon as it is read."""
    import onnx

    proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(model, load_external_data=False)
    proto.graph.ClearField("initializer")
    return part_owners(proto.graph, parts)


def part_owners(graph: Any, parts: Sequence[str]) -> Dict[str, str]:
    """Node and tensor names of an exported ONNX graph mapped to the part (submodule) they belong to.

    A part's own nodes are those in its scope (``/<part>/...``); after its output come the
    elementwise ops that act on that output alone (an activation, SiLU as Sigmoid and Mul,
    a residual Add) until the tensor is read by something else or by more than one node.
    """
    consumers: Dict[str, List[Any]] = defaultdict(list)
    for node in graph.node:
        for tensor in node.input:
            consumers[tensor].append(node)
    owners: Dict[str, str] = {}
    frontier: List[Tuple[str, str]] = []

    def claim(node: Any, part: str) -> None:
        owners[node.name] = part
        for tensor in node.output:
            owners[tensor] = part

    for node in graph.node:
        part = next((p for p in parts if node.name.startswith(f"/{p}/")), None)
        if part is not None:
            claim(node, part)
    for node in graph.node:
        part = owners.get(node.name)
        if part is not None:
            frontier.extend((t, part) for t in node.output
                            if any(owners.get(c.name) != part for c in consumers[t]))
    while frontier:
        tensor, part = frontier.pop()
        users = [u for u in consumers[tensor] if u.name not in owners]
        if len(consumers[tensor]) == 1 and users and users[0].op_type in _FOLLOWERS:
            taken = users
        elif sorted(u.op_type for u in consumers[tensor]) == ["Mul", "Sigmoid"] and len(users) == 2:
            sigmoid = next(u for u in users if u.op_type == "Sigmoid")
            mul = next(u for u in users if u.op_type == "Mul")
            taken = users if sigmoid.output[0] in mul.input else []  # x * sigmoid(x): SiLU
        else:
            taken = []
        for node in taken:
            claim(node, part)
        if taken:
            frontier.extend((t, part) for t in taken[-1].output)
    return owners


def _owner_of(event_name: str, owners: Dict[str, str]) -> Optional[str]:
    """The part a profiled node belongs to: by its own name, the tensor a rewritten node is named after
    (``<tensor>_nchwc``), or the node a fused node's name starts with (``<node>/QuickGeluFusion/``)."""
    name = event_name[: -len("_kernel_time")]
    if name.endswith("_nchwc") and name[: -len("_nchwc")] in owners:
        return owners[name[: -len("_nchwc")]]
    return scope_owner(name, owners)


def scope_owner(name: str, owners: Dict[str, str]) -> Optional[str]:
    """The part of the node or tensor called ``name``, else of the longest node its scope starts with
    (``/a/Conv/Fused/`` is ``/a/Conv``'s)."""
    if name in owners:
        return owners[name]
    pieces = name.rstrip("/").split("/")
    for stop in range(len(pieces) - 1, 1, -1):
        owner = owners.get("/".join(pieces[:stop]))
        if owner is not None:
            return owner
    return None


class _OnnxRuntimeNetworkProfile(RunByRunProfile):
    def __init__(self, session: Any, feed: dict, owners: Dict[str, str]) -> None:
        super().__init__()
        self._session, self._feed, self._owners = session, feed, owners
        self._recorded: List[bool] = []  # per run so far: recorded (True) or warm-up

    def _run(self, iters: int, warmup: int) -> None:
        for recorded in [False] * warmup + [True] * iters:
            self._session.run(None, self._feed)
            self._recorded.append(recorded)

    def run_times(self) -> Tuple[Dict[str, List[float]], List[float]]:
        path = self._session.end_profiling()
        try:
            with open(path) as f:
                events = json.load(f)
        finally:
            os.unlink(path)
            os.rmdir(os.path.dirname(path))
        starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
        if len(starts) != len(self._recorded):
            raise RuntimeError(f"the profile holds {len(starts)} runs, {len(self._recorded)} were made")
        parts: Dict[str, List[float]] = {}
        totals = [0.0] * len(starts)
        for owner in set(self._owners.values()):
            parts[owner] = [0.0] * len(starts)
        for e in events:
            if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
                continue
            run = bisect.bisect_right(starts, e["ts"]) - 1
            if run < 0:
                continue
            ms = e["dur"] / 1e3
            totals[run] += ms
            owner = _owner_of(e["name"], self._owners)
            if owner is not None:
                parts[owner][run] += ms
        keep = [i for i, recorded in enumerate(self._recorded) if recorded]
        return {p: [v[i] for i in keep] for p, v in parts.items()}, [totals[i] for i in keep]
