"""In-network timing: ONNX nodes attributed to the right block, packing, and an in-network table."""

from __future__ import annotations

import json
import math

import onnx
import pytest
import torch
from torch import nn

from dpcompress.backends import Backend, Runner, RunByRunProfile, export_onnx_bytes, get_backend
from dpcompress.backends.onnxruntime_backend import _owner_of, part_owners
from dpcompress.latency.network_timing import pack, packed_network, packed_plan, time_networks
from dpcompress.graph.geometry import block_geometry
from dpcompress.latency.profile import profile_table
from dpcompress.latency.timing import MIN_KEPT_FRACTION
from dpcompress.search.solver import frontier, solve_for_model
from dpcompress.tables import read_latency_table
from tests.latency.helpers import ThreeParts


def test_nodes_are_attributed_to_their_part_with_the_ops_fused_after_it():
    graph = onnx.load_from_string(export_onnx_bytes(ThreeParts().eval(), torch.randn(1, 4, 8, 8))).graph
    owners = part_owners(graph, ["part_a", "part_b", "part_c"])
    by_op = {}
    for node in graph.node:
        by_op.setdefault(node.op_type, []).append(owners.get(node.name))
    assert by_op["Relu"] == ["part_a"]  # its activation
    assert sorted(by_op["Sigmoid"], key=str) == [None, "part_b"]  # SiLU's sigmoid; the gate's is not a block's
    assert "part_b" in by_op["Mul"] and None in by_op["Mul"]  # SiLU's Mul; the gating Mul belongs to nobody
    assert by_op["Add"] == ["part_b"]  # the residual add at part_b's output
    convs = [owners.get(n.name) for n in graph.node if n.op_type == "Conv"]
    assert convs == ["part_a", "part_b", "part_c", None]  # the gate conv is nobody's
    # part_c's output is read by the gate's mean and by the Mul: nothing after it is taken.
    assert all(owners.get(n.name) != "part_c" for n in graph.node if n.op_type in ("ReduceMean", "Mul"))


def test_a_network_is_exported_once_for_its_plain_and_profiled_sessions(monkeypatch, tmp_path):
    import tempfile

    import dpcompress.backends.onnxruntime_backend as onnxruntime_backend

    exports = []
    export = onnxruntime_backend.export_onnx_file
    monkeypatch.setattr(onnxruntime_backend, "export_onnx_file", lambda *args, **kw: exports.append(args) or export(*args, **kw))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the export's and the profiler's folders land here
    plain, profiled = get_backend("onnxruntime", threads=1).prepare_network_timing(
        ThreeParts().eval(), (1, 4, 16, 16), "fp32", ["part_a", "part_b", "part_c"])
    assert len(exports) == 1
    assert [p.name for p in tmp_path.iterdir()] == [p.name for p in tmp_path.glob("dpcompress_ort_profile_*")]
    assert len(plain.time(1, 3)) == 3
    profiled.run(2, warmup=1)
    profiled.run(3, warmup=1)
    parts, totals = profiled.run_times()
    assert set(parts) == {"part_a", "part_b", "part_c"} and len(totals) == 5  # warm-ups not recorded
    assert all(0 < sum(times[i] for times in parts.values()) <= totals[i] for i in range(5))
    assert not list(tmp_path.iterdir())  # the ONNX file went once the sessions were built; the trace once read


def test_profiled_node_names_map_back_to_their_part():
    owners = {"/part_a/Conv": "a", "/relu/Relu_output_0": "a", "/silu/Mul": "b"}
    assert _owner_of("/part_a/Conv_kernel_time", owners) == "a"
    assert _owner_of("/relu/Relu_output_0_nchwc_kernel_time", owners) == "a"  # a conv fused with its ReLU
    assert _owner_of("/silu/Mul/QuickGeluFusion/_kernel_time", owners) == "b"  # SiLU fused into one node
    assert _owner_of("ReorderOutput_token_3_kernel_time", owners) is None


