"""OpenVINO backend: settings, timing order, in-network tables, node attribution, IR export; a clear error without it."""

from __future__ import annotations

import json
import math
import random
import statistics
import sys
from datetime import timedelta
from types import SimpleNamespace

import onnx
import pytest
import torch
from click.testing import CliRunner

from dpcompress.backends import export_onnx_bytes, get_backend
from dpcompress.backends.onnxruntime_backend import graph_part_owners, part_owners
from dpcompress.backends.openvino_backend import (_OpenVinoNetworkProfile, conv_macs, owner_of_node,
                                                   running_part_us, shared_node_shares)
from dpcompress.cli import main
from dpcompress.errors import UserError
from dpcompress.latency.network_timing import pack, packed_network, packed_plan
from dpcompress.graph.geometry import block_geometry
from dpcompress.latency.profile import profile_table
from dpcompress.tables import read_latency_table
from dpcompress.latency.timing import time_runner
from tests.backends.conv_pairs import CHEAP, EXPENSIVE, slower_of_two
from tests.cli_helpers import run_cli
from tests.latency.helpers import trace_tiny_mobilenet
from tests.latency.helpers import ThreeParts


def openvino():
    return pytest.importorskip("openvino")


PARTS = ["part_a", "part_b", "part_c"]


@pytest.fixture(scope="module")
def tiny_traced():
    return trace_tiny_mobilenet()


def test_openvino_times_the_expensive_conv_slower():
    openvino()
    assert slower_of_two(get_backend("openvino", threads=1)) == "expensive"


def test_openvino_compiles_with_its_settings_stated():
    ov = openvino()
    backend = get_backend("openvino", threads=1)
    assert backend.name == "openvino" and backend.device == "cpu" and backend.threads == 1
    assert backend.version == ov.get_version() and backend.device_name
    assert backend.options()["performance_hint"] == "LATENCY" and backend.options()["inference_precision"] == "f32"
    compiled = backend._request(*backend._exported(*EXPENSIVE, "fp32")).get_compiled_model()
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert str(compiled.get_property("PERFORMANCE_HINT")).endswith("LATENCY")  # an enum in some versions
    assert compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32  # not bf16, even where the CPU has it
    assert get_backend("openvino").threads >= 1  # default: all cores, set explicitly
    samples = backend.prepare(*EXPENSIVE).time(1, 4)
    assert len(samples) == 4 and all(s > 0 for s in samples)
    with pytest.raises(UserError, match="fp16"):
        backend.prepare(*EXPENSIVE, precision="fp16")
    with pytest.raises(UserError, match="CPU only"):
        get_backend("openvino", device="cuda")


def test_openvino_builds_another_compiled_model_of_the_same_export():
    openvino()
    backend = get_backend("openvino", threads=1)
    (cheap, _), (expensive, shape) = CHEAP, EXPENSIVE
    runners = backend.prepare_all([cheap, expensive], shape)
    again = [runner.another() for runner in runners]
    assert all(a._request is not r._request for a, r in zip(again, runners))
    # The same models: the expensive conv stays the slower in the sessions built again.
    medians = [time_runner(runner, warmup=2, iters=7).median_ms for runner in again]
    assert medians[0] < medians[1]
    # Prepared one by one, a runner has no export kept to build from: it is its own other instance.
    single = backend.prepare(cheap, shape)
    assert single.another() is single


def test_openvino_call_overhead_is_below_a_conv():
    openvino()
    backend = get_backend("openvino", threads=1)
    overhead = backend.call_overhead_ms(EXPENSIVE[1], "fp32", warmup=2, iters=15)
    conv = time_runner(backend.prepare(*EXPENSIVE), warmup=2, iters=15).median_ms
    assert 0 < overhead < conv


def test_fused_node_names_map_back_to_their_block():
    graph = onnx.load_from_string(export_onnx_bytes(ThreeParts().eval(), torch.randn(1, 4, 8, 8))).graph
    owners = part_owners(graph, PARTS)
    assert owner_of_node("/part_a/Conv/WithoutBiases", "Convolution", owners) == "part_a"
    assert owner_of_node("/part_c/Conv", "Convolution", owners) == "part_c"  # a conv without bias
    assert owner_of_node("/Add", "Subgraph", owners) == "part_b"  # SiLU and the residual add, fused
    assert owner_of_node("x_abcd_acdb_/part_a/Conv/WithoutBiases", "Reorder", owners) is None
    assert owner_of_node("/part_c/Conv/WithoutBiases_acdb_abcd_/ReduceMean", "Reorder", owners) is None
    assert owner_of_node("/gate/Conv/WithoutBiases", "Convolution", owners) is None
    assert owner_of_node("y", "Subgraph", owners) is None  # the gating multiply: nobody's


