"""OpenVINO backend: Intel's runtime on the CPU, fp32, latency hint, threads set explicitly.

A module goes through the same ONNX export as ONNX Runtime, taken as bytes
(``export_onnx_bytes``), and is read from memory by ``Core.read_model``: OpenVINO's ONNX frontend takes the bytes as
they are (about 10 ms for a block; ``openvino.convert_model`` takes no bytes, only a file
or a stream, and goes through the model conversion tool, 40x slower). The compiled
model states every setting that changes its timings: the latency hint (one stream),
the number of inference threads, and fp32 inference precision, which must be asked
for: on CPUs with bf16 or AMX units OpenVINO otherwise runs convolutions in bf16.

Networks can also be profiled node by node (``PERF_COUNT``). OpenVINO's CPU plugin
fuses activations, residual adds and bias adds into the convolution before them, or
elementwise chains into one ``Subgraph`` node; a fused op is listed as ``NOT_RUN``.
An executed node keeps the name of an ONNX node: a convolution that of its
``Convolution`` op, ``<onnx conv node>/WithoutBiases``; a fused subgraph that of its
last op, an ONNX node name, or for the graph's output op the output tensor's name.
Layout conversions (``Reorder``, named ``<from>_<layouts>_<to>``) belong to no part.
The counters are not the last run's: each node's ``real_time`` is the sum of its run times since
compiling, each cut to whole microseconds, divided (in integers) by the runs; a node under 1 us a
run reads 0 and NOT_RUN. In-network timing reads them accordingly (``running_part_us``,
``_OpenVinoNetworkProfile``).

On some CPUs the plugin also fuses a convolution into the one before it (a depthwise 3x3
into the conv that feeds it, on AVX2 CPUs without AVX-512 when the maps outgrow half the L3
cache): then one executed node runs two parts. The
compiled model's runtime graph lists the ONNX layers each node runs
(``originalLayersNames``); a node that runs several parts has its time split between them in
proportion to their multiply-adds, so that neither is priced at nothing and the network's
sum stays whole.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from dpcompress.backends.base import (Backend, NetworkProfile, PartTimes, Runner, check_precision, cpu_name,
                                 default_threads)
from dpcompress.backends.onnx_export import export_onnx_bytes
from dpcompress.backends.onnxruntime_backend import graph_part_owners, scope_owner
from dpcompress.errors import UserError
from dpcompress.latency.timing import time_runner

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn

INSTALL_HINT = "pip install openvino (or pip install 'dpcompress[openvino]')"
# Node types OpenVINO inserts to convert layouts and precisions between nodes: the network's rest.
LAYOUT_NODES = ("Reorder",)
Reading = Tuple[Dict[str, float], float]  # running sums in us: per part, and of all nodes


def import_openvino() -> Any:
    try:
        import openvino
    except ImportError as err:
        raise UserError(f"the openvino backend needs OpenVINO: {INSTALL_HINT}") from err
    return openvino


class OpenVinoBackend(Backend):
    name = "openvino"
    device = "cpu"

    def __init__(self, threads: Optional[int] = None) -> None:
        self._ov = import_openvino()
        self._core = self._ov.Core()
        self._threads = threads or default_threads()

    @property
    def version(self) -> str:
        return str(self._ov.get_version())

    @property
    def device_name(self) -> str:
        return cpu_name()

    @property
    def threads(self) -> Optional[int]:
        return self._threads

    def options(self) -> Dict[str, Any]:
        return {"device": "CPU", "performance_hint": "LATENCY", "inference_precision": "f32",
                "min_network_runs": self.min_network_runs}

    network_statistic = ("mean of the runs in the counted rounds (their warm-ups included), read from OpenVINO's "
                         "running per-node averages in whole microseconds before and after each stretch of counted "
                         "rounds; std_ms is the bound the counters' rounding puts on that mean")

    @property
    def min_network_runs(self) -> int:
        # At 5 rounds of 10 runs (iters 50), five tables made minutes apart predicted mobilenet_v2's deepest
        # plan at 1.82x to 3.00x; at 20 rounds, 1.56x to 1.95x (docs/latency.md). ONNX Runtime's
        # spread 7% at 5 rounds.
        return 200

    def compile_config(self, profiling: bool = False) -> Dict[Any, Any]:
        """Properties of every compiled model: threads, the latency hint and fp32, set explicitly."""
        props = self._ov.properties
        return {props.inference_num_threads: self._threads,
                props.hint.performance_mode: props.hint.PerformanceMode.LATENCY,
                props.hint.inference_precision: self._ov.Type.f32,
                props.enable_profiling: profiling}

    def _exported(self, module: "torch.nn.Module", input_shape: Sequence[int], precision: str) -> Tuple[bytes, Any]:
        """``module`` as ONNX bytes, and a random input for it."""
        import torch

        check_precision(precision, self.device)
        example = torch.randn(*input_shape)
        return export_onnx_bytes(module.eval(), example), example

    def _request(self, model: Any, example: "torch.Tensor", profiling: bool = False) -> Any:
        """The model (ONNX bytes, or read already) compiled for the CPU, as a request with its input set once."""
        import numpy as np

        if isinstance(model, bytes):
            model = self._core.read_model(model)
        compiled = self._core.compile_model(model, "CPU", self.compile_config(profiling))
        request = compiled.create_infer_request()
        request.set_input_tensor(self._ov.Tensor(np.ascontiguousarray(example.numpy())))
        return request

    def prepare(self, module: "torch.nn.Module", input_shape: Sequence[int], precision: str = "fp32") -> Runner:
        return _OpenVinoRunner(self._request(*self._exported(module, input_shape, precision)))

    def prepare_all(self, modules: Sequence["torch.nn.Module"], input_shape: Sequence[int],
                    precision: str = "fp32") -> List[Runner]:
        """Runners whose :meth:`Runner.another` compiles the model read from the export again (which they
        hold: its weights once more, beside the compiled model's own)."""
        runners: List[Runner] = []
        for module in modules:
            model_bytes, example = self._exported(module, input_shape, precision)
            model = self._core.read_model(model_bytes)
            del model_bytes
            runners.append(_OpenVinoRunner(self._request(model, example),
                                           rebuild=lambda model=model, example=example: self._request(model, example)))
        return runners

    @property
    def profiles_networks(self) -> bool:
        return True

    def prepare_network_timing(self, module: "torch.nn.Module", input_shape: Sequence[int], precision: str,
                               parts: Sequence[str]) -> Tuple[Runner, NetworkProfile]:
        model_bytes, example = self._exported(module, input_shape, precision)
        owners = graph_part_owners(model_bytes, parts)
        model = self._core.read_model(model_bytes)
        del model_bytes
        convs = conv_macs(model, owners)
        plain = _OpenVinoRunner(self._request(model, example))
        request = self._request(model, example, profiling=True)
        shares = shared_node_shares(runtime_layers(request.get_compiled_model()), convs)
        return plain, _OpenVinoNetworkProfile(request, owners, shares)

    def call_overhead_ms(self, input_shape: Sequence[int], precision: str, warmup: int, iters: int) -> float:
        """Median of a synchronous inference of a graph that only passes its input through, at ``input_shape``.

        Every call pays entering the runtime from Python and the request's bookkeeping
        (about 12 us on a desktop CPU), which a layer inside a whole network does not.
        """
        import torch

        return time_runner(self.prepare(torch.nn.Identity(), input_shape, precision), warmup, iters).median_ms


class _OpenVinoRunner(Runner):
    def __init__(self, request: Any, rebuild: Optional[Callable[[], Any]] = None) -> None:
        self._request = request
        self._rebuild = rebuild  # a new compiled model and request, where the model read was kept

    def another(self) -> Runner:
        return self if self._rebuild is None else _OpenVinoRunner(self._rebuild(), self._rebuild)

    def time(self, warmup: int, iters: int) -> List[float]:
        infer = self._request.infer
        for _ in range(warmup):
            infer(share_outputs=True)
        samples = []
        for _ in range(iters):
            # infer() is synchronous: it returns when the outputs are ready (left in the request, not copied).
            t0 = time.perf_counter()
            infer(share_outputs=True)
            samples.append((time.perf_counter() - t0) * 1e3)
        return samples


def owner_of_node(node_name: str, node_type: str, owners: Dict[str, str]) -> Optional[str]:
    """The part an executed OpenVINO node belongs to, from ``owners`` (ONNX node and tensor names, see
    ``part_owners``): by its own name (a fused subgraph, named after its last op), else by the longest
    ONNX node name its scope starts with (``/dpc_block_3/Conv/WithoutBiases``: the conv without its
    bias add). Layout conversions belong to no part."""
    if node_type in LAYOUT_NODES:
        return None
    return scope_owner(node_name, owners)


def conv_macs(model: Any, owners: Dict[str, str]) -> Dict[str, Tuple[str, int]]:
    """Each convolution of the parts in an OpenVINO model read from ONNX (static shapes), by name:
    its part and its multiply-adds."""
    convs = {}
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        part = scope_owner(op.get_friendly_name(), owners)
        if kind not in ("Convolution", "GroupConvolution") or part is None:
            continue
        weight = list(op.get_input_shape(1))  # [O, I, kh, kw], grouped [G, O/G, I/G, kh, kw]
        per_output = math.prod(weight[1:] if kind == "Convolution" else weight[2:])
        convs[op.get_friendly_name()] = (part, math.prod(op.get_output_shape(0)) * per_output)
    return convs


def runtime_layers(compiled: Any) -> Dict[str, List[str]]:
    """The ONNX layers each node of a compiled model runs, by node name (its runtime graph's
    ``originalLayersNames``)."""
    layers = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "originalLayersNames" in info:
            layers[op.get_friendly_name()] = [n for n in info["originalLayersNames"].astype(str).split(",") if n]
    return layers


def shared_node_shares(layers: Dict[str, List[str]],
                       convs: Dict[str, Tuple[str, int]]) -> Dict[str, Dict[str, float]]:
    """For each node that runs convolutions of more than one part (``convs``: part and multiply-adds
    by conv name): the share of its time each of those parts takes, in proportion to the
    multiply-adds it runs there. Fused elementwise ops (a residual add claimed by the other
    branch) do not make a node shared: only convolutions do."""
    shares = {}
    for node, names in layers.items():
        macs: Dict[str, int] = {}
        for name in names:
            if name in convs:
                part, count = convs[name]
                macs[part] = macs.get(part, 0) + count
        if len(macs) < 2:
            continue
        total = sum(macs.values())
        shares[node] = {p: m / total if total else 1 / len(macs) for p, m in sorted(macs.items())}
    return shares


def running_part_us(infos: Sequence[Any], inferences: int, owners: Dict[str, str],
                    shares: Dict[str, Dict[str, float]]) -> Reading:
    """Each part's time summed over all ``inferences`` since the model was compiled, and all nodes',
    in microseconds, from OpenVINO's profiling info (``infos``).

    OpenVINO's CPU plugin does not report a node's last run: it sums the node's run times, each cut
    to whole microseconds, and reports that sum divided (in integers) by the runs so far. So a node
    read ``a`` after ``k`` runs took about k*a + (k-1)/2 (the division's remainder, on average)
    + k/2 (each run's cut) microseconds in all. A node under 1 microsecond a run reads 0 (NOT_RUN)
    and counts nothing."""
    parts = {part: 0.0 for part in set(owners.values())}
    total = 0.0
    for info in infos:
        if info.status != info.Status.EXECUTED:  # fused into another node, nothing to do, or under 1 us
            continue
        us = inferences * round(info.real_time.total_seconds() * 1e6) + inferences - 0.5
        total += us
        shared = shares.get(info.node_name)
        if shared is not None:
            for part, share in shared.items():
                parts[part] += share * us
            continue
        owner = owner_of_node(info.node_name, info.node_type, owners)
        if owner is not None:
            parts[owner] += us
    return parts, total


class _OpenVinoNetworkProfile(NetworkProfile):
    """Rounds read from OpenVINO's running counters (``running_part_us``), read after every call.

    A counter read after k runs since compiling pins the sum of those runs only to within k
    microseconds, so a single round's share of it is not known: while a node's running average stays
    on one whole microsecond, the difference of two readings is that average, whatever the round took.
    What is known is the sum between two readings far apart. So consecutive counted rounds are read as
    one stretch, from the reading before the first to the one after the last, and a part's time is its
    mean over the stretches' runs, the rounds' warm-ups included (OpenVINO's counters cannot leave them
    out); the first call's warm-ups (the compiled model's first runs) are left out. The spread given is
    the counters' rounding bound on that mean.
    """

    def __init__(self, request: Any, owners: Dict[str, str],
                 shares: Optional[Dict[str, Dict[str, float]]] = None) -> None:
        self._request, self._owners = request, owners
        self._shares = shares or {}  # nodes that run several parts: each part's share of the node's time
        self._inferences = 0
        # Runs since compiling and the sums, when compiled and after each call.
        self._readings: List[Tuple[int, Reading]] = [(0, ({part: 0.0 for part in set(owners.values())}, 0.0))]
        self._rounds: List[int] = []  # for each round (a call with recorded runs): its reading's index

    def run(self, iters: int, warmup: int = 0) -> None:
        for _ in range(warmup + iters):
            self._request.infer(share_outputs=True)
        self._inferences += warmup + iters
        infos = self._request.get_profiling_info()
        self._readings.append((self._inferences, running_part_us(infos, self._inferences, self._owners,
                                                                 self._shares)))
        if iters > 0:
            self._rounds.append(len(self._readings) - 1)

    def part_times(self, counted: Optional[Sequence[bool]] = None) -> PartTimes:
        counted = [True] * len(self._rounds) if counted is None else counted
        spans = [(index - 1, index) for index, c in zip(self._rounds, counted) if c]
        return stretch_means(self._readings, spans, set(self._owners.values()))


def stretch_means(readings: Sequence[Tuple[int, Reading]], spans: Sequence[Tuple[int, int]],
                  parts: Iterable[str]) -> PartTimes:
    """Each part's mean ms per run over the runs between the readings of each span (pairs of indices into
    ``readings``), with spans that meet read as one stretch; the spread given is the bound the counters'
    rounding puts on the mean (half the runs since compiling at both ends of each stretch, per run)."""
    stretches: List[List[int]] = []
    for first, last in spans:
        if stretches and stretches[-1][1] == first:
            stretches[-1][1] = last
        else:
            stretches.append([first, last])
    runs = sum(readings[last][0] - readings[first][0] for first, last in stretches)
    if runs <= 0:
        return PartTimes({part: (0.0, 0.0) for part in parts}, 0.0)
    bound_ms = sum(readings[first][0] + readings[last][0] for first, last in stretches) / 2 / runs / 1e3

    def mean(read: Callable[[Reading], float]) -> float:
        return max(0.0, sum(read(readings[last][1]) - read(readings[first][1]) for first, last in stretches)
                   / runs / 1e3)

    return PartTimes({part: (mean(lambda reading, p=part: reading[0][p]), bound_ms) for part in parts},
                     mean(lambda reading: reading[1]))