def test_pack_makes_disjoint_sets_within_the_limit():
    blocks = [(0, 2), (1, 3), (2, 4), (3, 5), (0, 5), (4, 6)]
    networks, left = pack([[b] for b in blocks], max_networks=2)
    assert len(networks) <= 2
    placed = [b for members in networks for b in members]
    assert sorted(placed + [b for (b,) in left]) == sorted(blocks)
    for members in networks:
        for i, (s1, e1) in enumerate(members):
            assert all(e1 <= s2 or e2 <= s1 for s2, e2 in members[i + 1:])


def test_packed_network_computes_with_the_blocks_geometry(tiny_traced):
    chain = tiny_traced.chain
    blocks = [b for b in chain.valid_blocks() if b[1] - b[0] > 1][:1]
    plan = packed_plan(chain, blocks)
    assert set(blocks) <= set(plan.blocks)
    assert all(e - s == 1 for s, e in plan.blocks if (s, e) not in blocks)
    geometries = {(*b, ()): block_geometry(chain, *b) for b in plan.blocks}
    network, names = packed_network(tiny_traced, plan, geometries)
    assert sorted(names.values()) == sorted(geometries)
    for name, block in names.items():
        conv = network.get_submodule(name)
        assert tuple(conv.kernel_size) == geometries[block].kernel and conv.groups == geometries[block].groups
    assert network(torch.randn(1, 3, 16, 16)).shape == (1, 10)
    assert not any(name.startswith("dpc_block_") for name in dict(tiny_traced.gm.named_children()))


def test_single_conv_blocks_share_the_models_weights(tiny_traced):
    """A network of single convs holds no weights of its own beyond zero biases (memory: issue 12);
    a merged block's conv has its own, of the merged shape."""
    chain = tiny_traced.chain
    merged = [b for b in chain.valid_blocks() if b[1] - b[0] > 1][:1]
    plan = packed_plan(chain, merged)
    geometries = {(*b, ()): block_geometry(chain, *b) for b in plan.blocks}
    network, names = packed_network(tiny_traced, plan, geometries)
    model_weights = {id(p) for p in tiny_traced.gm.parameters()}
    for name, (start, end, _) in names.items():
        conv = network.get_submodule(name)
        assert (id(conv.weight) in model_weights) == (end - start == 1), (start, end)
        if conv.bias is not None and end - start == 1:
            assert not conv.bias.any()
    x = torch.randn(1, 3, 16, 16)
    assert torch.isfinite(network(x)).all()


