"""The two-stage DP against brute force: every activation subset, every split of every segment.

Latencies and importances are multiples of 1/8 and 1/4 so that every sum is exact in
floating point and the solver's numbers can be compared with ``==``.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest

from dpcompress.errors import UserError
from dpcompress.search.solver import (
    frontier,
    solve,
    solve_with_frontier,
    stage1,
)
from dpcompress.tables import ImportanceTable, LatencyTable

Block = Tuple[int, int]


# ---- brute force, independent of the DP ----

def brute_split(latency: Dict[Block, float], i: int, j: int) -> Tuple[float, List[Block]]:
    """Cheapest split of (i, j) and its blocks: try every subset of inner cut points."""
    best, best_blocks = math.inf, []
    inner = range(i + 1, j)
    for r in range(len(inner) + 1):
        for cuts in itertools.combinations(inner, r):
            ends = [i, *cuts, j]
            blocks = list(zip(ends[:-1], ends[1:]))
            if all(b in latency for b in blocks):
                cost = math.fsum(latency[b] for b in blocks)
                if cost < best:
                    best, best_blocks = cost, blocks
    return best, best_blocks


def brute_split_cost(latency: Dict[Block, float], i: int, j: int) -> float:
    return brute_split(latency, i, j)[0]


def brute_plans(latency: Dict[Block, float], L: int, importance: Optional[Dict[Block, float]],
                allowed: Sequence[int]) -> List[Tuple[float, float, Tuple[int, ...]]]:
    """(latency, importance, activations) of every feasible plan; importance None means uniform."""
    best_split = {(i, j): brute_split(latency, i, j) for i in range(L) for j in range(i + 1, L + 1)}
    cost = {s: c for s, (c, _) in best_split.items()}
    plans = []
    for r in range(len(allowed) + 1):
        for kept in itertools.combinations(allowed, r):
            ends = [0, *kept, L]
            segments = list(zip(ends[:-1], ends[1:]))
            if any(not math.isfinite(cost[s]) for s in segments):
                continue
            if importance is None:
                value = float(len(segments))
            elif all(s in importance for s in segments):
                value = sum(importance[s] for s in segments)
            else:
                continue
            # The plan's exact latency: its blocks summed in one exact sum.
            blocks = [b for s in segments for b in best_split[s][1]]
            plans.append((math.fsum(latency[b] for b in blocks), value, kept))
    return plans


def brute_pareto(plans) -> List[Tuple[float, float]]:
    points = {(lat, imp) for lat, imp, _ in plans}
    return sorted(p for p in points
                  if not any(q != p and q[0] <= p[0] and q[1] >= p[1] for q in points))


# ---- random instances ----

def random_instance(rng: random.Random, L: int, with_importance: bool, restrict: bool):
    keep_block = rng.uniform(0.3, 0.9)
    max_span = rng.randint(1, L)
    latency = {(i, j): rng.randint(0, 60) / 8
               for i in range(L) for j in range(i + 1, min(L, i + max_span) + 1)
               if rng.random() < keep_block}
    if not latency:
        latency = {(0, L): 1.0}
    allowed = sorted(rng.sample(range(1, L), rng.randint(0, L - 1))) if restrict else list(range(1, L))
    importance = None
    if with_importance:
        ends = [0, *allowed, L]
        # Only rows the latency table can cover: the others are an error (tested below).
        importance = {(i, j): rng.randint(-12, 40) / 4
                      for i, j in itertools.combinations(ends, 2)
                      if rng.random() < 0.7 and math.isfinite(brute_split_cost(latency, i, j))}
    return latency, allowed, importance


def check_plan_numbers(plan, latency, importance, L):
    """A plan's own numbers, recomputed from its boundaries and activations."""
    blocks = list(zip(plan.boundaries[:-1], plan.boundaries[1:]))
    assert plan.boundaries[0] == 0 and plan.boundaries[-1] == L
    assert all(b in latency for b in blocks)
    assert set(plan.activations) <= set(plan.boundaries)
    assert sum(latency[b] for b in blocks) == plan.latency_ms
    ends = [0, *plan.activations, L]
    segments = list(zip(ends[:-1], ends[1:]))
    expected = float(len(segments)) if importance is None else sum(importance[s] for s in segments)
    assert plan.importance == expected


def test_stage1_matches_brute_force_splits():
    rng = random.Random(1)
    for _ in range(40):
        L = rng.randint(1, 9)
        latency, _, _ = random_instance(rng, L, False, False)
        s1 = stage1(latency, L)
        for i in range(L + 1):
            for j in range(i + 1, L + 1):
                expected = brute_split_cost(latency, i, j)
                assert s1.topt[i, j] == expected
                if math.isfinite(expected):
                    ends = [i, *s1.split_points(i, j), j]
                    assert sum(latency[b] for b in zip(ends[:-1], ends[1:])) == expected
            assert s1.topt[i, i] == 0


