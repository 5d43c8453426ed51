"""Profiler bounds: the best FLOP rate, dominance by any split, and the per-block time cap."""

from __future__ import annotations

import json
import math

import pytest

from dpcompress.backends import get_backend
from dpcompress.errors import UserError
from dpcompress.graph.chain import Chain
from dpcompress.graph.geometry import block_geometry
from dpcompress.latency.network_timing import packed_plan, time_networks
from dpcompress.latency.blocks import block_flops
from dpcompress.latency.profile import profile_table
from dpcompress.latency.timing import MIN_KEPT_FRACTION
from dpcompress.search.solver import solve_for_model
from dpcompress.tables import meta_path_for, read_latency_table
from tests.latency.helpers import (FLOPS_PER_MS, FlopBackend, OverheadBackend, RecordingBackend, mixed_chain,
                                   uniform_chain, unit)



def bottleneck_chain() -> Chain:
    """1x1 8->64, 1x1 64->8, 3x3, 3x3 at 8x8: block (0, 4) is a 5x5 8->8 conv, faster than its single convs
    but slower than (0, 2) (a 1x1 8->8) followed by the two 3x3 convs."""
    units = [unit(1, 8, 64, 8, kernel=1, activation=None), unit(2, 64, 8, 8, kernel=1, activation=None),
             unit(3, 8, 8, 8, activation=None), unit(4, 8, 8, 8)]
    return Chain(model="test:bottleneck", input_shape=(1, 8, 8, 8), units=units)


def flops_of(chain: Chain, row: dict) -> float:
    return block_flops(block_geometry(chain, row["start"], row["end"]), 1)


def test_a_block_slower_than_a_split_other_than_its_single_convs_is_bounded_not_timed(tmp_path):
    chain = bottleneck_chain()
    latency = {b: block_flops(block_geometry(chain, *b), 1) / FLOPS_PER_MS for b in chain.valid_blocks()}
    singles = sum(latency[(p - 1, p)] for p in range(1, 5))
    split = latency[(0, 2)] + latency[(2, 3)] + latency[(3, 4)]
    assert split < latency[(0, 4)] < singles  # only a split with a merged block shows (0, 4) dominated
    backend = FlopBackend()
    # At margin 1 the bound is the true latency here (every conv runs at the same rate).
    result = profile_table(chain, backend, tmp_path / "b.csv", warmup=0, iters=1, prune_margin=1.0)
    rows = {(r["start"], r["end"]): r for r in result.rows}
    assert rows[(0, 4)]["timed"] == 0 and rows[(0, 4)]["latency_ms"] == pytest.approx(latency[(0, 4)])
    assert (5, 5) not in backend.prepared  # (0, 4) and (2, 4), the two 5x5 blocks, were never built
    assert rows[(0, 2)]["timed"] == 1
    # The DP picks the same plans as with every block timed.
    full = profile_table(chain, FlopBackend(), tmp_path / "all.csv", warmup=0, iters=1, prune_margin=None)
    for budget in (split, singles):
        plans = [solve_for_model(read_latency_table(path), None, budget)[0] for path in (result.table_path,
                                                                                          full.table_path)]
        assert plans[0].boundaries == plans[1].boundaries and plans[0].activations == plans[1].activations


def test_the_best_rate_comes_only_from_rows_not_floored(tmp_path):
    # Overhead 10 ms per input channel: single convs on 8 or 16 channels lose most of their time to it and
    # some are floored at MIN_KEPT_FRACTION of their median, which would make them look many times faster.
    chain = mixed_chain()
    backend = OverheadBackend()
    result = profile_table(chain, backend, tmp_path / "o.csv", warmup=0, iters=1, max_block_seconds=1e-9)
    overhead = result.meta["call_overhead_ms"]
    timed = [r for r in result.rows if r["timed"]]

    def floored(row: dict) -> bool:
        o = overhead[f"1x{row['in_channels']}x{row['in_h']}x{row['in_w']}"]
        return row["latency_ms"] < o * MIN_KEPT_FRACTION / (1 - MIN_KEPT_FRACTION)

    real = [flops_of(chain, r) / r["latency_ms"] for r in timed if not floored(r)]
    fake = [flops_of(chain, r) / r["latency_ms"] for r in timed if floored(r)]
    assert real and fake and max(fake) > max(real)  # the floor would have set the rate
    capped = [r for r in result.rows if not r["timed"]]
    assert capped  # every merged block: the cap is almost zero, and each bound shows the fastest real rate
    for row in capped:
        assert row["latency_ms"] == pytest.approx(flops_of(chain, row) / (2.0 * max(real)))


def test_a_cap_near_zero_bounds_every_merged_block_and_times_every_single_conv(tmp_path):
    chain = uniform_chain(4)
    backend = RecordingBackend()
    result = profile_table(chain, backend, tmp_path / "u.csv", warmup=0, iters=1, prune_margin=None,
                           max_block_seconds=1e-9)
    assert backend.prepared and all(p.kernel == (3, 3) for p in backend.prepared)  # one shape: the single convs
    rows = {(r["start"], r["end"]): r for r in result.rows}
    merged = sorted(b for b in rows if b[1] - b[0] > 1)
    assert all(rows[b]["timed"] == 0 and math.isnan(rows[b]["std_ms"]) for b in merged)
    assert all(rows[(p - 1, p)]["timed"] == 1 for p in range(1, 5))
    # Every block runs at the same fake rate (kernel area x 8 ms per 2x8x8x8 x kernel area FLOPs): bound = half.
    assert all(rows[b]["latency_ms"] == pytest.approx((1 + 2 * (b[1] - b[0])) ** 2 * 8 / 2) for b in merged)
    meta = json.loads(meta_path_for(tmp_path / "u.csv").read_text())
    assert [tuple(b) for b in meta["capped_blocks"]] == merged and meta["bounded_blocks"] == 0
    assert meta["max_block_seconds"] == 1e-9 and "max_block_seconds" in meta["pruning"]