@pytest.mark.slow
def test_in_network_table_has_every_block_the_rest_and_says_how_it_was_timed(tiny_traced, tmp_path):
    backend = get_backend("onnxruntime", threads=1)
    out = tmp_path / "t.csv"
    result = profile_table(tiny_traced.chain, backend, out, traced=tiny_traced, warmup=1, iters=3)
    meta = json.loads((tmp_path / "t.meta.json").read_text())
    assert meta["timing"] == "in-network" and "per-node profiler" in meta["timing_method"]
    assert math.isfinite(meta["rest_ms"]) and "1x3x16x16" in meta["call_overhead_ms"]
    table = read_latency_table(out)
    assert set(table.latency_ms) == set(tiny_traced.chain.valid_blocks())
    assert all(r["latency_ms"] > 0 for r in result.rows if r["timed"])
    assert table.rest_ms == meta["rest_ms"]
    # Where the networks' rests fit one that grows with their blocks, every row is priced that much larger.
    growth = 1 + meta.get("rest_per_block", 0.0)
    raw = {(r["start"], r["end"]): r["latency_ms"] for r in result.rows if r["pruned"] == ""}
    assert table.latency_ms == pytest.approx({block: growth * ms for block, ms in raw.items()}, abs=2e-6)  # 6 decimals
    assert all(len(entry) == 3 and entry[0] > 0 for entry in meta["network_rests"])
    # The plan networks' blocks are summed by the table's rows: a cover's, as plan_covers finds it.
    from dpcompress.latency.calibration import DEFAULT_CALIBRATION, plan_covers

    timed = {(r["start"], r["end"], ()): r["latency_ms"] for r in result.rows if r["pruned"] == "" and r["timed"]}
    covers = plan_covers(tiny_traced.chain.num_positions, timed)
    cover_sums = [math.fsum([*(raw[(s, e)] for s, e, _ in cover),
                             *(raw[(p - 1, p)] for p in range(1, table.num_positions + 1)
                               if not any(s < p <= e for s, e, _ in cover))]) for cover in covers]
    assert len(meta["plan_networks"]) <= DEFAULT_CALIBRATION.plan_network_tries * len(covers)  # timed again where loaded
    assert meta["cheapest_cover_merges"] == bool(covers)
    if not covers:  # the original is the cheapest plan the rows price: its own rest is the line
        assert (meta["rest_fit"], meta["rest_per_block"], meta["rest_ms"]) == ("whole networks", 0.0,
                                                                               meta["singles_rest_ms"])
    singles_wall = math.fsum([*(raw[(p - 1, p)] for p in range(1, table.num_positions + 1)),
                              meta.get("singles_rest_ms", meta["rest_ms"])])
    for blocks_ms, wall_ms, anchor_ms, singles_wall_ms in meta["plan_networks"]:
        assert any(blocks_ms == pytest.approx(c, abs=1e-5) for c in cover_sums) and wall_ms > 0 and anchor_ms > 0
        assert singles_wall_ms == pytest.approx(singles_wall, abs=1e-5)
    singles = math.fsum(table.latency_ms[(p - 1, p)] for p in range(1, table.num_positions + 1))
    assert table.original_latency_ms() == pytest.approx(singles + meta["rest_ms"])
    # A budget between the smallest achievable latency and the original's (both depend on the timings).
    smallest = frontier(table, None, tiny_traced.chain.activation_positions)[0][0]
    budget = (smallest + table.original_latency_ms()) / 2
    plan, _ = solve_for_model(table, None, budget, chain=tiny_traced.chain)
    assert plan.latency_ms == pytest.approx(math.fsum(table.latency_ms[b] for b in plan.blocks) + table.rest_ms)
    assert plan.latency_ms <= budget
    # Asking for the other timing on the same file is refused, as other settings are.
    from dpcompress.errors import UserError

    with pytest.raises(UserError, match="timing"):
        profile_table(tiny_traced.chain, backend, out, traced=tiny_traced, warmup=1, iters=3, timing="standalone")


def test_in_network_timing_needs_the_model_and_a_backend_that_profiles_nodes(tiny_traced, tmp_path):
    from dpcompress.errors import UserError

    backend = get_backend("onnxruntime", threads=1)
    with pytest.raises(UserError, match="needs the model"):
        profile_table(tiny_traced.chain, backend, tmp_path / "a.csv", timing="in-network")
    torch_backend = get_backend("torch", threads=1)
    with pytest.raises(UserError, match="cannot time blocks inside a network"):
        profile_table(tiny_traced.chain, torch_backend, tmp_path / "b.csv", traced=tiny_traced, timing="in-network")
    assert not (tmp_path / "a.csv").exists() and not (tmp_path / "b.csv").exists()


