"""Importance: allowed segments, the three methods, resume, torchrun sharding, bad inputs."""

from __future__ import annotations

import copy
import csv
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dpcompress.cli import main
from dpcompress.errors import UserError
from dpcompress.search.importance import (ImportanceSettings, allowed_segments, base_segments, check_importance_table,
                                   compute_importance, segment_plan)
from dpcompress.graph.rewrite import reference_model
from dpcompress.graph.trace import trace_model
from tests.digits_helpers import INPUT_SHAPE, INPUT_SHAPE_ARG, TINY_SPEC, digits16, save_trained_tiny, trained_tiny

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def traced():
    return trace_model(trained_tiny(), INPUT_SHAPE, spec=TINY_SPEC)


def _read(path: Path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _brute_force_segments(chain):
    ends = sorted({0, chain.num_positions, *chain.activation_positions})

    def splits(i, j):  # can (i, j) be cut into valid blocks?
        return chain.is_valid_block(i, j) or any(chain.is_valid_block(i, k) and splits(k, j) for k in range(i + 1, j))

    return [(i, j) for i, j in itertools.combinations(ends, 2) if splits(i, j)]


def test_allowed_segments_match_brute_force(traced):
    chain = traced.chain
    segments = allowed_segments(chain)
    assert segments == _brute_force_segments(chain)
    ends = [0, *chain.activation_positions, chain.num_positions]
    assert len(segments) == len(ends) * (len(ends) - 1) // 2  # the tiny model has no barrier in its trunk
    assert base_segments(chain, segments) == list(zip(ends[:-1], ends[1:]))


def test_segment_plan_removes_exactly_the_activations_inside(traced):
    chain = traced.chain
    first, last = chain.activation_positions[0], chain.activation_positions[-1]
    network = reference_model(traced, segment_plan(chain, (first, chain.num_positions)))
    # Independent construction: the same model with those activation modules swapped for identities.
    # In the zoo models conv `...N.0` has its activation at `...N.2`.
    expected = copy.deepcopy(traced.model)
    removed = [p for p in chain.activation_positions if p > first]
    assert removed and last in removed
    for position in removed:
        parent = expected.get_submodule(chain.unit(position).name.rsplit(".", 1)[0])
        parent[2] = torch.nn.Identity()
    x = torch.randn(4, *INPUT_SHAPE[1:])
    with torch.no_grad():
        assert torch.allclose(network(x), expected(x), atol=1e-5)
        assert not torch.allclose(network(x), traced.model(x), atol=1e-3)


def test_uniform_and_proxy_tables_cover_exactly_the_allowed_segments(traced, tmp_path):
    segments = allowed_segments(traced.chain)
    uniform = compute_importance(traced, ImportanceSettings(method="uniform"), tmp_path / "u.csv")
    assert [(r["start"], r["end"]) for r in uniform] == segments
    assert [(int(r["start"]), int(r["end"]), float(r["importance"])) for r in _read(tmp_path / "u.csv")] == \
        [(i, j, 1.0) for i, j in segments]

    rows = compute_importance(traced, ImportanceSettings(method="proxy"), tmp_path / "p.csv", data=digits16())
    table = {(int(r["start"]), int(r["end"])): r for r in _read(tmp_path / "p.csv")}
    assert sorted(table) == segments and sorted((r["start"], r["end"]) for r in rows) == segments
    base = set(base_segments(traced.chain, segments))
    for segment, row in table.items():
        kl = float(row["kl"])
        assert float(row["importance"]) == -kl
        if segment in base:  # nothing removed: the output does not change
            assert kl == pytest.approx(0.0, abs=1e-6) and float(row["cosine"]) == pytest.approx(1.0)
        else:
            assert kl > 1e-6
    meta = json.loads((tmp_path / "p.meta.json").read_text())
    assert meta["complete"] and meta["chain_fingerprint"] == traced.chain.fingerprint()
    assert not list(tmp_path.glob("*.partial-*"))


class Interrupt(Exception):
    pass


def test_finetune_importance_resumes_and_normalises(traced, tmp_path):
    settings = ImportanceSettings(method="finetune", steps=2, batch_size=32, alpha=0.5)
    data = digits16()
    seen = []

    def interrupt_after_three(line: str) -> None:
        seen.append(line)
        if len(seen) == 4:  # the summary line, then three segments
            raise Interrupt

    out = tmp_path / "resumed.csv"
    with pytest.raises(Interrupt):
        compute_importance(traced, settings, out, data=data, progress=interrupt_after_three)
    assert not out.exists()
    assert len(_read(tmp_path / "resumed.partial-0.csv")) == 3
    lines = []
    compute_importance(traced, settings, out, data=data, progress=lines.append)
    assert "3 done before" in lines[0]
    assert len(lines) == 1 + len(allowed_segments(traced.chain)) - 3
    straight = tmp_path / "straight.csv"
    compute_importance(traced, settings, straight, data=data)
    keys = ("start", "end", "importance", "removed_acc", "holdout_acc", "acc_change")
    assert [[r[k] for k in keys] for r in _read(out)] == [[r[k] for k in keys] for r in _read(straight)]

    # Normalisation, recomputed from the raw columns: change - alpha * mean change of the base segments.
    rows = _read(out)
    base = set(base_segments(traced.chain, allowed_segments(traced.chain)))
    base_changes = [float(r["acc_change"]) for r in rows if (int(r["start"]), int(r["end"])) in base]
    offset = 0.5 * sum(base_changes) / len(base_changes)
    for r in rows:
        assert float(r["importance"]) == pytest.approx(float(r["acc_change"]) - offset)
    # Removing every activation hurts more than the best base segment.
    L = traced.chain.num_positions
    whole = next(r for r in rows if (int(r["start"]), int(r["end"])) == (0, L))
    assert float(whole["removed_acc"]) < max(float(r["holdout_acc"]) for r in rows)


def test_leftover_rows_of_other_settings_are_a_user_error(traced, tmp_path):
    out = tmp_path / "i.csv"
    with pytest.raises(Interrupt):
        compute_importance(traced, ImportanceSettings(method="proxy"), out, data=digits16(),
                           progress=lambda line: (_ for _ in ()).throw(Interrupt) if "1/" in line else None)
    with pytest.raises(UserError, match="other settings"):
        compute_importance(traced, ImportanceSettings(method="proxy", seed=1), out, data=digits16())


def test_table_for_another_model_is_rejected(traced, tmp_path):
    out = tmp_path / "i.csv"
    compute_importance(traced, ImportanceSettings(method="uniform"), out)
    assert check_importance_table(out, traced.chain).importance[(0, traced.chain.num_positions)] == 1.0
    from dpcompress import zoo

    other = trace_model(zoo.tiny_mobilenet_v2(width=1.5), INPUT_SHAPE).chain
    with pytest.raises(UserError, match="another model"):
        check_importance_table(out, other)
    (tmp_path / "i.meta.json").unlink()  # without the meta file, the segments still give it away
    bigger = trace_model(zoo.digits_mobilenet_v2(), INPUT_SHAPE).chain
    out.write_text(out.read_text() + f"{bigger.num_positions - 1},{bigger.num_positions},1.0\n")
    with pytest.raises(UserError, match="another model"):
        check_importance_table(out, traced.chain)


def test_cli_bad_data_directory_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "i.csv"
    result = CliRunner().invoke(main, ["importance", "--model", TINY_SPEC, "--input-shape", INPUT_SHAPE_ARG,
                                       "--method", "finetune", "--data", f"imagefolder:{tmp_path / 'nope'}",
                                       "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "does not exist" in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []
    result = CliRunner().invoke(main, ["importance", "--model", TINY_SPEC, "--input-shape", INPUT_SHAPE_ARG,
                                       "--method", "finetune", "--out", str(out)])
    assert result.exit_code == 2 and "needs --data" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_two_process_torchrun_matches_single_process(tmp_path):
    weights = save_trained_tiny(tmp_path / "tiny.pt")
    args = ["importance", "--model", TINY_SPEC, "--weights", str(weights), "--input-shape", INPUT_SHAPE_ARG,
            "--method", "finetune", "--data", "digits", "--steps", "2", "--batch-size", "32", "--no-prune"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "dpcompress.cli", *args, "--out", str(tmp_path / "one.csv")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    torchrun = Path(sys.executable).with_name("torchrun")
    double = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2",
                             "-m", "dpcompress.cli", *args, "--out", str(tmp_path / "two.csv")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]
    assert "[rank 1]" in double.stderr  # the second process did measure segments
    keys = ("start", "end", "importance", "removed_acc", "holdout_acc", "acc_change")
    one, two = _read(tmp_path / "one.csv"), _read(tmp_path / "two.csv")
    assert len(one) == len(allowed_segments(trace_model(trained_tiny(), INPUT_SHAPE).chain))
    assert [[r[k] for k in keys] for r in one] == [[r[k] for k in keys] for r in two]
