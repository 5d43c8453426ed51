"""With pruning options the solver gives exactly the answers it gave before it was made fast (issue 14).

The brute-force tests check the numbers of every plan, not which of several equally good splits and
plans the solver picks; ``solver_pruning_answers.json`` pins those choices. It holds seeded random
tables with pruning options (from ``tests.pruning_instances.random_instance``: exact multiples of 1/8
and 1/4; the same perturbed to real values; and with every latency equal, so that equal plans abound)
and the answers the solver gave for them at the commit named by its ``recorded_with`` field: every
frontier plan, and the plan for several budgets from both the budget-pruned and the whole-frontier
path, or the error. Today's solver must give the same plans (boundaries and pruned convs included)
and the same floats, bit for bit. (Equal splits of one pruned segment are rare here;
``test_solver_pruning`` pins how those ties break.)

To record again (only when an answer is meant to change):
``python -m tests.search.test_solver_pruning_answers tests/search/solver_pruning_answers.json "<what solver>"``.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, List, Optional

import pytest

from dpcompress.errors import UserError
from dpcompress.search import solver
from dpcompress.tables import ImportanceTable, LatencyTable
from tests.pruning_instances import random_instance, unpruned_cover

ANSWERS = Path(__file__).parent / "solver_pruning_answers.json"
BUDGET_RATIOS = (0.2, 0.35, 0.5, 0.7, 0.85, 1.0)


def cases(count: int = 90) -> List[Dict[str, Any]]:
    """The seeded instances, as JSON-ready tables: pruned convs as lists."""
    found = []
    for seed in range(count):
        rng = random.Random(1400 + seed)
        L = rng.randint(2, 7)
        latency, allowed, importance = random_instance(rng, L, with_importance=True, restrict=seed % 4 == 0)
        if seed % 3 == 1:  # real values: few ties
            latency = {row: value + rng.random() * 0.01 for row, value in latency.items()}
            importance = {row: value + rng.random() * 0.01 for row, value in (importance or {}).items()}
        elif seed % 3 == 2:  # one latency, two importances: many equal plans, where the choice among them shows
            latency = {row: 0.25 for row in latency}
            importance = {row: rng.choice((0.0, 1.0)) for row in (importance or {})}
        if not unpruned_cover(latency, L):
            continue
        found.append({"num_positions": L, "allowed": allowed,
                      "latency": [[i, j, list(pruned), value] for (i, j, pruned), value in latency.items()],
                      "importance": [[i, j, list(pruned), value]
                                     for (i, j, pruned), value in (importance or {}).items()]})
    return found


def tables(case: Dict[str, Any]) -> tuple[LatencyTable, ImportanceTable]:
    latency = {(i, j, tuple(pruned)): value for i, j, pruned, value in case["latency"]}
    importance = {(i, j, tuple(pruned)): value for i, j, pruned, value in case["importance"]}
    return (LatencyTable(case["num_positions"], {(i, j): v for (i, j, p), v in latency.items() if not p},
                         pruned_latency_ms={row: v for row, v in latency.items() if row[2]}),
            ImportanceTable({(i, j): v for (i, j, p), v in importance.items() if not p},
                            pruned_importance={row: v for row, v in importance.items() if row[2]}))


def answer(plan: Any) -> Dict[str, Any]:
    return {"activations": list(plan.activations), "boundaries": list(plan.boundaries), "pruned": list(plan.pruned),
            "latency_ms": plan.latency_ms, "importance": plan.importance}


def answers(module: ModuleType, case: Dict[str, Any]) -> Dict[str, Any]:
    """What ``module`` (a solver) answers for the case: its frontier, or the error, and its solves."""
    table, importance = tables(case)
    allowed = case["allowed"]
    result: Dict[str, Any] = {}
    try:
        result["frontier"] = [answer(plan) for _, _, plan in module.frontier(table, importance, allowed)]
    except UserError as err:
        result["frontier_error"] = str(err)
    # Budgets across the frontier (its slowest plan's latency times the ratios) and at its points.
    slowest = result["frontier"][-1]["latency_ms"] if result.get("frontier") else 1.0
    result["solves"] = []
    frontier_latencies = [plan["latency_ms"] for plan in result.get("frontier", [])]
    for budget in [ratio * slowest for ratio in BUDGET_RATIOS] + frontier_latencies:
        solved: Dict[str, Any] = {"budget_ms": budget}
        try:
            solved["plan"] = answer(module.solve(table, importance, budget, allowed))
            solved["full_frontier_plan"] = answer(module.solve_with_frontier(table, importance, budget, allowed)[0])
        except UserError as err:
            solved["error"] = str(err)
        result["solves"].append(solved)
    return result


def recorded() -> List[Dict[str, Any]]:
    return json.loads(ANSWERS.read_text())["cases"]


def test_the_recorded_cases_are_todays_instances_and_exercise_pruning():
    cases_now = cases()
    assert [{k: c[k] for k in ("num_positions", "allowed", "latency", "importance")} for c in recorded()] == cases_now
    assert sum(any(plan["pruned"] for plan in c["answers"].get("frontier", [])) for c in recorded()) > 15


@pytest.mark.parametrize("index", range(len(recorded())))
def test_same_answers_as_recorded(index):
    case = recorded()[index]
    assert answers(solver, case) == case["answers"]


def record(path: Path, recorded_with: str, module: Optional[ModuleType] = None) -> None:
    module = module if module is not None else solver
    data = {"recorded_with": recorded_with,
            "cases": [{**case, "answers": answers(module, case)} for case in cases()]}
    path.write_text(json.dumps(data, indent=None, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    record(Path(sys.argv[1]), sys.argv[2])
