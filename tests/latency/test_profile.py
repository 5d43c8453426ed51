"""Profiler: covers exactly the valid blocks, times each shape once, resumes, refuses other settings."""

from __future__ import annotations

import csv
import json
import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import pytest

from dpcompress.backends import Backend, Runner
from dpcompress.graph.chain import Chain, ConvUnit, Residual
from dpcompress.errors import UserError
from dpcompress.latency.profile import (TABLE_COLUMNS, format_pair, partial_paths, profile_table)
from dpcompress.tables import meta_path_for, read_latency_table


def unit(position: int, cin: int, cout: int, hw: int, *, kernel: int = 3, stride: int = 1, groups: int = 1,
         activation: Optional[str] = "ReLU", linked: bool = True) -> ConvUnit:
    pad = kernel // 2
    out_hw = (hw + 2 * pad - kernel) // stride + 1
    return ConvUnit(position=position, name=f"conv{position}", in_channels=cin, out_channels=cout,
                    kernel=(kernel, kernel), stride=(stride, stride), padding=(pad, pad), dilation=(1, 1),
                    groups=groups, bias=False, in_shape=(1, cin, hw, hw), out_shape=(1, cout, out_hw, out_hw),
                    batchnorm=f"bn{position}", activation=activation, linked=linked and position > 1,
                    barrier=None if linked else "pool")


def uniform_chain(length: int = 4) -> Chain:
    """``length`` identical 3x3 8->8 convs at 8x8: a block's shape depends only on its length."""
    return Chain(model="test:uniform", input_shape=(1, 8, 8, 8),
                 units=[unit(p, 8, 8, 8) for p in range(1, length + 1)])


def mixed_chain() -> Chain:
    """Stem, a residual (1 -> 3) with a depthwise conv, a barrier before conv 5, then a strided conv."""
    units = [
        unit(1, 3, 8, 8),
        unit(2, 8, 8, 8, groups=8),
        unit(3, 8, 8, 8, kernel=1, activation=None),
        unit(4, 8, 16, 8, kernel=1),
        unit(5, 16, 16, 8, stride=2, linked=False),
        unit(6, 16, 16, 4, kernel=1, activation=None),
    ]
    return Chain(model="test:mixed", input_shape=(1, 3, 8, 8), units=units, residuals=[Residual(1, 3)])


class Prepared(NamedTuple):
    """What the recording backend was asked to time: the whole conv, not just its kernel."""

    kernel: Tuple[int, ...]
    input_shape: Tuple[int, ...]
    out_channels: int
    groups: int
    stride: Tuple[int, ...]
    activation: str


class RecordingBackend(Backend):
    """Counts prepare calls; a block's 'latency' is its kernel area times its output channels."""

    name = "recording"
    device = "cpu"

    def __init__(self, fail_after: Optional[int] = None) -> None:
        self.prepared: List[Prepared] = []
        self.fail_after = fail_after

    @property
    def version(self) -> str:
        return "1"

    @property
    def device_name(self) -> str:
        return "test device"

    def prepare(self, module, input_shape: Sequence[int], precision: str = "fp32") -> Runner:
        if self.fail_after is not None and len(self.prepared) >= self.fail_after:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-run
        conv = module[0]
        self.prepared.append(Prepared(tuple(conv.kernel_size), tuple(input_shape), conv.out_channels, conv.groups,
                                      tuple(conv.stride), type(module[1]).__name__))
        cost = float(conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels)
        return _ConstantRunner(cost)


class _ConstantRunner(Runner):
    def __init__(self, value: float) -> None:
        self.value = value

    def time(self, warmup: int, iters: int) -> List[float]:
        return [self.value] * iters