@pytest.mark.slow
def test_an_interrupted_in_network_profile_resumes_without_retiming(tiny_traced, tmp_path):
    from dpcompress.backends.onnxruntime_backend import OnnxRuntimeBackend
    from dpcompress.latency.table_file import partial_paths

    class CountingBackend(OnnxRuntimeBackend):
        def __init__(self, fail_at=None):
            super().__init__(threads=1)
            self.parts, self.fail_at = [], fail_at

        def prepare_network_timing(self, module, input_shape, precision, parts):
            self.parts.append(len(parts))
            if len(self.parts) == self.fail_at:
                raise KeyboardInterrupt
            return super().prepare_network_timing(module, input_shape, precision, parts)

    out = tmp_path / "t.csv"
    with pytest.raises(KeyboardInterrupt):
        profile_table(tiny_traced.chain, CountingBackend(fail_at=2), out, traced=tiny_traced, warmup=1, iters=3)
    partial_rows, partial_meta = partial_paths(out)
    rest = json.loads(partial_meta.read_text())["rest_ms"]  # the network of single convs finished
    singles = {(p - 1, p) for p in range(1, tiny_traced.chain.num_positions + 1)}
    assert singles <= {(int(l.split(",")[0]), int(l.split(",")[1])) for l in partial_rows.read_text().splitlines()[1:]}
    resumed = CountingBackend()
    result = profile_table(tiny_traced.chain, resumed, out, traced=tiny_traced, warmup=1, iters=3)
    assert result.resumed_blocks >= len(singles)
    assert result.meta.get("singles_rest_ms", result.meta["rest_ms"]) == rest
    assert result.meta["network_rests"][0][1] == pytest.approx(rest)  # the first run's networks count in the fit
    # Run again on the finished table: nothing is timed, and the rest and its fit stay as they were.
    finished = CountingBackend()
    again = profile_table(tiny_traced.chain, finished, out, traced=tiny_traced, warmup=1, iters=3)
    assert again.timed_shapes == 0 and finished.parts == []  # nor its plan networks again
    assert again.meta["plan_networks"] == result.meta["plan_networks"]
    assert [again.meta.get(k) for k in ("rest_ms", "rest_per_block", "singles_rest_ms")] == \
        [result.meta.get(k) for k in ("rest_ms", "rest_per_block", "singles_rest_ms")]
    assert "anchor_quiet_ms" in result.meta  # the state the closed loop benches against, kept as all the rest is
    assert {k: v for k, v in again.meta.items() if k != "date"} == {k: v for k, v in result.meta.items() if k != "date"}
    # The network of single convs (one part per conv) was not profiled again; the others were.
    assert resumed.parts and len(singles) not in resumed.parts
    assert not partial_rows.exists() and set(read_latency_table(out).latency_ms) == set(tiny_traced.chain.valid_blocks())


@pytest.mark.slow
def test_a_hand_edited_meta_whose_networks_are_malformed_is_refused_in_one_line(tiny_traced, tmp_path):
    from dpcompress.errors import UserError
    from dpcompress.tables import meta_path_for

    out = tmp_path / "t.csv"
    backend = get_backend("onnxruntime", threads=1)
    profile_table(tiny_traced.chain, backend, out, traced=tiny_traced, warmup=1, iters=3)
    meta_path = meta_path_for(out)
    good = json.loads(meta_path.read_text())
    rows = out.read_text()
    for key, entries in (("plan_networks", [[1.0, 2.0, 3.0]]),  # the form before singles_wall_ms
                         ("network_rests", [[1.0, "0.1", None]]), ("network_rests", {"a": 1})):
        meta_path.write_text(json.dumps(dict(good, **{key: entries})))
        with pytest.raises(UserError, match=f"{key} must be a list of"):
            profile_table(tiny_traced.chain, backend, out, traced=tiny_traced, warmup=1, iters=3)
        assert out.read_text() == rows  # nothing written
    meta_path.write_text(json.dumps(good))  # as made: accepted, nothing timed
    assert profile_table(tiny_traced.chain, backend, out, traced=tiny_traced, warmup=1, iters=3).timed_shapes == 0


