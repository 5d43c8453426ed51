"""The closed loop, on a deterministic backend whose 'latency' is a cost model of the network's convs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dpcompress import zoo
from dpcompress.search.closed_loop import MAX_STEPS, Candidate, candidate_plans, measure_candidates
from dpcompress.graph.geometry import block_geometry
from dpcompress.latency.network_timing import geometry_conv
from dpcompress.graph.rewrite import merged_model
from dpcompress.search.solver import solve_for_model
from dpcompress.tables import LatencyTable
from dpcompress.graph.trace import trace_model
from tests.cost_backend import CostBackend, conv_cost

SHAPE = (1, 3, 16, 16)
@pytest.fixture(scope="module")
def traced():
    torch.manual_seed(0)
    return trace_model(zoo.tiny_mobilenet_v2().eval(), SHAPE, spec="dpcompress.zoo:tiny_mobilenet_v2")


@pytest.fixture(scope="module")
def exact_table(traced):
    """Each block's row is its merged conv's cost alone: exact for CostBackend() (no rest: only convs count)."""
    chain = traced.chain
    rows = {}
    for block in chain.valid_blocks():
        geometry = block_geometry(chain, *block)
        rows[block] = conv_cost(geometry_conv(geometry), geometry.in_shape, lambda conv: 1.0)
    return LatencyTable(num_positions=chain.num_positions, latency_ms=rows)


def frontier_for(table, traced, ratio):
    budget = ratio * table.original_latency_ms()
    plan, frontier = solve_for_model(table, None, budget, chain=traced.chain, with_frontier=True)
    return plan, frontier, budget


def test_candidates_are_the_most_important_plans_near_the_budget(exact_table, traced):
    plan, frontier, budget = frontier_for(exact_table, traced, 0.85)
    chosen = candidate_plans(frontier, budget, count=3)
    assert chosen[0].importance >= chosen[-1].importance and len(chosen) == 3
    assert all(p.latency_ms <= budget * 1.05 for p in chosen)
    within = [p for p in frontier if p.latency_ms <= budget]
    assert max(p.importance for p in within) == plan.importance
    assert chosen[0].activations == plan.activations or chosen[0].importance > plan.importance


def test_loop_keeps_the_most_important_plan_measured_within_the_budget(exact_table, traced):
    plan, frontier, budget = frontier_for(exact_table, traced, 0.85)
    result = measure_candidates(CostBackend(), traced, frontier, budget, input_shape=SHAPE, count=3)
    assert not result.kept_original and result.met_budget and result.steps == 1
    assert result.budget_ratio == pytest.approx(0.85)
    chosen = [c for c in result.candidates if c.chosen]
    assert len(chosen) == 1 and chosen[0].plan.boundaries == result.plan.boundaries
    assert result.plan.budget_ms == budget
    # The cost backend measures exactly what the table predicts: the solver's plan is the answer.
    assert result.plan.activations == plan.activations and result.plan.boundaries == plan.boundaries
    original_cost = conv_cost(traced.gm, SHAPE, lambda c: 1.0)
    merged_cost = conv_cost(merged_model(traced, result.plan), SHAPE, lambda c: 1.0)
    assert chosen[0].measured_speedup == pytest.approx(original_cost / merged_cost)
    assert chosen[0].measured_speedup >= 1 / 0.85
    for candidate in result.candidates:
        assert candidate.measured_ms == pytest.approx(candidate.predicted_ms, rel=1e-6)
        assert candidate.measured_speedup == pytest.approx(1 / candidate.predicted_ratio, rel=1e-6)
        record = candidate.to_json()
        assert {"predicted_ms", "measured_ms", "measured_budget_ms", "within_budget", "within_noise", "chosen",
                "step", "measured_speedup_interval"} <= set(record)
    assert json.dumps(result.to_json())


def test_loop_falls_back_to_a_less_important_plan_when_the_best_is_slow_as_measured(exact_table, traced):
    plan, frontier, budget = frontier_for(exact_table, traced, 0.85)
    slow_kernel = max(block_geometry(traced.chain, *b).kernel[0] for b in plan.blocks)
    assert slow_kernel > 1
    # Dense convs with the solver's plan's largest kernel run 3x slower than the table says.
    backend = CostBackend(lambda conv: 3.0 if conv.kernel_size[0] == slow_kernel and conv.groups == 1 else 1.0)
    result = measure_candidates(backend, traced, frontier, budget, input_shape=SHAPE, count=5)
    first = result.candidates[0]
    assert not first.within_budget and not first.chosen
    chosen = next(c for c in result.candidates if c.chosen)
    assert chosen.within_budget and chosen.faster and chosen.plan.importance <= first.plan.importance
    assert result.met_budget and "within the budget" in result.reason


def test_loop_keeps_the_original_only_when_no_plan_is_measured_faster(exact_table, traced):
    plan, frontier, budget = frontier_for(exact_table, traced, 0.8)
    # Every merged conv (dense, kernel > 1) is measured 50x slower than the table says.
    backend = CostBackend(lambda conv: 50.0 if conv.groups == 1 and conv.kernel_size[0] > 1 else 1.0)
    result = measure_candidates(backend, traced, frontier, budget, input_shape=SHAPE, count=3)
    assert result.kept_original and not result.met_budget and "kept the original" in result.reason
    assert "faster than the original" in result.reason and not any(c.chosen for c in result.candidates)
    assert result.steps >= 2 and len(result.candidates) >= 3  # it went down the frontier before giving up
    L = traced.chain.num_positions
    assert result.plan.boundaries == list(range(L + 1))
    assert result.plan.activations == [p for p in traced.chain.activation_positions if p < L]
    # The plan that merges nothing is the original network.
    x = torch.randn(*SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(merged_model(traced, result.plan)(x), traced.gm(x), rtol=1e-4, atol=1e-5)


def optimistic_bench(optimism):
    """A stand-in for ``bench_candidate``: every plan measures ``optimism`` times its predicted ratio."""
    def bench(backend, original, traced, plan, budget_ratio, step, **settings):
        ratio = optimism * plan.latency_ms / plan.original_latency_ms
        return Candidate(plan=plan, predicted_ms=plan.latency_ms, step=step, measured_speedup=1 / ratio,
                         interval=(0.98 / ratio, 1.02 / ratio), measured_ms=ratio, measured_original_ms=1.0,
                         budget_speedup=1 / budget_ratio, within_budget=1 / ratio >= 1 / budget_ratio,
                         faster=0.98 / ratio > 1)
    return bench


def test_loop_steps_down_the_frontier_until_a_plan_measures_within_the_budget(exact_table, traced, monkeypatch):
    monkeypatch.setattr("dpcompress.search.closed_loop.bench_candidate", optimistic_bench(1.15))
    plan, frontier, budget = frontier_for(exact_table, traced, 0.8)
    lines = []
    result = measure_candidates(CostBackend(), traced, frontier, budget, input_shape=SHAPE, count=2, say=lines.append)
    assert result.met_budget and not result.kept_original and result.steps >= 2
    chosen = next(c for c in result.candidates if c.chosen)
    assert chosen.measured_speedup >= 1 / 0.8 and chosen.step == result.steps
    for earlier, later in zip(result.candidates, result.candidates[1:]):
        if later.step > earlier.step:  # each step benches plans predicted below every plan benched before
            assert later.predicted_ms < min(c.predicted_ms for c in result.candidates if c.step < later.step)
    assert all(not c.within_budget for c in result.candidates if c.step < result.steps)
    assert any("step 2:" in str(line) for line in lines)
    # A table too optimistic for any plan on the frontier to meet the budget: the fastest is kept, said plainly.
    cheapest = min(p.latency_ms / p.original_latency_ms for p in frontier)
    monkeypatch.setattr("dpcompress.search.closed_loop.bench_candidate", optimistic_bench(0.9 / cheapest))
    result = measure_candidates(CostBackend(), traced, frontier, budget, input_shape=SHAPE, count=2)
    fastest = max(result.candidates, key=lambda c: c.measured_speedup)
    assert not result.met_budget and not result.kept_original and fastest.chosen and fastest.faster
    assert "no plan measured within the budget" in result.reason and f"{fastest.measured_ratio:.3f}" in result.reason
    assert result.steps <= MAX_STEPS


def test_bench_json_is_json_alone_on_stdout(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dpcompress.cli", "bench", "--model", "dpcompress.zoo:tiny_mobilenet_v2",
         "--input-shape", "1,3,16,16", "--threads", "1", "--rounds", "2", "--iters", "3",
         "--ci", "0.5", "--max-rounds", "4", "--json"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["original"]["ci_low_ms"] <= record["original"]["median_ms"] <= record["original"]["ci_high_ms"]
    assert 2 <= record["rounds"] <= 4 and "backend" in result.stderr


def test_solve_measure_writes_the_chosen_plan_and_needs_a_model(exact_table, traced, tmp_path):
    from dpcompress.tables import write_latency_table

    table = tmp_path / "t.csv"
    write_latency_table(table, [{"start": s, "end": e, "latency_ms": ms} for (s, e), ms in exact_table.latency_ms.items()])
    common = [sys.executable, "-m", "dpcompress.cli", "solve", "--latency-table", str(table), "--budget-ratio", "0.9",
              "--out", str(tmp_path / "plan.json")]
    refused = subprocess.run(common + ["--measure"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--measure" in refused.stderr and not (tmp_path / "plan.json").exists()
    done = subprocess.run(common + ["--measure", "--model", "dpcompress.zoo:tiny_mobilenet_v2", "--input-shape",
                                    "1,3,16,16", "--threads", "1", "--candidates", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "candidate 1/2" in done.stderr and "candidate 2/2" in done.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["boundaries"][0] == 0 and plan["boundaries"][-1] == traced.chain.num_positions