def test_openvino_attributes_each_blocks_nodes_to_it():
    openvino()
    backend = get_backend("openvino", threads=1)
    _, profiled = backend.prepare_network_timing(ThreeParts(), (1, 4, 16, 16), "fp32", PARTS)
    profiled.run(3, warmup=1)
    executed = [(i.node_name, i.node_type) for i in profiled._request.get_profiling_info()
                if i.status == i.Status.EXECUTED]
    owner = {name: owner_of_node(name, kind, profiled._owners) for name, kind in executed}
    for part in PARTS:  # each block's conv, as OpenVINO names it, is the block's
        convs = [name for name, kind in executed if kind == "Convolution" and name.startswith(f"/{part}/")]
        assert convs and all(owner[name] == part for name in convs)
    assert all(owner[name] is None for name, kind in executed if kind == "Reorder" or name.startswith("/gate/"))
    times = profiled.part_times()
    assert sorted(times.parts) == PARTS
    parts_ms = [ms for ms, _ in times.parts.values()]
    assert all(ms > 0 for ms in parts_ms) and 0 < sum(parts_ms) < times.total_ms


def test_openvino_attributes_a_packed_networks_blocks(tiny_traced):
    openvino()
    chain = tiny_traced.chain
    members = pack([[b] for b in chain.valid_blocks() if b[1] - b[0] > 1], 1)[0][0]
    plan = packed_plan(chain, members)
    network, names = packed_network(tiny_traced, plan, {(*b, ()): block_geometry(chain, *b) for b in plan.blocks})
    _, profiled = get_backend("openvino", threads=1).prepare_network_timing(network, (1, 3, 16, 16), "fp32",
                                                                            list(names))
    profiled.run(2, warmup=1)
    info = profiled._request.get_profiling_info()
    owners = {owner_of_node(i.node_name, i.node_type, profiled._owners) for i in info if i.status == i.Status.EXECUTED}
    # A node that runs two blocks' convs (a fusion on some CPUs) shares its time between them. Apart from that,
    # a conv under 1 microsecond a run (a 1x1 conv on a 1x1 map, here) reads 0 in OpenVINO's whole-microsecond
    # counters, NOT_RUN: nothing to count (docs/latency.md).
    sharing = {part for node, shares in profiled._shares.items() for part in shares}
    under_a_microsecond = {owner_of_node(i.node_name, i.node_type, profiled._owners) for i in info
                           if i.node_type == "Convolution" and i.status != i.Status.EXECUTED} - owners - sharing
    assert owners | sharing | under_a_microsecond == set(names) | {None}  # every block found; the head is nobody's
    times = profiled.part_times()
    assert set(times.parts) == set(names) and sum(ms for ms, _ in times.parts.values()) < times.total_ms


