"""The DP with pruning options against brute force: every kept activation set, every set of block
boundaries and every option of every block.

A plan's segment prunes the union of its blocks' options, and is allowed only where the importance
table has a row for that (segment, pruned set); without an importance table nothing is pruned.
Latencies and importances are multiples of 1/8 and 1/4, so every sum is exact and numbers compare
with ``==``.
"""

from __future__ import annotations

import itertools
import random
from typing import Dict, List, Optional, Sequence, Tuple

import pytest

from dpcompress.errors import UserError
from dpcompress.search.solver import frontier, pruned_sets, solve, solve_with_frontier, write_frontier_csv
from dpcompress.tables import ImportanceTable, LatencyTable
from tests.pruning_instances import Row, random_instance, splits, union, unpruned_cover

# ---- brute force, independent of the DP (with the splits and unions of tests.pruning_instances) ----

def brute_plans(latency: Dict[Row, float], L: int, importance: Optional[Dict[Row, float]],
                allowed: Sequence[int]) -> List[Tuple[float, float, Tuple[int, ...], Tuple[int, ...]]]:
    """(latency, importance, activations, pruned) of every allowed plan; importance None: uniform."""
    by_segment = {(i, j): list(splits(latency, i, j)) for i in range(L) for j in range(i + 1, L + 1)}
    plans = []
    for r in range(len(allowed) + 1):
        for kept in itertools.combinations(allowed, r):
            ends = [0, *kept, L]
            segments = list(zip(ends[:-1], ends[1:]))
            for chosen in itertools.product(*(by_segment[s] for s in segments)):
                values = []
                for (i, j), rows in zip(segments, chosen):
                    pruned = union(rows)
                    if importance is None:
                        values.append(1.0 if not pruned else None)
                    else:
                        values.append(importance.get((i, j, pruned)))
                if None in values:
                    continue
                rows = [row for rows in chosen for row in rows]
                plans.append((sum(latency[row] for row in rows), sum(values), kept, union(rows)))
    return plans


def brute_pareto(plans) -> List[Tuple[float, float]]:
    points = {(lat, imp) for lat, imp, _, _ in plans}
    return sorted(p for p in points if not any(q != p and q[0] <= p[0] and q[1] >= p[1] for q in points))


def tables(L, latency, importance):
    table = LatencyTable(L, {(i, j): v for (i, j, p), v in latency.items() if not p},
                         pruned_latency_ms={row: v for row, v in latency.items() if row[2]})
    if importance is None:
        return table, None
    return table, ImportanceTable({(i, j): v for (i, j, p), v in importance.items() if not p},
                                  pruned_importance={row: v for row, v in importance.items() if row[2]})


def check_plan_numbers(plan, latency, importance, L):
    """A plan's own numbers, recomputed from its boundaries, activations and pruned convs."""
    assert plan.boundaries[0] == 0 and plan.boundaries[-1] == L
    assert set(plan.activations) <= set(plan.boundaries)
    rows = [(i, j, plan.pruned_in(i, j)) for i, j in plan.blocks]
    assert all(row in latency for row in rows)
    assert sum(latency[row] for row in rows) == plan.latency_ms
    if importance is None:
        assert plan.pruned == [] and plan.importance == len(plan.segments)
    else:
        assert plan.importance == sum(importance[(i, j, plan.pruned_in(i, j))] for i, j in plan.segments)


@pytest.mark.parametrize("with_importance", [False, True])
@pytest.mark.parametrize("restrict", [False, True])
def test_solver_with_options_matches_brute_force(with_importance, restrict):
    rng = random.Random(100 + 2 * with_importance + restrict)
    solved = pruning = 0
    for _ in range(50):
        L = rng.randint(1, 6)
        latency, allowed, importance = random_instance(rng, L, with_importance, restrict)
        table, importance_table = tables(L, latency, importance)
        plans = brute_plans(latency, L, importance, allowed)
        if not plans or not unpruned_cover(latency, L):
            with pytest.raises(UserError):
                frontier(table, importance_table, allowed)
            continue
        solved += 1
        points = frontier(table, importance_table, allowed)
        assert [(lat, imp) for lat, imp, _ in points] == brute_pareto(plans)
        for _, _, plan in points:
            check_plan_numbers(plan, latency, importance, L)
            assert set(plan.activations) <= set(allowed)
        pruning += any(plan.pruned for _, _, plan in points)
        latencies = sorted({lat for lat, _, _, _ in plans})
        budgets = [latencies[0] - 0.125, *latencies, *[x + 0.0625 for x in latencies]]
        for budget in budgets:
            within = [p for p in plans if p[0] <= budget]
            if not within:
                with pytest.raises(UserError, match="smallest achievable latency"):
                    solve(table, importance_table, budget, allowed)
                continue
            best = max(imp for _, imp, _, _ in within)
            plan = solve(table, importance_table, budget, allowed)
            assert plan.latency_ms <= budget
            assert plan.importance == best
            assert plan.latency_ms == min(lat for lat, imp, _, _ in within if imp == best)
            check_plan_numbers(plan, latency, importance, L)
            full_plan, _ = solve_with_frontier(table, importance_table, budget, allowed)
            assert (full_plan.latency_ms, full_plan.importance) == (plan.latency_ms, plan.importance)
    assert solved > 25
    if with_importance:
        assert pruning > 10  # the instances exercise pruning, not only the unpruned plans