def test_a_block_whose_first_run_shows_it_over_the_cap_is_bounded_after_that_run(tmp_path):
    # 7x7 and larger kernels take 1000 s a run whatever their FLOPs: the bound alone cannot tell.
    chain = uniform_chain(4)
    backend = FlopBackend(slow_kernel=7, slow_ms=1e6)
    result = profile_table(chain, backend, tmp_path / "s.csv", warmup=2, iters=5, prune_margin=None,
                           max_block_seconds=100.0)
    rows = {(r["start"], r["end"]): r for r in result.rows}
    slow = [b for b in rows if b[1] - b[0] >= 3]
    assert sorted(backend.prepared) == [(3, 3), (5, 5), (7, 7), (9, 9)]  # each shape built once
    assert backend.runs == (2 + 5) + (1 + 2 + 5) + 1 + 1  # the 7x7 and 9x9 stopped after one run
    assert sorted(tuple(b) for b in result.meta["capped_blocks"]) == sorted(slow)
    for block in slow:
        assert rows[block]["timed"] == 0
        assert rows[block]["latency_ms"] == pytest.approx(flops_of(chain, rows[block]) / (2 * FLOPS_PER_MS))
    assert rows[(0, 2)]["timed"] == 1 and rows[(1, 3)]["latency_ms"] == pytest.approx(
        flops_of(chain, rows[(1, 3)]) / FLOPS_PER_MS)


def test_single_convs_are_timed_whatever_the_cap(tmp_path):
    chain = uniform_chain(2)
    backend = FlopBackend(slow_kernel=3, slow_ms=1e6)  # even the single convs take 1000 s a run
    result = profile_table(chain, backend, tmp_path / "s.csv", warmup=0, iters=1, prune_margin=None,
                           max_block_seconds=1.0)
    rows = {(r["start"], r["end"]): r for r in result.rows}
    assert rows[(0, 1)]["timed"] == rows[(1, 2)]["timed"] == 1 and rows[(0, 1)]["latency_ms"] == 1e6
    assert rows[(0, 2)]["timed"] == 0 and result.meta["capped_blocks"] == [[0, 2]]


def test_capped_blocks_survive_an_interrupted_run(tmp_path):
    chain = uniform_chain(4)
    reference = profile_table(chain, FlopBackend(slow_kernel=5), tmp_path / "r.csv", warmup=0, iters=1,
                              prune_margin=None, max_block_seconds=100.0)

    class Interrupted(FlopBackend):
        def prepare(self, module, input_shape, precision="fp32"):
            if module[0].kernel_size[0] == 7:
                raise KeyboardInterrupt  # after the 5x5 was capped
            return super().prepare(module, input_shape, precision)

    out = tmp_path / "t.csv"
    with pytest.raises(KeyboardInterrupt):
        profile_table(chain, Interrupted(slow_kernel=5), out, warmup=0, iters=1, prune_margin=None,
                      max_block_seconds=100.0)
    resumed = FlopBackend(slow_kernel=5)
    result = profile_table(chain, resumed, out, warmup=0, iters=1, prune_margin=None, max_block_seconds=100.0)
    assert (5, 5) not in resumed.prepared
    merged = [[s, e] for s, e in chain.valid_blocks() if e - s > 1]
    assert result.meta["capped_blocks"] == reference.meta["capped_blocks"] == sorted(merged)
    assert read_latency_table(out).latency_ms == read_latency_table(tmp_path / "r.csv").latency_ms


def test_the_cap_must_be_positive(tmp_path):
    with pytest.raises(UserError, match="--max-block-seconds"):
        profile_table(uniform_chain(2), RecordingBackend(), tmp_path / "t.csv", max_block_seconds=0)
    assert list(tmp_path.iterdir()) == []


def test_a_network_over_the_cap_is_dropped_after_one_run(tiny_traced):
    chain = tiny_traced.chain
    block = next(b for b in chain.valid_blocks() if b[1] - b[0] > 1)
    plans = [packed_plan(chain, [block])]
    geometries = {(*b, ()): block_geometry(chain, *b) for b in plans[0].blocks}
    backend = get_backend("onnxruntime", threads=1)
    assert time_networks(backend, tiny_traced, plans, geometries, (1, 3, 16, 16), "fp32", 1, 3, 0.0,
                         max_seconds=1e-9) == [None]
    [timing] = time_networks(backend, tiny_traced, plans, geometries, (1, 3, 16, 16), "fp32", 1, 3, 0.0)
    assert (*block, ()) in timing.blocks


def test_in_network_cap_near_zero_times_the_single_convs_and_bounds_the_rest(tiny_traced, tmp_path):
    chain = tiny_traced.chain
    result = profile_table(chain, get_backend("onnxruntime", threads=1), tmp_path / "t.csv", traced=tiny_traced,
                           warmup=1, iters=3, max_block_seconds=1e-9)
    rows = {(r["start"], r["end"]): r for r in result.rows}
    assert set(rows) == set(chain.valid_blocks()) and math.isfinite(result.meta["rest_ms"])
    assert all(r["timed"] == 1 for (s, e), r in rows.items() if e - s == 1)
    capped = {tuple(b) for b in result.meta["capped_blocks"]}
    assert capped and all(rows[b]["timed"] == 0 for b in capped)
    assert all(b[1] - b[0] > 1 for b in capped)
    assert all(r["timed"] == 0 for (s, e), r in rows.items() if e - s > 1)  # bounded as dominated, or capped
