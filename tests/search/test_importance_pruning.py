"""Importance with pruning options: which (segment, pruned set) rows there are, how each method
prices them, and that the solver can use them with a profiled table."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import pytest
from click.testing import CliRunner

from dpcompress.graph.geometry import pruning_options
from dpcompress.graph.trace import trace_model
from dpcompress.latency.profile import profile_table
from dpcompress.search.importance import (ImportanceSettings, allowed_segments, compute_importance, normalise,
                                          segment_options, segment_pruning_options)
from dpcompress.cli import main
from dpcompress.errors import UserError
from dpcompress.search.solver import frontier, pruned_sets, solve_for_model, uniform_importance
from dpcompress.tables import read_importance_table, read_latency_table
from tests.cost_backend import CostBackend
from tests.digits_helpers import INPUT_SHAPE, TINY_SPEC, trained_tiny


@pytest.fixture(scope="module")
def traced():
    return trace_model(trained_tiny(), INPUT_SHAPE, spec=TINY_SPEC)


@pytest.fixture(scope="module")
def latency_table(traced, tmp_path_factory):
    out = tmp_path_factory.mktemp("latency") / "t.csv"
    profile_table(traced.chain, CostBackend(), out, warmup=0, iters=1, timing="standalone", prune=True)
    return read_latency_table(out)


def _read(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_segment_that_is_a_block_has_its_options_and_every_row_is_reachable(traced, latency_table):
    chain = traced.chain
    segments = allowed_segments(chain)
    assert any(not chain.is_valid_block(*s) for s in segments) and any(chain.is_valid_block(*s) for s in segments)
    for start, end in segments:
        options = segment_pruning_options(chain, (start, end))
        assert options[0] == () and len(set(options)) == len(options)
        if chain.is_valid_block(start, end):
            assert options == pruning_options(chain, start, end)
        # Every row is a pruned set some split of the segment reaches in the latency table.
        assert set(options) <= set(pruned_sets(latency_table, start, end))
    # A segment that is no block still gets the options of the blocks on its splits.
    split_only = next(s for s in segments if not chain.is_valid_block(*s) and len(segment_pruning_options(chain, s)) > 1)
    assert split_only


def test_uniform_prices_a_pruned_conv_like_a_removed_activation(traced, tmp_path):
    out = tmp_path / "u.csv"
    rows = compute_importance(traced, ImportanceSettings(method="uniform", prune=True), out)
    options = segment_options(traced.chain, prune=True)
    assert sorted((r["start"], r["end"], tuple(map(int, r["pruned"].split()))) for r in rows) == sorted(options)
    table = read_importance_table(out)
    assert table.pruned_importance and all(v == 1.0 for v in table.importance.values())
    assert all(v == 1.0 - len(pruned) for (_, _, pruned), v in table.pruned_importance.items())
    assert json.loads((tmp_path / "u.meta.json").read_text())["settings"]["prune"] is True
    plain = tmp_path / "plain.csv"
    compute_importance(traced, ImportanceSettings(method="uniform"), plain)
    assert "pruned" not in _read(plain)[0] and not read_importance_table(plain).pruned_importance


def test_proxy_measures_pruned_rows_with_the_convs_pruned(traced, tmp_path):
    out = tmp_path / "p.csv"
    compute_importance(traced, ImportanceSettings(method="proxy", prune=True), out)
    rows = {(int(r["start"]), int(r["end"]), r["pruned"]): r for r in _read(out)}
    base_rows = {"unpruned": 0, "pruned": 0}
    for (start, end, pruned), row in rows.items():
        assert float(row["importance"]) == -float(row["kl"])
        base = not any(start < p < end for p in traced.chain.activation_positions)
        if base and not pruned:
            assert float(row["kl"]) == pytest.approx(0.0, abs=1e-6)
        elif base:  # only the pruning changes the output
            assert float(row["kl"]) > 1e-6
        if base:
            base_rows["pruned" if pruned else "unpruned"] += 1
    assert base_rows["unpruned"] > 0 and base_rows["pruned"] > 0, base_rows


def test_finetune_offset_comes_from_the_unpruned_base_segments(traced):
    chain = traced.chain
    base = [s for s in allowed_segments(chain) if not any(s[0] < p < s[1] for p in chain.activation_positions)]
    rows = [{"start": s, "end": e, "pruned": "", "acc_change": -0.01 * index} for index, (s, e) in enumerate(base)]
    pruned_base = next(o for o in segment_options(chain, True) if o[2] and (o[0], o[1]) in base)
    rows.append({"start": pruned_base[0], "end": pruned_base[1], "pruned": " ".join(map(str, pruned_base[2])),
                 "acc_change": -0.5})
    offset = 0.5 * sum(-0.01 * index for index in range(len(base))) / len(base)
    table = normalise(rows, chain, ImportanceSettings(method="finetune", alpha=0.5, prune=True))
    for row in table:
        assert row["importance"] == pytest.approx(row["acc_change"] - offset)


def test_the_solver_prunes_with_uniform_pruning_importance(traced, latency_table, tmp_path):
    out = tmp_path / "u.csv"
    compute_importance(traced, ImportanceSettings(method="uniform", prune=True), out)
    importance = read_importance_table(out)
    positions = traced.chain.activation_positions
    with_pruning = frontier(latency_table, importance, positions)
    without = frontier(latency_table, None, positions)
    assert with_pruning[0][0] < without[0][0] and with_pruning[0][2].pruned  # a smaller latency, by pruning
    # At the original latency nothing needs removing: the best plan is the original, unpruned.
    assert not with_pruning[-1][2].pruned and with_pruning[-1][1] == without[-1][1]


def test_importance_cli_prunes_by_default_where_convs_are_reducible(tmp_path):
    from dpcompress.cli import main

    args = ["importance", "--model", TINY_SPEC, "--input-shape", "1,3,16,16", "--method", "uniform"]
    default = CliRunner().invoke(main, args + ["--out", str(tmp_path / "d.csv")])
    assert default.exit_code == 0, default.output
    assert any(r["pruned"] for r in _read(tmp_path / "d.csv"))
    off = CliRunner().invoke(main, args + ["--out", str(tmp_path / "n.csv"), "--no-prune"])
    assert off.exit_code == 0, off.output
    assert "pruned" not in _read(tmp_path / "n.csv")[0]


def test_solve_without_importance_prices_the_tables_options_as_uniform_importance_does(traced, latency_table,
                                                                                        tmp_path):
    """A profile with pruning options, then solve with no importance table: the options are searched, priced as
    `importance --method uniform` prices them from the chain (one conv pruned costs as one activation removed)."""
    out = tmp_path / "u.csv"
    compute_importance(traced, ImportanceSettings(method="uniform", prune=True), out)
    from_chain = read_importance_table(out)
    derived = uniform_importance(latency_table, traced.chain.activation_positions)
    assert derived.importance == from_chain.importance and derived.pruned_importance == from_chain.pruned_importance
    assert uniform_importance(replace(latency_table, pruned_latency_ms={})) is None  # nothing to price
    unpruned = replace(latency_table, pruned_latency_ms={})
    smallest_unpruned = frontier(unpruned, None, traced.chain.activation_positions)[0][0]
    pruned_any = 0
    original = latency_table.original_latency_ms()
    for budget in (0.9 * original, 0.7 * original, 0.99 * smallest_unpruned, 0.9 * smallest_unpruned):
        try:
            expected, _ = solve_for_model(latency_table, from_chain, budget, traced.chain)
        except UserError:
            with pytest.raises(UserError):
                solve_for_model(latency_table, None, budget, traced.chain)
            continue
        plan, _ = solve_for_model(latency_table, None, budget, traced.chain)
        assert (plan.activations, plan.boundaries, plan.pruned) == (expected.activations, expected.boundaries,
                                                                    expected.pruned)
        pruned_any += bool(plan.pruned) and budget < smallest_unpruned
    assert pruned_any  # a budget below what merging alone reaches, met by pruning
    # The CLI's plain path: the profile's table, then solve with no importance (segment ends from its meta).
    table_path = tmp_path / "t.csv"
    profile_table(traced.chain, CostBackend(), table_path, warmup=0, iters=1, timing="standalone", prune=True)
    ratio = 0.99 * smallest_unpruned / latency_table.original_latency_ms()
    result = CliRunner().invoke(main, ["solve", "--latency-table", str(table_path), "--budget-ratio", f"{ratio:.6f}",
                                       "--out", str(tmp_path / "plan.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "plan.json").read_text())["pruned"]


def test_the_frontier_plot_shows_merging_alone_beside_merging_and_pruning(traced, latency_table, tmp_path):
    from dpcompress.search.frontier_plot import plot_frontier
    from dpcompress.search.solver import merge_only_frontier

    chain = traced.chain
    merge_only = merge_only_frontier(latency_table, None, chain)
    unpruned = replace(latency_table, pruned_latency_ms={})
    expected = frontier(unpruned, None, chain.activation_positions)
    assert [(p.latency_ms, p.importance, p.boundaries) for p in merge_only] == [
        (lat, imp, p.boundaries) for lat, imp, p in expected]
    assert not any(p.pruned for p in merge_only)
    _, both = solve_for_model(latency_table, None, latency_table.original_latency_ms(), chain, with_frontier=True)
    assert min(p.latency_ms for p in both) < min(p.latency_ms for p in merge_only)  # what pruning buys
    plot_frontier(tmp_path / "f.png", both, merge_only=merge_only)
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