def test_a_call_overhead_larger_than_the_network_never_zeroes_its_blocks(tiny_traced):
    # Under load the measured call overhead of a tiny network can exceed its wall time.
    chain = tiny_traced.chain
    plan = packed_plan(chain, [])
    geometries = {(s, e, ()): block_geometry(chain, s, e) for s, e in plan.blocks}
    [timing] = time_networks(get_backend("onnxruntime", threads=1), tiny_traced, [plan], geometries,
                             chain.input_shape, "fp32", 1, 3, call_overhead_ms=1e6)
    assert all(latency > 0 for latency, _ in timing.blocks.values())
    assert sum(latency for latency, _ in timing.blocks.values()) <= MIN_KEPT_FRACTION * timing.wall_ms * (1 + 1e-9)


def test_a_backend_that_asks_for_more_runs_per_network_gets_them(tiny_traced):
    from dpcompress.backends.onnxruntime_backend import OnnxRuntimeBackend

    class NoisyCounters(OnnxRuntimeBackend):
        @property
        def min_network_runs(self) -> int:
            return 100

    chain = tiny_traced.chain
    plan = packed_plan(chain, [])
    geometries = {(s, e, ()): block_geometry(chain, s, e) for s, e in plan.blocks}
    runs = [time_networks(backend, tiny_traced, [plan], geometries, chain.input_shape, "fp32", 1, 3,
                          call_overhead_ms=0.0)[0].runs
            for backend in (OnnxRuntimeBackend(threads=1), NoisyCounters(threads=1))]
    assert runs[0] < 100 <= runs[1]


def test_every_session_is_freed_before_the_memory_goes_back(tiny_traced, monkeypatch):
    """time_networks' last trim comes after its last sessions are gone: otherwise their weights
    stay in the heap after they are freed (780 MB after profiling wide_resnet101_2; issue 12)."""
    import gc

    import onnxruntime

    import dpcompress.latency.network_timing as network_timing

    def live_sessions() -> int:
        return sum(isinstance(o, onnxruntime.InferenceSession) for o in gc.get_objects())

    live_at_trim = []
    monkeypatch.setattr(network_timing, "release_freed_memory",
                        lambda: (gc.collect(), live_at_trim.append(live_sessions())))
    chain = tiny_traced.chain
    plans = [packed_plan(chain, []), packed_plan(chain, [b for b in chain.valid_blocks() if b[1] - b[0] > 1][:1])]
    geometries = {(s, e, ()): block_geometry(chain, s, e) for plan in plans for s, e in plan.blocks}
    before = live_sessions()
    time_networks(get_backend("onnxruntime", threads=1), tiny_traced, plans, geometries, chain.input_shape,
                  "fp32", 1, 3, call_overhead_ms=0.0)
    assert live_at_trim[-1] == before


class PhasedNetworkBackend:
    """Networks whose parts take 1 ms each and 0.5 ms outside them, in a quiet round; in a loaded
    round (``loaded[mark]``, the mark the anchor made last) the first part takes 2 ms: a loaded
    state slows blocks unevenly."""

    min_network_runs = 50

    def __init__(self, loaded, networks_loaded=()):
        self.loaded, self.mark = loaded, [0]
        self.networks_loaded = networks_loaded  # marks after which the networks are slowed, not the anchor

    def state(self) -> bool:
        return self.loaded[min(self.mark[0], len(self.loaded) - 1)]

    def parts_ms(self, parts):
        slowed = self.state() or self.mark[0] in self.networks_loaded
        return {p: (2.0 if i == 0 and slowed else 1.0) for i, p in enumerate(sorted(parts))}

    def prepare_network_timing(self, module, input_shape, precision, parts):
        backend = self

        class Plain:
            def time(self, warmup, iters):
                return [sum(backend.parts_ms(parts).values()) + 0.5] * iters

        class Profiled(RunByRunProfile):
            recorded = {p: [] for p in parts}
            totals = []

            def _run(self, iters, warmup):
                for _ in range(iters):
                    ms = backend.parts_ms(parts)
                    for p in parts:
                        self.recorded[p].append(ms[p])
                    self.totals.append(sum(ms.values()) + 0.5)

            def run_times(self):
                return self.recorded, self.totals

        return Plain(), Profiled()