def read_csv(path) -> List[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def brute_force_valid_blocks(chain: Chain) -> List[Tuple[int, int]]:
    """Valid blocks from the definitions in DESIGN.md, independently of Chain.valid_blocks."""
    blocks = []
    for i in range(chain.num_positions):
        for j in range(i + 1, chain.num_positions + 1):
            crosses_barrier = any(not chain.unit(p).linked for p in range(i + 2, j + 1))
            splits_residual = any((i < r.start < j or i < r.end < j) and not (i <= r.start and r.end <= j)
                                  for r in chain.residuals)
            if not crosses_barrier and not splits_residual:
                blocks.append((i, j))
    return blocks


def test_rows_are_exactly_the_valid_blocks_sorted_with_shapes(tmp_path):
    chain = mixed_chain()
    out = tmp_path / "mixed.csv"
    profile_table(chain, RecordingBackend(), out, model_spec="test:mixed", warmup=0, iters=2)
    rows = read_csv(out)
    assert tuple(rows[0].keys()) == TABLE_COLUMNS
    blocks = [(int(r["start"]), int(r["end"])) for r in rows]
    assert blocks == brute_force_valid_blocks(chain)
    assert (0, 2) not in blocks and (1, 3) in blocks and (3, 5) not in blocks  # residual, barrier
    by_block = {(int(r["start"]), int(r["end"])): r for r in rows}
    row = by_block[(1, 4)]  # 3x3 dw + 1x1 + residual + 1x1 -> 3x3, 8 -> 16, dense (the residual mixes)
    assert (row["kernel"], row["stride"], row["in_channels"], row["out_channels"]) == ("3", "1", "8", "16")
    assert float(row["latency_ms"]) == 3 * 3 * 16
    strided = by_block[(4, 6)]
    assert (strided["kernel"], strided["stride"], strided["in_h"]) == ("3", "2", "8")
    assert float(strided["std_ms"]) == 0.0
    # The table reads back through the solver's reader, with the meta beside it.
    table = read_latency_table(out)
    assert set(table.latency_ms) == set(blocks)
    assert table.meta["chain_fingerprint"] == chain.fingerprint()


def test_identical_shapes_are_timed_once(tmp_path):
    chain = uniform_chain(4)  # 10 blocks, but only 4 shapes: lengths 1..4 -> kernels 3, 5, 7, 9
    backend = RecordingBackend()
    result = profile_table(chain, backend, tmp_path / "u.csv", warmup=0, iters=1, batch_size=5, prune_margin=None)
    assert len(result.rows) == 10
    assert sorted(p.kernel for p in backend.prepared) == [(3, 3), (5, 5), (7, 7), (9, 9)]
    assert {p.input_shape for p in backend.prepared} == {(5, 8, 8, 8)}  # batch size overrides N
    latency = {(r["start"], r["end"]): r["latency_ms"] for r in result.rows}
    for (i, j), value in latency.items():
        k = 1 + 2 * (j - i)
        assert value == k * k * 8
    meta = json.loads(meta_path_for(tmp_path / "u.csv").read_text())
    assert meta["batch_size"] == 5 and meta["unique_shapes"] == 4 and meta["num_blocks"] == 10


def test_resume_after_interruption_retimes_nothing(tmp_path):
    chain = mixed_chain()
    out = tmp_path / "t.csv"
    full = RecordingBackend()
    reference = profile_table(chain, full, tmp_path / "reference.csv", warmup=0, iters=1)
    with pytest.raises(KeyboardInterrupt):
        profile_table(chain, RecordingBackend(fail_after=3), out, warmup=0, iters=1)
    assert not out.exists() and not meta_path_for(out).exists()
    partial_table, _ = partial_paths(out)
    written = read_csv(partial_table)
    assert written  # rows of the three timed shapes were flushed
    with open(partial_table, "a") as f:
        f.write("5,6,0.1")  # a line cut short by the interruption
    second = RecordingBackend()
    result = profile_table(chain, second, out, warmup=0, iters=1)
    assert len(second.prepared) == len(full.prepared) - 3
    assert not set(second.prepared) & set(full.prepared[:3])
    assert result.timed_shapes == len(full.prepared) - 3 and result.resumed_blocks == len(written)
    assert read_csv(out) == read_csv(tmp_path / "reference.csv")
    assert not partial_table.exists()
    # Running again with the same settings re-times nothing at all.
    third = RecordingBackend()
    profile_table(chain, third, out, warmup=0, iters=1)
    assert third.prepared == []


def test_other_settings_are_refused_on_resume(tmp_path):
    chain = uniform_chain(3)
    out = tmp_path / "t.csv"
    with pytest.raises(KeyboardInterrupt):
        profile_table(chain, RecordingBackend(fail_after=1), out, warmup=0, iters=1)
    with pytest.raises(UserError, match="iters.*--overwrite"):
        profile_table(chain, RecordingBackend(), out, warmup=0, iters=7)
    profile_table(chain, RecordingBackend(), out, warmup=0, iters=1)
    with pytest.raises(UserError, match="batch_size.*new --out or --overwrite"):
        profile_table(chain, RecordingBackend(), out, warmup=0, iters=1, batch_size=2)
    with pytest.raises(UserError, match="chain_fingerprint"):
        profile_table(uniform_chain(4), RecordingBackend(), out, warmup=0, iters=1)
    with pytest.raises(UserError, match="prune_margin"):
        profile_table(chain, RecordingBackend(), out, warmup=0, iters=1, prune_margin=None)
    replaced = RecordingBackend()
    profile_table(chain, replaced, out, warmup=0, iters=1, batch_size=2, overwrite=True)
    assert len(replaced.prepared) == 3
    assert json.loads(meta_path_for(out).read_text())["batch_size"] == 2


def test_fp16_on_cpu_and_unknown_activation_fail_before_writing(tmp_path):
    out = tmp_path / "t.csv"
    with pytest.raises(UserError, match="fp16"):
        profile_table(uniform_chain(2), RecordingBackend(), out, precision="fp16")
    odd = Chain(model=None, input_shape=(1, 8, 8, 8), units=[unit(1, 8, 8, 8, activation="Swoosh")])
    with pytest.raises(UserError, match="Swoosh"):
        profile_table(odd, RecordingBackend(), out)
    assert list(tmp_path.iterdir()) == []


def test_progress_reports_counts_and_eta(tmp_path):
    seen = []
    profile_table(uniform_chain(3), RecordingBackend(), tmp_path / "t.csv", warmup=0, iters=1,
                  progress=seen.append)
    assert seen[0].done_blocks == 0 and seen[0].eta_s is None
    assert seen[-1].done_blocks == seen[-1].total_blocks == 6
    assert seen[-1].shapes_done == seen[-1].shapes_total == 3 and seen[-1].eta_s == 0


def test_format_pair():
    assert format_pair((3, 3)) == "3" and format_pair((1, 7)) == "1x7"


def test_dominated_blocks_are_bounded_not_timed(tmp_path):
    # Fake latency = kernel area x 8 and FLOPs = 2*8*8*8*8 x kernel area: every block runs at the same
    # FLOP rate. Singles cost 72; length n costs (2n+1)^2 * 8, so at margin 2 the bound (half of that)
    # passes the singles' sum 72n only for n = 4: 324 > 288.
    chain = uniform_chain(4)
    backend = RecordingBackend()
    result = profile_table(chain, backend, tmp_path / "u.csv", warmup=0, iters=1, prune_margin=2.0)
    assert sorted(p.kernel for p in backend.prepared) == [(3, 3), (5, 5), (7, 7)]
    row = next(r for r in result.rows if (r["start"], r["end"]) == (0, 4))
    assert row["timed"] == 0 and row["latency_ms"] == 9 * 9 * 8 / 2
    assert 4 * 72 < row["latency_ms"] <= 9 * 9 * 8  # dominated by its singles, and below its true latency
    assert all(r["timed"] == 1 for r in result.rows if (r["start"], r["end"]) != (0, 4))
    assert result.meta["bounded_blocks"] == 1
    assert read_csv(tmp_path / "u.csv")[3]["std_ms"] == "nan"
    # A resumed run keeps the bound and times nothing.
    again = RecordingBackend()
    profile_table(chain, again, tmp_path / "u.csv", warmup=0, iters=1, prune_margin=2.0)
    assert again.prepared == []


TINY_MODEL = """
from torch import nn

def tiny():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 4, 1))
"""


def test_profile_cli_writes_the_table_and_refuses_other_settings(tmp_path):
    from click.testing import CliRunner

    from dpcompress.cli import main

    (tmp_path / "tiny.py").write_text(TINY_MODEL)
    out = tmp_path / "tables" / "tiny.csv"
    args = ["profile", "--model", f"{tmp_path / 'tiny.py'}:tiny", "--input-shape", "1,3,16,16", "--threads", "1",
            "--warmup", "1", "--iters", "3", "--out", str(out)]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    # The depthwise conv 2 keeps its input's shape, so by default it may be pruned: one more row per
    # block holding it, the block (1, 2) pruned to nothing being the identity (latency 0).
    rows = {(int(r["start"]), int(r["end"]), r["pruned"]): r for r in read_csv(out)}
    unpruned = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert sorted(rows) == sorted([(*b, "") for b in unpruned] + [(0, 2, "2"), (0, 3, "2"), (1, 2, "2"), (1, 3, "2")])
    assert float(rows[(1, 2, "2")]["latency_ms"]) == 0.0
    meta = json.loads(meta_path_for(out).read_text())
    assert (meta["backend"], meta["threads"], meta["iters"], meta["warmup"]) == ("onnxruntime", 1, 3, 1)
    assert meta["prune"] is True and meta["identity_rows"] == 1 and meta["columns"][-1] == "pruned"
    # Whether the rest was fitted (enough networks far enough apart) depends on the timings; the CLI says so where it was.
    assert ("rest outside the blocks:" in first.output) == ("rest_per_block" in meta)
    refused = CliRunner().invoke(main, args[:-4] + ["--iters", "4", "--out", str(out)])
    assert refused.exit_code == 2 and "--overwrite" in refused.output and "Traceback" not in refused.output
    refused = CliRunner().invoke(main, args + ["--no-prune"])
    assert refused.exit_code == 2 and "prune" in refused.output
    unpruned_out = tmp_path / "tables" / "tiny-no-prune.csv"
    plain = CliRunner().invoke(main, args[:-1] + [str(unpruned_out), "--no-prune"])
    assert plain.exit_code == 0, plain.output
    assert [(int(r["start"]), int(r["end"])) for r in read_csv(unpruned_out)] == unpruned
    assert tuple(read_csv(unpruned_out)[0]) == TABLE_COLUMNS
    assert json.loads(meta_path_for(unpruned_out).read_text())["prune"] is False


class OverheadBackend(RecordingBackend):
    """Recording backend whose every call also pays a fixed cost that grows with the input's channels."""

    def __init__(self, per_channel: float = 10.0, fail_after: Optional[int] = None) -> None:
        super().__init__(fail_after)
        self.per_channel = per_channel
        self.overhead_calls = 0

    def call_overhead_ms(self, input_shape: Sequence[int], precision: str, warmup: int, iters: int) -> float:
        self.overhead_calls += 1
        return self.per_channel * input_shape[1]


def test_call_overhead_is_subtracted_per_input_shape_and_floored(tmp_path):
    chain = mixed_chain()
    out = tmp_path / "o.csv"
    plain = {(r["start"], r["end"]): r for r in profile_table(chain, RecordingBackend(), tmp_path / "p.csv",
                                                                warmup=0, iters=1, prune_margin=None).rows}
    rows = profile_table(chain, OverheadBackend(), out, warmup=0, iters=1, prune_margin=None).rows
    assert len(rows) == len(plain)
    for row in rows:
        raw = plain[(row["start"], row["end"])]["latency_ms"]
        expected = max(raw - 10.0 * row["in_channels"], 0.1 * raw)
        assert row["latency_ms"] == pytest.approx(expected)
    by_block = {(r["start"], r["end"]): r for r in rows}
    assert by_block[(0, 1)]["latency_ms"] == pytest.approx(3 * 3 * 8 - 30.0)  # stem: 3 input channels
    assert by_block[(3, 4)]["latency_ms"] == pytest.approx(0.1 * 16)  # 1x1 8->16 costs 16: floored
    meta = json.loads(meta_path_for(out).read_text())
    assert meta["call_overhead_ms"] == {"1x3x8x8": 30.0, "1x8x8x8": 80.0, "1x16x8x8": 160.0, "1x16x4x4": 160.0}
    assert "subtracted" in meta["call_overhead"]


def test_resume_keeps_the_call_overheads_already_recorded(tmp_path):
    chain = mixed_chain()
    reference = tmp_path / "reference.csv"
    profile_table(chain, OverheadBackend(), reference, warmup=0, iters=1, prune_margin=None)
    out = tmp_path / "o.csv"
    with pytest.raises(KeyboardInterrupt):
        profile_table(chain, OverheadBackend(fail_after=3), out, warmup=0, iters=1, prune_margin=None)
    # The overhead measured on resume would differ (noise); the table keeps one value per input shape.
    resumed = OverheadBackend(per_channel=99.0)
    profile_table(chain, resumed, out, warmup=0, iters=1, prune_margin=None)
    assert resumed.overhead_calls == 0
    assert read_csv(out) == read_csv(reference)
    assert (json.loads(meta_path_for(out).read_text())["call_overhead_ms"]
            == json.loads(meta_path_for(reference).read_text())["call_overhead_ms"])


def test_rest_fit_recovers_a_rest_that_grows_with_the_blocks_and_refuses_noise():
    from dpcompress.latency.profile import MIN_REST_NETWORKS, fit_rest

    networks = [(blocks, 0.08 + 0.05 * blocks) for blocks in (0.8, 1.0, 1.3, 1.6, 1.9, 2.2)]
    fixed_ms, per_block = fit_rest(networks)
    assert fixed_ms == pytest.approx(0.08) and per_block == pytest.approx(0.05)
    assert fit_rest(networks[:MIN_REST_NETWORKS - 1]) is None  # too few networks to fit a slope
    assert fit_rest([(1.0 + 0.01 * k, 0.1 + 0.05 * k) for k in range(6)]) is None  # sums too close together
    assert fit_rest([(blocks, 0.3 - 0.1 * blocks) for blocks, _ in networks]) is None  # shrinks as it grows
    # A fixed part that fits below 0 is none: the share alone is fitted (here the true one, less a hair).
    assert fit_rest([(blocks, 0.05 * blocks - 0.001) for blocks, _ in networks]) == (0.0, pytest.approx(0.05, rel=0.02))


def test_a_plan_network_is_read_against_the_anchor_beside_it():
    from dpcompress.latency.profile import plan_network_rests

    # A plan whose rows add up to 0.7 ms ran at 0.8 ms beside the anchor's 1.6 ms: half the original, whose
    # network of single convs ran at 1.5 ms; in a state 1.25x slower for both, the same point.
    quiet, slow = plan_network_rests([[0.7, 0.8, 1.6, 1.5], [0.7, 1.0, 2.0, 1.5]])
    assert quiet == pytest.approx([0.7, 0.05, 1.6]) and slow[:2] == pytest.approx(quiet[:2])


def test_the_profiles_fit_takes_quiet_networks_and_plans_timed_near_the_level():
    from dpcompress.latency.profile import ALL_NETWORKS, fit_rest, profile_rest_fit

    level = 1.0
    quiet = [[blocks, 0.05 + 0.04 * blocks, 1.1] for blocks in (1.0, 1.2, 1.4, 1.6)]
    loaded = [[1.3, 0.9, 1.5]]  # its anchor over QUIET_MARGIN x the level: left out
    near = [[0.7, 0.5, 1.04, 1.5]]  # plans as plan_network_rests reads them; anchors at 1.04 and 1.1 x the level
    far = [[0.7, 0.8, 1.1, 1.5]]  # its rest (0.39 ms) would turn the slope negative: no fit
    points = [(b, r) for b, r, _ in quiet] + [(0.7, 0.5 / 1.04 * 1.5 - 0.7)]
    assert profile_rest_fit(quiet + loaded, near + far, level) == (*fit_rest(points), ALL_NETWORKS)
    everything = [(b, r) for b, r, _ in quiet + loaded]
    assert profile_rest_fit(quiet + loaded, [], None) == (*fit_rest(everything), ALL_NETWORKS)  # no level: all count


def test_with_plans_near_the_level_the_rest_is_fitted_over_whole_networks_alone():
    from dpcompress.latency.profile import ALL_NETWORKS, WHOLE_NETWORKS, fit_rest, profile_rest_fit

    # Whole networks pay 1.08 x their rows less 0.03 ms (a deep plan's convs run faster than its rows say);
    # packed networks' own rests follow another line.
    def wall(rows_ms):
        return -0.03 + 1.08 * rows_ms

    singles_rows, level = 1.4, 1.5
    singles_rest = wall(singles_rows) - singles_rows
    packed = [[blocks, 0.1 + 0.01 * blocks, level] for blocks in (1.0, 1.2, 1.4, 1.6, 1.8)]
    # Two plans timed in a state 1.03x slower than the single convs' (the anchor beside them too): it cancels.
    plans = [[rows, 1.03 * wall(rows), 1.03 * wall(singles_rows), wall(singles_rows)] for rows in (0.7, 0.85)]
    fitted = profile_rest_fit(packed, plans, level, singles_rest)
    assert fitted.over == WHOLE_NETWORKS
    # Read only between the deepest plan and the original, the line keeps its negative fixed part.
    assert (fitted.fixed_ms, fitted.per_block) == (pytest.approx(-0.03), pytest.approx(0.08))
    # No singles' rest given, or every plan far from the level: every quiet network, as before.
    every = profile_rest_fit(packed, plans, level)
    assert every.over == ALL_NETWORKS and every[:2] == pytest.approx(
        fit_rest([(b, r) for b, r, _ in packed] + [(rows, wall(rows) - rows) for rows in (0.7, 0.85)]))
    assert profile_rest_fit(packed, plans, 0.9 * level, singles_rest).over == ALL_NETWORKS
    # Whole networks whose rest shrinks as the network grows (a deep plan paying more outside its rows than
    # the original): no cost to fit, so every quiet network.
    assert profile_rest_fit(packed, plans, level, singles_rest_ms=0.0).over == ALL_NETWORKS


def test_plan_covers_are_the_cheapest_cover_and_every_other_merged_block_of_it():
    import itertools
    import random

    from dpcompress.latency.profile import plan_covers

    def partitions(num_positions):
        for cuts in itertools.product((False, True), repeat=num_positions - 1):
            bounds = [0, *(p for p, cut in enumerate(cuts, start=1) if cut), num_positions]
            yield list(zip(bounds, bounds[1:]))

    rng = random.Random(0)
    for trial in range(30):
        num_positions = rng.randint(2, 7)
        # Single convs always; merged blocks of up to four convs, some of them missing (untimed).
        latency = {(p - 1, p): rng.uniform(0.5, 1.5) for p in range(1, num_positions + 1)}
        latency.update({(s, e): rng.uniform(0.3, 2.5) for s in range(num_positions)
                        for e in range(s + 2, min(num_positions, s + 4) + 1) if rng.random() < 0.7})
        cost = {tuple(cover): math.fsum(latency[b] for b in cover) for cover in partitions(num_positions)
                if all(b in latency for b in cover)}
        best = min(cost.values())
        covers = plan_covers(num_positions, latency)
        merged_in_best = [[b for b in cover if b[1] - b[0] > 1] for cover, c in cost.items() if c == best]
        if covers:
            assert covers[0] in merged_in_best, trial
            assert covers[1:] == ([covers[0][::2]] if len(covers[0]) > 1 else [])
        else:
            assert [] in merged_in_best, trial  # the singles are the cheapest: nothing merged to check
