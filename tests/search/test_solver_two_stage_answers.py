"""With no pruning options the solver gives exactly the two-stage DP's answers.

``solver_two_stage_answers.json`` holds seeded random tables (real-valued latencies and
importances, with and without allowed positions, importance tables and ``rest_ms``) and the
answers the solver gave for them before pruning options existed (its ``recorded_with``
field names the commit): every frontier plan, and the plan for several budgets from both
the budget-pruned and the whole-frontier path, or the error. Today's solver must give the
same plans and the same floats, bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpcompress.errors import UserError
from dpcompress.search.solver import frontier, solve, solve_with_frontier
from dpcompress.tables import ImportanceTable, LatencyTable

CASES = json.loads((Path(__file__).parent / "solver_two_stage_answers.json").read_text())["cases"]


def answer(plan):
    return {"activations": plan.activations, "boundaries": plan.boundaries, "latency_ms": plan.latency_ms,
            "importance": plan.importance}


@pytest.mark.parametrize("case", CASES, ids=[f"L{c['num_positions']}-{n}" for n, c in enumerate(CASES)])
def test_same_answers_as_the_two_stage_solver(case):
    table = LatencyTable(case["num_positions"], {(i, j): v for i, j, v in case["latency"]},
                         meta={"rest_ms": case["rest_ms"]})
    importance = None if case["importance"] is None else ImportanceTable({(i, j): v for i, j, v in case["importance"]})
    allowed = case["allowed"]
    assert [answer(plan) for _, _, plan in frontier(table, importance, allowed)] == case["frontier"]
    for expected in case["solves"]:
        budget = expected["budget_ms"]
        if "error" in expected:
            with pytest.raises(UserError) as info:
                solve(table, importance, budget, allowed)
            assert str(info.value) == expected["error"]
            continue
        plan = solve(table, importance, budget, allowed)
        assert plan.pruned == []
        assert answer(plan) == expected["plan"]
        assert answer(solve_with_frontier(table, importance, budget, allowed)[0]) == expected["full_frontier_plan"]