class MarkingAnchorRunner:
    """The anchor's network: 2.5 ms quiet, 3.5 ms loaded; each measurement is a new mark."""

    def __init__(self, backend):
        self.backend = backend

    def time(self, warmup, iters):
        self.backend.mark[0] += 1
        return [3.5 if self.backend.state() else 2.5] * iters


def test_an_anchor_keeps_the_loaded_rounds_out_of_the_blocks_times(tiny_traced):
    from dpcompress.latency.network_timing import Anchor

    chain = tiny_traced.chain
    members = pack([[b] for b in chain.valid_blocks() if b[1] - b[0] > 1], 1)[0][0]
    plan = packed_plan(chain, members)
    geometries = {(*b, ()): block_geometry(chain, *b) for b in plan.blocks}
    first = min(packed_network(tiny_traced, plan, geometries)[1].items())  # the part slowed when loaded
    # Marks 1-5 loaded (the planned 5 rounds: the quiet level comes from marks 0 and 6 on), quiet after.
    backend = PhasedNetworkBackend([False] + [True] * 5 + [False] * 20)
    anchor = Anchor(MarkingAnchorRunner(backend), runs=3)
    [timing] = time_networks(backend, tiny_traced, [plan], geometries, (1, 3, 16, 16), "fp32", warmup=1, iters=50,
                             call_overhead_ms=0.0, anchor=anchor)
    assert timing.quiet and all(ms == pytest.approx(1.0) for ms, _ in timing.blocks.values())
    assert len(anchor.history) > 6  # rounds were added until half the planned ones were quiet
    # Loaded throughout, against a quiet level known from before: every round counts, and it says so.
    backend = PhasedNetworkBackend([True] * 40)
    anchor = Anchor(MarkingAnchorRunner(backend), runs=3)
    anchor.history = [2.5] * 5
    [timing] = time_networks(backend, tiny_traced, [plan], geometries, (1, 3, 16, 16), "fp32", warmup=1, iters=50,
                             call_overhead_ms=0.0, anchor=anchor)
    assert not timing.quiet and timing.blocks[first[1]][0] == pytest.approx(2.0)
    # A state that slows the network and not the anchor (rounds 1-12 of 20, enough rounds to judge the
    # network by its own): those rounds are left out too.
    backend = PhasedNetworkBackend([False] * 80, networks_loaded=set(range(2, 14)))
    anchor = Anchor(MarkingAnchorRunner(backend), runs=3)
    [timing] = time_networks(backend, tiny_traced, [plan], geometries, (1, 3, 16, 16), "fp32", warmup=1, iters=200,
                             call_overhead_ms=0.0, anchor=anchor)
    assert timing.quiet and timing.blocks[first[1]][0] == pytest.approx(1.0)
    # With 5 rounds (too few to judge the network by its own), the anchor alone decides: the slowed majority
    # (rounds 1-3) is kept.
    backend = PhasedNetworkBackend([False] * 40, networks_loaded={2, 3, 4})
    anchor = Anchor(MarkingAnchorRunner(backend), runs=3)
    [timing] = time_networks(backend, tiny_traced, [plan], geometries, (1, 3, 16, 16), "fp32", warmup=1, iters=50,
                             call_overhead_ms=0.0, anchor=anchor)
    assert timing.quiet and timing.blocks[first[1]][0] == pytest.approx(2.0)
    # Without an anchor, the rounds are not told apart: the loaded majority sets the slowed block's time.
    backend = PhasedNetworkBackend([True] * 40)
    [timing] = time_networks(backend, tiny_traced, [plan], geometries, (1, 3, 16, 16), "fp32", warmup=1, iters=50,
                             call_overhead_ms=0.0)
    assert timing.quiet and timing.blocks[first[1]][0] == pytest.approx(2.0)