def test_pruned_sets_are_every_union_a_split_reaches():
    rng = random.Random(5)
    for _ in range(40):
        L = rng.randint(1, 6)
        latency, _, _ = random_instance(rng, L, False, False)
        table, _ = tables(L, latency, None)
        for i in range(L):
            for j in range(i + 1, L + 1):
                expected = {union(rows) for rows in splits(latency, i, j)}
                assert set(pruned_sets(table, i, j)) == expected
                assert pruned_sets(table, i, j) == sorted(expected, key=lambda p: (len(p), p))


def test_pruned_latency_rows_without_pruned_importance_change_nothing():
    """Pruning options that the importance table does not price are not taken: the answers are
    those of the same tables without them, and uniform importance never prunes."""
    rng = random.Random(11)
    compared = 0  # instances whose table has pruning options, compared under each importance
    for _ in range(30):
        L = rng.randint(2, 8)
        latency, allowed, importance = random_instance(rng, L, True, False)
        if not unpruned_cover(latency, L):
            continue
        with_options, _ = tables(L, latency, None)
        without = LatencyTable(L, dict(with_options.latency_ms))
        unpruned = ImportanceTable({(i, j): v for (i, j, p), v in importance.items() if not p})
        for imp in (None, unpruned):
            try:
                expected = [(lat, val, p.boundaries) for lat, val, p in frontier(without, imp)]
            except UserError:
                with pytest.raises(UserError):  # options the importance cannot price do not rescue it
                    frontier(with_options, imp)
                continue
            got = frontier(with_options, imp)
            assert [(lat, val, p.boundaries) for lat, val, p in got] == expected
            assert all(p.pruned == [] for _, _, p in got)
            compared += bool(with_options.pruned_latency_ms)
    assert compared >= 35  # of 50 comparisons (25 instances cover 0 to L, under two importances): 41 today


def test_pruning_wins_where_merging_cannot():
    # Two 3x3 convs: merged they make a slower 5x5; pruning the second (reducible) is fast and costs
    # a little importance.
    table = LatencyTable(2, {(0, 1): 1.0, (1, 2): 1.0, (0, 2): 2.5},
                         pruned_latency_ms={(1, 2, (2,)): 0.0, (0, 2, (2,)): 1.0})
    importance = ImportanceTable({(0, 1): 0.5, (1, 2): 0.5, (0, 2): 0.25},
                                 pruned_importance={(1, 2, (2,)): 0.25, (0, 2, (2,)): 0.125})
    plan = solve(table, importance, 1.5)
    assert plan.activations == [1] and plan.boundaries == [0, 1, 2] and plan.pruned == [2]
    assert plan.latency_ms == 1.0 and plan.importance == 0.75
    assert plan.pruned_in(1, 2) == (2,) and plan.pruned_in(0, 1) == ()
    assert solve(table, importance, 2.0).pruned == []  # the unpruned network fits
    with pytest.raises(UserError, match="smallest achievable latency 1 ms"):
        solve(table, importance, 0.5)


def test_a_pruned_segment_split_over_blocks():
    # Segment (0, 4) with 2 and 4 pruned: the cheapest split prunes 2 in block (0, 2) and 4 in (2, 4).
    unpruned = {(0, 1): 1.0, (1, 2): 1.0, (2, 3): 1.0, (3, 4): 1.0, (0, 2): 1.5, (2, 4): 1.5, (0, 4): 3.0}
    options = {(0, 2, (2,)): 0.75, (2, 4, (4,)): 0.5, (0, 4, (2, 4)): 1.5, (1, 2, (2,)): 0.0, (3, 4, (4,)): 0.0}
    table = LatencyTable(4, unpruned, pruned_latency_ms=options)
    importance = ImportanceTable({(0, 4): 1.0}, pruned_importance={(0, 4, (2, 4)): 0.5})
    plan = solve(table, importance, 1.25)
    assert plan.activations == [] and plan.pruned == [2, 4] and plan.boundaries == [0, 2, 4]
    assert plan.latency_ms == 1.25 and plan.importance == 0.5