@pytest.mark.parametrize("with_importance", [False, True])
@pytest.mark.parametrize("restrict", [False, True])
def test_solver_matches_brute_force(with_importance, restrict):
    rng = random.Random(hash((with_importance, restrict)) % 1000)
    solved = 0
    for _ in range(60):
        L = rng.randint(1, 10)
        latency, allowed, importance = random_instance(rng, L, with_importance, restrict)
        table = LatencyTable(L, latency)
        imp_table = None if importance is None else ImportanceTable(importance)
        plans = brute_plans(latency, L, importance, allowed)
        if not plans:
            with pytest.raises(UserError):
                frontier(table, imp_table, allowed)
            continue
        solved += 1
        # The frontier: exactly the Pareto set of all plans, each point's plan achieving it.
        points = frontier(table, imp_table, allowed)
        assert [(lat, imp) for lat, imp, _ in points] == brute_pareto(plans)
        for lat, imp, plan in points:
            check_plan_numbers(plan, latency, importance, L)
            assert set(plan.activations) <= set(allowed)
        # Many budgets: below, at and between every plan's latency.
        latencies = sorted({lat for lat, _, _ in plans})
        budgets = [latencies[0] - 0.125, *latencies, *[x + 0.0625 for x in latencies], latencies[-1] * 2 + 1]
        for budget in budgets:
            within = [p for p in plans if p[0] <= budget]
            if not within:
                with pytest.raises(UserError, match="smallest achievable latency"):
                    solve(table, imp_table, budget, allowed)
                continue
            best_importance = max(imp for _, imp, _ in within)
            fastest = min(lat for lat, imp, _ in within if imp == best_importance)
            plan = solve(table, imp_table, budget, allowed)
            assert plan.latency_ms <= budget
            assert plan.importance == best_importance
            assert plan.latency_ms == fastest  # ties in importance: the faster plan
            check_plan_numbers(plan, latency, importance, L)
            # The full-frontier path picks an equally good plan.
            full_plan, _ = solve_with_frontier(table, imp_table, budget, allowed)
            assert (full_plan.latency_ms, full_plan.importance) == (plan.latency_ms, plan.importance)
    assert solved > 30


def test_real_valued_latencies_never_exceed_budget():
    rng = random.Random(7)
    for _ in range(30):
        L = rng.randint(2, 9)
        latency = {(i, j): rng.uniform(0.01, 3.0) for i in range(L) for j in range(i + 1, L + 1)
                   if j == i + 1 or rng.random() < 0.5}
        importance = {(i, j): rng.gauss(0, 1) for i in range(L) for j in range(i + 1, L + 1)
                      if j == i + 1 or rng.random() < 0.6}
        plans = brute_plans(latency, L, importance, list(range(1, L)))
        table, imp_table = LatencyTable(L, latency), ImportanceTable(importance)
        for lat, _, _ in plans:
            plan = solve(table, imp_table, lat)  # a budget exactly at a plan's latency
            assert plan.latency_ms <= lat
            blocks = zip(plan.boundaries[:-1], plan.boundaries[1:])
            assert plan.latency_ms == math.fsum(latency[b] for b in blocks)
            best = max(imp for plat, imp, _ in plans if plat <= lat)
            assert plan.importance == pytest.approx(best, abs=1e-9)


def test_uniform_importance_keeps_most_activations():
    # Merging (0, 2) is cheap; keeping activation 1 costs 3 ms more.
    latency = {(0, 1): 2.0, (1, 2): 2.0, (0, 2): 1.0}
    table = LatencyTable(2, latency)
    assert solve(table, None, 4.0).activations == [1]
    assert solve(table, None, 3.99).activations == []
    plan = solve(table, None, 3.99)
    assert plan.boundaries == [0, 2] and plan.latency_ms == 1.0 and plan.importance == 1.0
    assert plan.original_latency_ms == 4.0


def test_boundaries_are_the_union_of_stage1_splits():
    # One segment (0, 4) whose cheapest split is (0,2),(2,4); activation at 2 would cost more.
    latency = {(0, 1): 1.0, (1, 2): 1.0, (2, 3): 1.0, (3, 4): 1.0, (0, 2): 0.5, (2, 4): 0.5, (0, 4): 5.0}
    importance = {(0, 4): 1.0, (0, 2): 0.1, (2, 4): 0.1}
    plan = solve(LatencyTable(4, latency), ImportanceTable(importance), 1.0)
    assert plan.activations == [] and plan.boundaries == [0, 2, 4] and plan.latency_ms == 1.0


