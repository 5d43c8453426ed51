"""The closed loop: the frontier's best plans around the budget, benched on the target, the best one kept.

A latency table is a model of the target, and a model can be wrong. The DP's
frontier holds every plan worth having; the loop takes the most important few whose
predicted latency lies within the budget (or a little above it: the table can as
well be pessimistic), builds each merged network, benches it against the original in
alternating rounds on the target backend, and keeps the most important plan whose
measured latency is within the budget, expressed as the same fraction of the original's
latency measured in that bench (so that load on the machine moves both alike). A plan
measured no faster than the original is never kept; where no candidate passes, the
original network is kept (the plan that merges nothing) and the result says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Sequence

from dpcompress.errors import UserError
from dpcompress.graph.plan import Plan
from dpcompress.progress import Counted

if TYPE_CHECKING:  # pragma: no cover
    from dpcompress.backends import Backend
    from dpcompress.graph.trace import TracedModel

# Plans predicted up to this much above the budget are candidates too (the table can be
# pessimistic); like every candidate they must be measured within the budget itself.
PREDICTED_OVER = 0.05


@dataclass
class Candidate:
    plan: Plan
    predicted_ms: float
    measured_ms: float = float("nan")  # median, merged network
    measured_original_ms: float = float("nan")  # median, original network, same bench
    budget_ms: float = float("nan")  # the budget in measured terms for this bench
    within_budget: bool = False
    faster: bool = False
    chosen: bool = False

    @property
    def measured_speedup(self) -> float:
        return self.measured_original_ms / self.measured_ms

    def to_json(self) -> Dict[str, Any]:
        return {"activations": list(self.plan.activations), "boundaries": list(self.plan.boundaries),
                "importance": self.plan.importance, "predicted_ms": self.predicted_ms,
                "predicted_speedup": (self.plan.original_latency_ms or float("nan")) / self.predicted_ms,
                "measured_ms": self.measured_ms, "measured_original_ms": self.measured_original_ms,
                "measured_speedup": self.measured_speedup, "measured_budget_ms": self.budget_ms,
                "within_budget": self.within_budget, "faster": self.faster, "chosen": self.chosen}


@dataclass
class LoopResult:
    plan: Plan  # the chosen plan, or the plan that merges nothing
    kept_original: bool
    budget_ratio: float  # the budget as a fraction of the original's latency
    candidates: List[Candidate] = field(default_factory=list)
    reason: str = ""

    def to_json(self) -> Dict[str, Any]:
        return {"kept_original": self.kept_original, "budget_ratio": self.budget_ratio,
                "reason": self.reason,
                "candidates": [c.to_json() for c in self.candidates]}


def candidate_plans(frontier: Sequence[Plan], budget_ms: float, count: int = 3,
                    predicted_over: float = PREDICTED_OVER) -> List[Plan]:
    """The ``count`` most important frontier plans predicted within ``budget_ms`` x (1 + ``predicted_over``),
    most important first."""
    if count < 1:
        raise UserError(f"--candidates must be at least 1 (got {count})")
    near = [p for p in frontier if p.latency_ms is not None and p.latency_ms <= budget_ms * (1 + predicted_over)]
    return sorted(near, key=lambda p: (-(p.importance or 0.0), p.latency_ms))[:count]


def original_plan(traced: "TracedModel", like: Plan, budget_ms: float) -> Plan:
    """The plan that changes nothing: every activation kept, every conv its own block."""
    chain = traced.chain
    L = chain.num_positions
    return Plan(activations=[p for p in chain.activation_positions if 0 < p < L], boundaries=list(range(L + 1)),
                num_positions=L, model=like.model, chain_fingerprint=like.chain_fingerprint,
                budget_ms=budget_ms, latency_ms=like.original_latency_ms, importance=None,
                original_latency_ms=like.original_latency_ms)


def measure_candidates(backend: "Backend", traced: "TracedModel", frontier: Sequence[Plan], budget_ms: float,
                       *, input_shape: Sequence[int], precision: str = "fp32", count: int = 3, warmup: int = 10,
                       rounds: int = 10, iters_per_round: int = 10,
                       say: Callable[[str], None] = lambda line: None) -> LoopResult:
    """Bench the best candidates of ``frontier`` for ``budget_ms`` and choose (module doc)."""
    from dpcompress.latency.bench import bench_modules
    from dpcompress.graph.rewrite import merged_model

    plans = candidate_plans(frontier, budget_ms, count)
    if not plans:
        raise UserError(f"no plan on the frontier is predicted within {budget_ms:.4g} ms; raise the budget")
    original_ms = plans[0].original_latency_ms
    if not original_ms:
        raise UserError("the plans carry no original latency, so the budget cannot be measured; "
                        "solve from a table with every single conv")
    ratio = budget_ms / original_ms
    candidates = []
    for index, plan in enumerate(plans, start=1):
        candidate = Candidate(plan=plan, predicted_ms=float(plan.latency_ms))  # type: ignore[arg-type]
        bench = bench_modules(backend, traced.gm, merged_model(traced, plan), input_shape=input_shape,
                              precision=precision, warmup=warmup, rounds=rounds, iters_per_round=iters_per_round)
        assert bench.compressed is not None
        candidate.measured_ms = bench.compressed.median_ms
        candidate.measured_original_ms = bench.original.median_ms
        candidate.budget_ms = ratio * bench.original.median_ms
        # No allowance for noise here: a candidate that only just passes would fail the next bench as often.
        candidate.within_budget = candidate.measured_ms <= candidate.budget_ms
        candidate.faster = candidate.measured_ms < candidate.measured_original_ms
        candidates.append(candidate)
        say(Counted(f"  candidate {index}/{len(plans)}: {len(plan.activations)} activations, {len(plan.blocks)} blocks, "
            f"predicted {candidate.predicted_ms:.4g} ms, measured {candidate.measured_ms:.4g} ms "
            f"(budget {candidate.budget_ms:.4g} ms, original {candidate.measured_original_ms:.4g} ms): "
            + ("within" if candidate.within_budget and candidate.faster else
               "over the budget" if not candidate.within_budget else "no faster than the original"),
            index, len(plans), "closed loop"))
    passing = [c for c in candidates if c.within_budget and c.faster]
    if passing:
        best = max(passing, key=lambda c: (c.plan.importance or 0.0, -c.measured_ms))
        best.chosen = True
        first = candidates[0]
        reason = ("the most important candidate, measured within the budget" if best is first else
                  f"the most important candidate measured within the budget; {candidates.index(best)} more "
                  "important one(s) measured over it or no faster than the original")
        return LoopResult(replace(best.plan, budget_ms=budget_ms), False, ratio, candidates, reason)
    fastest = min(candidates, key=lambda c: c.measured_ms / c.measured_original_ms)
    reason = ("no candidate was measured within the budget and faster than the original; kept the original "
              f"network (the fastest candidate measured {fastest.measured_ms / fastest.measured_original_ms:.3f} "
              f"of the original, {fastest.measured_speedup:.2f}x: a budget ratio above that can be met)")
    return LoopResult(original_plan(traced, plans[0], budget_ms), True, ratio, candidates, reason)