class StateScheduleBackend(Backend):
    """A machine whose state follows the anchor's measurements: ``state(mark)`` gives the anchor network's ms and
    each profiled part's ms while the anchor has measured ``mark`` times; half a part's ms outside the parts."""

    name, device = "phased", "cpu"
    version, device_name = "1", "test machine"

    def __init__(self, state):
        self.state, self.marks = state, 0

    @property
    def profiles_networks(self):
        return True

    def prepare(self, module, input_shape, precision="fp32"):  # the anchor's network
        backend = self

        class AnchorRunner(Runner):
            def time(self, warmup, iters):
                backend.marks += 1
                return [backend.state(backend.marks)[0]] * iters

        return AnchorRunner()

    def prepare_network_timing(self, module, input_shape, precision, parts):
        backend = self

        def part_ms():
            return backend.state(backend.marks)[1]

        class Plain(Runner):
            def time(self, warmup, iters):
                return [(len(parts) + 0.5) * part_ms()] * iters

        class Profiled(RunByRunProfile):
            recorded = {p: [] for p in parts}
            totals = []

            def _run(self, iters, warmup):
                for _ in range(iters):
                    for p in parts:
                        self.recorded[p].append(part_ms())
                    self.totals.append((len(parts) + 0.5) * part_ms())

            def run_times(self):
                return self.recorded, self.totals

        return Plain(), Profiled()


LOADED, QUIET, WORSE = (3.5, 2.0), (2.5, 1.0), (4.5, 3.0)  # the anchor's ms, a part's ms


@pytest.mark.slow
def test_a_profile_that_starts_loaded_times_those_networks_again(tiny_traced, tmp_path):
    """The anchor's first measurements all loaded: the network of single convs takes that state for quiet, and
    only the profile's end, with quiet rounds seen since, shows it was not; its rows and rest are timed again."""
    def profile(state, name):
        result = profile_table(tiny_traced.chain, StateScheduleBackend(state), tmp_path / name, traced=tiny_traced,
                               warmup=1, iters=3, prune_margin=None)
        return result.meta, read_latency_table(tmp_path / name).latency_ms

    # Loaded for the anchor's first run and the singles' network's rounds (marks up to 6), quiet after.
    meta, latency = profile(lambda mark: LOADED if mark <= 6 else QUIET, "t.csv")
    assert any(e - s == 1 for s, e in latency)
    assert meta.get("singles_rest_ms", meta["rest_ms"]) == pytest.approx(0.5) and meta["retimed_shapes"] >= 1
    assert all(ms == pytest.approx(1.0) for ms in latency.values())
    # Timed again in a state further from quiet than the first time: the first figures stay.
    meta, latency = profile(lambda mark: LOADED if mark <= 6 else QUIET if mark <= 14 else WORSE, "w.csv")
    singles = [ms for (s, e), ms in latency.items() if e - s == 1]
    assert meta["retimed_shapes"] >= 1 and singles and all(ms == pytest.approx(2.0) for ms in singles)
    assert meta.get("singles_rest_ms", meta["rest_ms"]) == pytest.approx(1.0)
    # Judged once more only: a profile wholly in one state keeps what it timed.
    meta, latency = profile(lambda mark: LOADED, "u.csv")
    assert meta["retimed_shapes"] == 0 and all(ms == pytest.approx(2.0) for ms in latency.values())


def test_pack_places_an_item_at_whichever_of_its_positions_fits():
    # Two items overlap at their first positions; the second has another that is free.
    networks, left = pack([[(0, 3)], [(1, 4), (4, 6)], [(2, 5)]], max_networks=1)
    assert networks == [[(0, 3), (4, 6)]]
    assert left == [[(2, 5)]]
    # Without the alternative, the same items need a second network.
    networks, left = pack([[(0, 3)], [(1, 4)], [(2, 5)]], max_networks=1)
    assert networks == [[(0, 3)]] and left == [[(1, 4)], [(2, 5)]]