def test_a_node_running_two_blocks_convs_shares_its_time_by_multiply_adds():
    """Block 4's conv fused into block 3's node (NOT_RUN on its own), as OpenVINO fuses a depthwise 3x3 into the
    conv before it on AVX2 CPUs without AVX-512."""
    convs = {"/dpc_block_3/Conv/WithoutBiases": ("dpc_block_3", 3000),
             "/dpc_block_4/Conv/WithoutBiases": ("dpc_block_4", 1000),
             "/dpc_block_5/Conv/WithoutBiases": ("dpc_block_5", 500)}
    layers = {"/dpc_block_3/Conv/WithoutBiases": ["/dpc_block_3/Conv/WithoutBiases", "/dpc_block_3/Conv", "/Clip",
                                                  "/dpc_block_4/Conv/WithoutBiases", "/dpc_block_4/Conv"],
              # a conv with the residual add fused into it, the add claimed by the other branch: not shared
              "/dpc_block_5/Conv/WithoutBiases": ["/dpc_block_5/Conv/WithoutBiases", "/Add"]}
    shares = shared_node_shares(layers, convs)
    assert shares == {"/dpc_block_3/Conv/WithoutBiases": {"dpc_block_3": 0.75, "dpc_block_4": 0.25}}
    owners = {"/dpc_block_3/Conv": "dpc_block_3", "/dpc_block_4/Conv": "dpc_block_4",
              "/dpc_block_5/Conv": "dpc_block_5", "/Add": "dpc_block_4"}

    def info(name, us, executed=True):
        status = SimpleNamespace(EXECUTED="EXECUTED", NOT_RUN="NOT_RUN")
        return SimpleNamespace(node_name=name, node_type="Convolution", Status=status,
                               real_time=timedelta(microseconds=us),
                               status=status.EXECUTED if executed else status.NOT_RUN)

    # After one run a node's count is its whole microseconds, about half a microsecond short.
    parts, total = running_part_us([info("/dpc_block_3/Conv/WithoutBiases", 4000),
                                    info("/dpc_block_4/Conv/WithoutBiases", 0, False),
                                    info("/dpc_block_5/Conv/WithoutBiases", 2000), info("/GlobalAveragePool", 1000)],
                                   1, owners, shares)
    assert parts == pytest.approx({"dpc_block_3": 0.75 * 4000.5, "dpc_block_4": 0.25 * 4000.5,
                                   "dpc_block_5": 2000.5})
    assert total == pytest.approx(7001.5)


