"""Profiling with pruning options: one row per (block, option), each geometry timed once, identity
options free, resumable, and in-network timing of networks whose blocks prune convs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dpcompress.backends import get_backend
from dpcompress.graph.geometry import block_geometry, pruning_options
from dpcompress.latency.calibration import cover_blocks, plan_covers
from dpcompress.latency.network_timing import packed_network, packed_plan
from dpcompress.latency.blocks import block_module, block_shape
from dpcompress.latency.profile import profile_table
from dpcompress.latency.table_file import partial_paths
from dpcompress.search.solver import frontier, solve_for_model
from dpcompress.tables import ImportanceTable, meta_path_for, read_latency_table
from tests.cost_backend import CostBackend, conv_cost
from tests.latency.helpers import RecordingBackend, read_csv


def all_options(chain):
    return {(s, e, pruned) for s, e in chain.valid_blocks() for pruned in pruning_options(chain, s, e)}


def test_one_row_per_block_and_option_each_geometry_timed_once(tiny_traced, tmp_path):
    chain = tiny_traced.chain
    assert chain.reducible_positions()  # the test needs convs to prune
    counting = CountingCostBackend()
    out = tmp_path / "t.csv"
    result = profile_table(chain, counting, out, warmup=0, iters=1, prune_margin=None, timing="standalone",
                           prune=True)
    table = read_latency_table(out)
    options = all_options(chain)
    assert set(table.latency_ms) == set(chain.valid_blocks())
    assert {(s, e, p) for s, e, p in table.pruned_latency_ms} == {o for o in options if o[2]}
    geometries = {o: block_geometry(chain, *o) for o in options}
    shapes = {block_shape(g) for g in geometries.values() if not g.identity}
    assert len(counting.timed) == len(shapes) == result.meta["unique_shapes"]  # each geometry once
    identities = [o for o, g in geometries.items() if g.identity]
    assert identities and result.meta["identity_rows"] == len(identities)
    assert all(table.block_latency(*o) == 0.0 for o in identities)
    assert counting.timed.count(None) == 0  # no identity was ever built
    for option, geometry in geometries.items():
        if not geometry.identity:  # a row's latency is its own geometry's cost, so its shape was not mixed up
            expected = conv_cost(block_module(geometry), (1, *geometry.in_shape[1:]), lambda conv: 1.0)
            assert table.block_latency(*option) == pytest.approx(expected, abs=1e-6)
    meta = json.loads(meta_path_for(out).read_text())
    assert meta["prune"] is True and "identity" in meta["pruning_options"]
    assert meta["num_rows"] == len(options) and meta["num_blocks"] == len(chain.valid_blocks())


def test_without_pruning_the_table_is_as_before(tiny_traced, tmp_path):
    chain = tiny_traced.chain
    out = tmp_path / "t.csv"
    profile_table(chain, CostBackend(), out, warmup=0, iters=1, timing="standalone")
    assert "pruned" not in read_csv(out)[0]
    table = read_latency_table(out)
    assert set(table.latency_ms) == set(chain.valid_blocks()) and not table.pruned_latency_ms
    assert json.loads(meta_path_for(out).read_text())["prune"] is False


def test_the_solver_prunes_from_a_profiled_table(tiny_traced, tmp_path):
    chain = tiny_traced.chain
    out = tmp_path / "t.csv"
    profile_table(chain, CostBackend(), out, warmup=0, iters=1, timing="standalone", prune=True)
    table = read_latency_table(out)
    # Every segment priced, pruning a little dearer than not: the smallest latency needs pruning.
    from dpcompress.search.importance import allowed_segments
    from dpcompress.search.solver import pruned_sets

    importance = {}
    for s, e in allowed_segments(chain):
        for pruned in pruned_sets(table, s, e):
            importance[(s, e, pruned)] = 1.0 - 0.01 * len(pruned)
    importance_table = ImportanceTable({(s, e): v for (s, e, p), v in importance.items() if not p},
                                       pruned_importance={k: v for k, v in importance.items() if k[2]})
    smallest, _, plan = frontier(table, importance_table, chain.activation_positions)[0]
    unpruned = frontier(table, None, chain.activation_positions)[0][0]
    assert plan.pruned and smallest < unpruned
    solved, _ = solve_for_model(table, importance_table, smallest, chain=chain)
    assert solved.pruned == plan.pruned and solved.latency_ms == pytest.approx(smallest)


def test_resume_with_pruning_retimes_nothing(tiny_traced, tmp_path):
    chain = tiny_traced.chain
    out = tmp_path / "t.csv"
    reference = profile_table(chain, RecordingBackend(), tmp_path / "reference.csv", warmup=0, iters=1,
                              timing="standalone", prune=True)
    with pytest.raises(KeyboardInterrupt):
        profile_table(chain, RecordingBackend(fail_after=4), out, warmup=0, iters=1, timing="standalone",
                      prune=True)
    partial_table, _ = partial_paths(out)
    assert any(r["pruned"] for r in read_csv(partial_table))  # identity rows are written first
    second = RecordingBackend()
    result = profile_table(chain, second, out, warmup=0, iters=1, timing="standalone", prune=True)
    assert len(second.prepared) == reference.timed_shapes - 4
    assert read_csv(out) == read_csv(tmp_path / "reference.csv")
    assert result.resumed_blocks > 0
    from dpcompress.errors import UserError

    with pytest.raises(UserError, match="prune"):
        profile_table(chain, RecordingBackend(), out, warmup=0, iters=1, timing="standalone", prune=False)


def test_a_table_from_before_the_prune_setting_resumes_as_unpruned(tiny_traced, tmp_path):
    chain = tiny_traced.chain
    out = tmp_path / "t.csv"
    profile_table(chain, CostBackend(), out, warmup=0, iters=1, timing="standalone")
    meta = json.loads(meta_path_for(out).read_text())
    del meta["prune"]
    meta_path_for(out).write_text(json.dumps(meta))
    again = CountingCostBackend()
    profile_table(chain, again, out, warmup=0, iters=1, timing="standalone")
    assert again.timed == []


def test_a_packed_network_leaves_no_node_for_an_identity_block(tiny_traced):
    chain = tiny_traced.chain
    identity = next(o for o in sorted(all_options(chain)) if block_geometry(chain, *o).identity)
    pruned_conv = next(o for o in sorted(all_options(chain))
                       if o[2] and not block_geometry(chain, *o).identity
                       and (o[1] <= identity[0] or identity[1] <= o[0]))
    plan = packed_plan(chain, [identity[:2], pruned_conv[:2]], pruned=[*identity[2], *pruned_conv[2]])
    assert plan.pruned == sorted([*identity[2], *pruned_conv[2]])
    geometries = {(s, e, plan.pruned_in(s, e)): block_geometry(chain, s, e, plan.pruned_in(s, e))
                  for s, e in plan.blocks}
    network, names = packed_network(tiny_traced, plan, geometries)
    assert identity not in names.values() and pruned_conv in names.values()
    assert len(names) == len(plan.blocks) - 1
    assert sum(1 for m in network.modules() if isinstance(m, torch.nn.Conv2d)) == len(plan.blocks) - 1
    assert network(torch.randn(1, 3, 16, 16)).shape == (1, 10)


@pytest.mark.slow
def test_in_network_profile_with_pruning_has_every_option(tiny_traced, tmp_path):
    chain = tiny_traced.chain
    out = tmp_path / "t.csv"
    result = profile_table(chain, get_backend("onnxruntime", threads=1), out, traced=tiny_traced, warmup=1,
                           iters=3, prune=True)
    assert result.meta["timing"] == "in-network"
    table = read_latency_table(out)
    options = all_options(chain)
    assert set(table.pruned_latency_ms) == {o for o in options if o[2]}
    rows = {(r["start"], r["end"], tuple(int(p) for p in r["pruned"].split())): r for r in result.rows}
    for option in options:
        if block_geometry(chain, *option).identity:
            assert table.block_latency(*option) == 0.0
        elif rows[option]["timed"]:
            assert table.block_latency(*option) > 0
    # The plan networks the rest is fitted over are the cheapest cover by every timed row, pruned ones too:
    # pruned plans lie below any cover without pruning, and the fit must reach them.
    timed = {o: r["latency_ms"] for o, r in rows.items() if r["timed"]}
    covers = plan_covers(chain.num_positions, timed)
    assert covers and any(pruned for _, _, pruned in covers[0])
    sums = [math.fsum(timed[o] for o in cover_blocks(chain.num_positions, cover)) for cover in covers]
    assert result.meta["plan_networks"]
    for blocks_ms, *_ in result.meta["plan_networks"]:
        assert any(blocks_ms == pytest.approx(s, abs=1e-5) for s in sums)


class CountingCostBackend(CostBackend):
    """The cost backend, recording the kernel of every block it is asked to time."""

    def __init__(self) -> None:
        super().__init__()
        self.timed: list = []

    def prepare(self, module, input_shape, precision="fp32"):
        conv = next((m for m in module.modules() if isinstance(m, torch.nn.Conv2d)), None)
        self.timed.append(None if conv is None else tuple(conv.kernel_size))
        return super().prepare(module, input_shape, precision)