def test_pruned_importance_row_the_latency_table_cannot_cover():
    table = LatencyTable(2, {(0, 1): 1.0, (1, 2): 1.0, (0, 2): 1.5}, pruned_latency_ms={(1, 2, (2,)): 0.5})
    importance = ImportanceTable({(0, 2): 1.0}, pruned_importance={(0, 2, (1,)): 0.5})
    with pytest.raises(UserError, match=r"segment \(0, 2\) pruned '1' cannot be split into blocks of the "
                                        r"latency table with those convs pruned"):
        solve(table, importance, 10.0)
    importance = ImportanceTable({(0, 2): 1.0}, pruned_importance={(0, 3, (2,)): 0.5})
    with pytest.raises(UserError, match=r"segment \(0, 3\) pruned '2' ends past"):
        solve(table, importance, 10.0)
    importance = ImportanceTable({(0, 2): 1.0, (1, 2): 0.5}, pruned_importance={(0, 1, (1,)): 0.5})
    with pytest.raises(UserError, match=r"segment \(0, 1\) pruned '1' ends at position 1, which holds no"):
        solve(table, importance, 10.0, allowed_positions=[])



def test_a_block_holding_an_earlier_pruned_conv_unpruned_cannot_extend_the_set():
    """Pruning (2, 3) needs a block pruning 2 and then one pruning 3 that starts at or after 2: the only
    block pruning 3, (1, 3), holds conv 2 unpruned, so no split prunes exactly {2, 3}, as brute force says."""
    table = LatencyTable(3, {(0, 1): 1.0, (1, 2): 1.0, (2, 3): 1.0, (1, 3): 1.5},
                         pruned_latency_ms={(1, 2, (2,)): 0.5, (1, 3, (3,)): 0.5})
    assert (2, 3) not in pruned_sets(table, 0, 3)
    importance = ImportanceTable({(0, 3): 1.0}, pruned_importance={(0, 3, (2,)): 0.5, (0, 3, (2, 3)): 0.5})
    with pytest.raises(UserError, match=r"segment \(0, 3\) pruned '2 3' cannot be split into blocks"):
        solve(table, importance, 10.0)
    importance = ImportanceTable({(0, 3): 1.0}, pruned_importance={(0, 3, (2,)): 0.5, (0, 3, (3,)): 0.25})
    plan = solve(table, importance, 2.0)  # only pruning 3 alone, by that block, fits
    assert (plan.boundaries, plan.pruned, plan.latency_ms, plan.importance) == ([0, 1, 3], [3], 1.5, 0.25)


def test_frontier_csv_has_the_pruned_convs(tmp_path):
    table = LatencyTable(2, {(0, 1): 1.0, (1, 2): 1.0, (0, 2): 2.5}, pruned_latency_ms={(1, 2, (2,)): 0.0})
    importance = ImportanceTable({(0, 1): 0.5, (1, 2): 0.5}, pruned_importance={(1, 2, (2,)): 0.25})
    plan, plans = solve_with_frontier(table, importance, 5.0)
    path = tmp_path / "frontier.csv"
    write_frontier_csv(path, plans)
    lines = path.read_text().splitlines()
    assert lines[0].endswith(",pruned")
    assert [line.rsplit(",", 1)[1] for line in lines[1:]] == ["2", ""]


@pytest.mark.parametrize("first_option, split", [((1, 2), [0, 1, 2, 3]), ((0, 2), [0, 2, 3])])
def test_equal_splits_of_a_pruned_segment_break_ties_as_recorded(first_option, split):
    """Three splits of (0, 3) with conv 2 pruned cost 2.5: (0,1) (1,2)p (2,3), (0,2)p (2,3) and (0,1) (1,3)p.
    Of the pruning blocks' ends the first wins (2, not 3), and of the blocks reaching it at equal cost the
    first in the table. This pins the choice the solver made before it was made fast (issue 14)."""
    options = {(1, 2, (2,)): 0.5, (0, 2, (2,)): 1.5}
    pruned_latency = {first_option + ((2,),): options[first_option + ((2,),)]}
    pruned_latency.update({**options, (1, 3, (2,)): 1.5})
    table = LatencyTable(3, {(0, 1): 1.0, (1, 2): 1.0, (2, 3): 1.0}, pruned_latency_ms=pruned_latency)
    importance = ImportanceTable({(0, 3): 1.0}, pruned_importance={(0, 3, (2,)): 1.0})
    plan = solve(table, importance, 3.0, [])
    assert (plan.boundaries, plan.pruned, plan.latency_ms) == (split, [2], 2.5)