class CountingRequest:
    """OpenVINO's CPU counters as its source keeps them: per node, the sum of its run times each cut to whole
    microseconds, reported divided (in integers) by the runs since compiling; 0 reads NOT_RUN. Each run takes
    the node's base time times the next slowdown of ``schedule``, with jitter; ``runs`` keeps what each took."""

    def __init__(self, base_us, seed=0):
        self.base_us, self.rng = base_us, random.Random(seed)
        self.sums = {name: 0 for name in base_us}
        self.count = 0
        self.schedule = []
        self.runs = []  # per run: node name -> true microseconds

    def infer(self, share_outputs=True):
        slowdown = self.schedule.pop(0)
        took = {name: us * slowdown + self.rng.uniform(-0.5, 0.5) for name, us in self.base_us.items()}
        for name, us in took.items():
            self.sums[name] += math.floor(us)
        self.count += 1
        self.runs.append(took)

    def get_profiling_info(self):
        status = SimpleNamespace(EXECUTED="EXECUTED", NOT_RUN="NOT_RUN")
        return [SimpleNamespace(node_name=name, node_type="Convolution", Status=status,
                                real_time=timedelta(microseconds=total // self.count),
                                status=status.EXECUTED if total // self.count > 0 else status.NOT_RUN)
                for name, total in self.sums.items()]


def test_openvino_rounds_are_read_from_its_running_averages():
    """A small conv (7.3 us a run) and a large one (150.6 us); the model's first runs and each round's warm-up
    3x slower (cold), and rounds 10-19 loaded, 2x slower, which the caller leaves out. The counted rounds are
    read as two stretches, their warm-ups in them: each part's mean over those runs comes out within the bound
    the counters' rounding puts on it. Reading the running average itself would take in the loaded rounds."""
    small, large = "/small/Conv/WithoutBiases", "/large/Conv/WithoutBiases"
    request = CountingRequest({small: 7.3, large: 150.6})
    profile = _OpenVinoNetworkProfile(request, {"/small/Conv": "small", "/large/Conv": "large"})
    request.schedule = [3.0] * 5
    profile.run(0, warmup=5)
    counted, kept_runs = [], []
    for round_ in range(30):
        loaded = 10 <= round_ < 20
        request.schedule = [3.0] + [2.0 if loaded else 1.0] * 10
        profile.run(10, warmup=1)
        counted.append(not loaded)
        if not loaded:
            kept_runs.extend(request.runs[-11:])
    times = profile.part_times(counted)
    for part, node in (("small", small), ("large", large)):
        true_ms = statistics.mean(run[node] for run in kept_runs) / 1e3
        ms, bound_ms = times.parts[part]
        assert abs(ms - true_ms) <= bound_ms < 2e-3
    assert times.total_ms == pytest.approx(times.parts["small"][0] + times.parts["large"][0])
    running_average = statistics.mean(run[large] for run in request.runs[5:]) / 1e3
    assert running_average > 1.2 * times.parts["large"][0]
    assert profile.part_times([False] * 30).parts["small"] == (0.0, 0.0)  # no round counted: nothing read


def test_conv_multiply_adds_are_read_from_the_model(tiny_traced):
    ov = openvino()
    chain = tiny_traced.chain
    plan = packed_plan(chain, pack([[b] for b in chain.valid_blocks() if b[1] - b[0] > 1], 1)[0][0])
    network, names = packed_network(tiny_traced, plan, {(*b, ()): block_geometry(chain, *b) for b in plan.blocks})
    x = torch.randn(1, 3, 16, 16)
    expected = {}
    hooks = [network.get_submodule(name).register_forward_hook(
        lambda conv, _, out, name=name: expected.__setitem__(
            name, out.numel() * conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]))
        for name in names]
    network(x)
    for hook in hooks:
        hook.remove()
    model_bytes = export_onnx_bytes(network, x)
    convs = conv_macs(ov.Core().read_model(model_bytes), graph_part_owners(model_bytes, list(names)))
    assert sorted(part for part, _ in convs.values()) == sorted(names)  # one conv each
    assert {part: macs for part, macs in convs.values()} == expected


def test_openvino_in_network_table(tiny_traced, tmp_path):
    ov = openvino()
    backend = get_backend("openvino", threads=1)
    out = tmp_path / "t.csv"
    result = profile_table(tiny_traced.chain, backend, out, traced=tiny_traced, warmup=1, iters=3)
    meta = json.loads((tmp_path / "t.meta.json").read_text())
    assert meta["backend"] == "openvino" and meta["backend_version"] == ov.get_version()
    assert meta["backend_options"]["performance_hint"] == "LATENCY" and meta["threads"] == 1
    assert meta["timing"] == "in-network" and math.isfinite(meta["rest_ms"])
    assert "1x3x16x16" in meta["call_overhead_ms"]
    assert meta["statistic"] == backend.network_statistic and meta["statistic"].startswith("mean of the runs")
    table = read_latency_table(out)
    assert set(table.latency_ms) == set(tiny_traced.chain.valid_blocks())
    # OpenVINO counts node time in whole microseconds: a 16x16 depthwise conv may take 0 in most runs.
    timed = [r["latency_ms"] for r in result.rows if r["timed"]]
    assert all(ms >= 0 for ms in timed) and sum(ms > 0 for ms in timed) > len(timed) / 2


@pytest.mark.slow
def test_export_openvino_ir_verified(workdir):
    ov = openvino()
    args = ["export", "--model", "nets.py:small", "--input-shape", "1,3,16,16", "--plan", "plan.json",
            "--format", "openvino", "--verify"]
    result = run_cli(*args, "--out", "ir/merged.xml", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "verify:" in result.stdout and "OK" in result.stdout
    model = ov.Core().read_model(str(workdir / "ir" / "merged.xml"))  # reads merged.bin beside it
    assert [op.get_type_name() for op in model.get_ordered_ops()].count("Convolution") == 1  # three convs in one
    assert sorted(p.name for p in (workdir / "ir").iterdir()) == ["merged.bin", "merged.xml"]
    # A failed check or an out path that is not an .xml: exit 2, one line, nothing written.
    failed = run_cli(*args, "--tolerance", "-1", "--out", "bad/merged.xml", cwd=workdir)
    assert failed.returncode == 2 and "verification failed" in failed.stderr and "Traceback" not in failed.stderr
    wrong = run_cli(*args, "--out", "merged.ir", cwd=workdir)
    assert wrong.returncode == 2 and "ending in .xml" in wrong.stderr
    assert not (workdir / "bad").exists() and not list(workdir.glob("merged.*"))


def test_missing_openvino_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    with pytest.raises(UserError, match="pip install openvino"):
        get_backend("openvino")
    out = tmp_path / "t.csv"
    result = CliRunner().invoke(main, ["profile", "--model", "torchvision:resnet18", "--backend", "openvino",
                                       "--out", str(out)])
    assert result.exit_code == 2 and not out.exists()
    lines = result.output.strip().splitlines()
    assert lines == [lines[0]] and "pip install openvino" in lines[0] and "Traceback" not in result.output
