"""Profiler: covers exactly the valid blocks, times each shape once, resumes, refuses other settings."""

from __future__ import annotations

import json
from typing import List, Tuple

import pytest

from dpcompress.graph.chain import Chain
from dpcompress.errors import UserError
from dpcompress.latency.profile import profile_table
from dpcompress.latency.table_file import TABLE_COLUMNS, format_pair, partial_paths
from dpcompress.tables import meta_path_for, read_latency_table
from tests.latency.helpers import OverheadBackend, RecordingBackend, mixed_chain, read_csv, uniform_chain, unit


def brute_force_valid_blocks(chain: Chain) -> List[Tuple[int, int]]:
    """Valid blocks from the definitions in docs/formats.md, independently of Chain.valid_blocks."""
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


@pytest.mark.slow
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