def test_no_path_from_0_to_L_is_a_user_error():
    table = LatencyTable(3, {(0, 1): 1.0, (2, 3): 1.0})
    with pytest.raises(UserError, match="no chain of blocks runs from position 0 to 3"):
        solve(table, None, 10.0)


def test_importance_row_the_latency_table_cannot_cover():
    # Nothing starts at position 1, so no segment can start there.
    table = LatencyTable(3, {(0, 1): 1.0, (0, 2): 1.0, (2, 3): 1.0, (0, 3): 1.0})
    with pytest.raises(UserError, match=r"segment \(1, 3\) cannot be split"):
        solve(table, ImportanceTable({(0, 1): 1.0, (1, 3): 1.0, (0, 3): 0.5}), 10.0)
    with pytest.raises(UserError, match="ends past"):
        solve(table, ImportanceTable({(0, 3): 1.0, (3, 4): 1.0}), 10.0)


def test_importance_rows_must_end_at_allowed_positions():
    table = LatencyTable(3, {(0, 1): 1.0, (1, 2): 1.0, (2, 3): 1.0})
    with pytest.raises(UserError, match="position 1, which holds no removable activation"):
        solve(table, ImportanceTable({(0, 1): 1.0, (1, 3): 1.0, (0, 3): 1.0}), 10.0, allowed_positions=[2])


def test_importance_segments_that_do_not_connect():
    table = LatencyTable(3, {(0, 1): 1.0, (1, 2): 1.0, (2, 3): 1.0})
    with pytest.raises(UserError, match="no sequence of allowed segments"):
        solve(table, ImportanceTable({(0, 1): 1.0, (2, 3): 1.0}), 10.0)


def test_infeasible_budget_states_the_smallest_latency():
    table = LatencyTable(2, {(0, 1): 2.0, (1, 2): 2.0, (0, 2): 1.5})
    with pytest.raises(UserError, match="smallest achievable latency 1.5 ms"):
        solve(table, None, 1.0)


def test_frontier_with_many_plans_stays_sorted_and_non_dominated():
    rng = np.random.default_rng(3)
    L = 40
    latency = {(i, j): float(rng.uniform(0.1, 1.0) * (j - i) ** 0.7)
               for i in range(L) for j in range(i + 1, min(L, i + 6) + 1)}
    importance = {(i, j): float(rng.normal()) for i in range(L) for j in range(i + 1, min(L, i + 8) + 1)}
    points = frontier(LatencyTable(L, latency), ImportanceTable(importance))
    lats = [p[0] for p in points]
    imps = [p[1] for p in points]
    assert len(points) > 10
    assert all(a < b for a, b in zip(lats, lats[1:]))
    assert all(a < b for a, b in zip(imps, imps[1:]))
    for lat, imp, plan in points:
        assert plan.latency_ms == lat
        blocks = list(zip(plan.boundaries[:-1], plan.boundaries[1:]))
        assert sum(latency[b] for b in blocks) == pytest.approx(lat, rel=1e-12)


def test_budget_typed_back_from_the_smallest_latency_gets_a_plan():
    # Latencies whose sums depend on the order of addition: the smallest latency printed in the
    # error, typed back as the budget, must be accepted.
    rng = random.Random(3)
    L = 12
    rows = {(i, j): rng.uniform(0.1, 3.0) / 3.0 for i in range(L) for j in range(i + 1, min(L, i + 4) + 1)}
    table = LatencyTable(num_positions=L, latency_ms=rows, meta={"rest_ms": 0.7})
    with pytest.raises(UserError) as info:
        solve(table, None, 0.001)
    printed = float(str(info.value).split("smallest achievable latency ")[1].split(" ms")[0])
    plan = solve(table, None, printed)
    assert plan.latency_ms == pytest.approx(printed, rel=1e-9)


def test_rest_is_added_to_every_plan_and_taken_off_the_budget():
    rows = {(0, 1): 1.0, (1, 2): 1.0, (0, 2): 1.5}
    with_rest = LatencyTable(num_positions=2, latency_ms=rows, meta={"rest_ms": 2.0})
    assert with_rest.original_latency_ms() == 4.0
    plan = solve(with_rest, None, 3.6)  # 3.6 - 2.0 leaves 1.6 for the blocks: only the merged one fits
    assert plan.boundaries == [0, 2] and plan.latency_ms == 3.5 and plan.original_latency_ms == 4.0
    with pytest.raises(UserError, match="smallest achievable latency 3.5 ms"):
        solve(with_rest, None, 3.4)
    without = LatencyTable(num_positions=2, latency_ms=rows, meta={"rest_ms": "n/a"})
    assert without.rest_ms == 0.0 and solve(without, None, 1.6).latency_ms == 1.5
