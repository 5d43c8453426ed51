"""The closed loop: plans of the frontier benched on the target, down the frontier until one meets the budget.

A latency table is a model of the target, and a model can be wrong. The DP's frontier holds
every plan worth having. The loop benches the most important few predicted within the budget
(or a little above it: the table can as well be pessimistic), each against the original
rebuilt as plans are (``latency.bench``), and keeps the most important one measured within
the budget: its measured speed-up at least the budget's (budget ratio r asks 1/r). Where none
is, the table was optimistic there by the ratio of measured to predicted latency: the loop
moves down the frontier, to the plans predicted within the budget scaled by that ratio (and
below every plan benched so far), benches those, and so on for up to ``MAX_STEPS`` steps or
to the frontier's end.

Where no plan measured within the budget, the fastest plan measured faster than the original
is kept all the same, and said plainly with its measured ratio: a user who asked for 2x would
rather have 1.9x than 1x. The original network is kept only where no plan measured faster
than it (its speed-up's 95% interval above 1.00x). A choice the bench's noise could reverse
(the budget's speed-up inside the chosen plan's interval) says so.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from dpcompress.errors import UserError
from dpcompress.graph.plan import Plan, unchanged_plan
from dpcompress.progress import Counted

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn

    from dpcompress.backends import Backend
    from dpcompress.graph.trace import TracedModel
    from dpcompress.latency.bench import BenchResult

# Plans predicted up to this much above the budget are candidates too (the table can be
# pessimistic); like every candidate they must be measured within the budget itself.
PREDICTED_OVER = 0.05
# Steps down the frontier, each benching up to ``count`` plans: the loop's time is bounded by
# MAX_STEPS x count benches.
MAX_STEPS = 4


@dataclass
class Candidate:
    plan: Plan
    predicted_ms: float
    step: int = 1  # the step of the loop that benched it
    measured_speedup: float = math.nan  # over the bench's session sets (latency.bench)
    interval: Tuple[float, float] = (math.nan, math.nan)  # its 95% interval
    measured_ms: float = math.nan  # median, merged network
    measured_original_ms: float = math.nan  # median, the original rebuilt, same bench
    budget_speedup: float = math.nan  # the speed-up the budget asks: 1 / budget ratio
    within_budget: bool = False
    faster: bool = False  # faster than the original beyond the bench's noise
    chosen: bool = False

    @property
    def measured_ratio(self) -> float:
        """The merged network's latency as a fraction of the original's, as measured."""
        return 1.0 / self.measured_speedup

    @property
    def predicted_ratio(self) -> float:
        return self.predicted_ms / (self.plan.original_latency_ms or math.nan)

    @property
    def within_noise(self) -> bool:
        """Whether the bench cannot tell this plan's speed-up from the budget's."""
        return self.interval[0] <= self.budget_speedup <= self.interval[1]

    def to_json(self) -> Dict[str, Any]:
        return {"activations": list(self.plan.activations), "boundaries": list(self.plan.boundaries),
                "pruned": list(self.plan.pruned), "importance": self.plan.importance, "step": self.step,
                "predicted_ms": self.predicted_ms, "predicted_speedup": 1.0 / self.predicted_ratio,
                "measured_ms": self.measured_ms, "measured_original_ms": self.measured_original_ms,
                "measured_speedup": self.measured_speedup, "measured_speedup_interval": list(self.interval),
                "measured_budget_ms": self.measured_original_ms / self.budget_speedup,
                "within_budget": self.within_budget, "within_noise": self.within_noise, "faster": self.faster,
                "chosen": self.chosen}


@dataclass
class LoopResult:
    plan: Plan  # the chosen plan, or the plan that merges nothing
    kept_original: bool
    budget_ratio: float  # the budget as a fraction of the original's latency
    candidates: List[Candidate] = field(default_factory=list)
    reason: str = ""
    met_budget: bool = False  # the chosen plan measured within the budget
    steps: int = 1

    def to_json(self) -> Dict[str, Any]:
        return {"kept_original": self.kept_original, "budget_ratio": self.budget_ratio, "met_budget": self.met_budget,
                "steps": self.steps, "reason": self.reason, "candidates": [c.to_json() for c in self.candidates]}


def candidate_plans(frontier: Sequence[Plan], budget_ms: float, count: int = 3,
                    predicted_over: float = PREDICTED_OVER, below_ms: float = math.inf,
                    benched: Set[Tuple] = frozenset()) -> List[Plan]:
    """The ``count`` most important frontier plans predicted within ``budget_ms`` x (1 + ``predicted_over``)
    and below ``below_ms``, other than those ``benched`` (by :func:`plan_key`), most important first."""
    if count < 1:
        raise UserError(f"--candidates must be at least 1 (got {count})")
    near = [p for p in frontier if p.latency_ms is not None and p.latency_ms <= budget_ms * (1 + predicted_over)
            and p.latency_ms < below_ms and plan_key(p) not in benched]
    return sorted(near, key=lambda p: (-(p.importance or 0.0), p.latency_ms))[:count]


def plan_key(plan: Plan) -> Tuple:
    return tuple(plan.activations), tuple(plan.boundaries), tuple(plan.pruned)


def original_plan(traced: "TracedModel", like: Plan, budget_ms: float) -> Plan:
    """The plan that changes nothing, with ``like``'s model and original latency."""
    return replace(unchanged_plan(traced.chain), model=like.model, chain_fingerprint=like.chain_fingerprint,
                   budget_ms=budget_ms, latency_ms=like.original_latency_ms,
                   original_latency_ms=like.original_latency_ms)


def bench_candidate(backend: "Backend", original: "torch.nn.Module", traced: "TracedModel", plan: Plan,
                    budget_ratio: float, step: int, **bench_settings: Any) -> Candidate:
    """``plan``'s network benched against ``original`` (the original rebuilt), judged against the budget."""
    from dpcompress.graph.rewrite import merged_model
    from dpcompress.latency.bench import bench_modules

    bench: "BenchResult" = bench_modules(backend, original, merged_model(traced, plan), **bench_settings)
    assert bench.compressed is not None and bench.measured_speedup is not None
    interval = bench.measured_speedup_interval or [bench.measured_speedup] * 2
    speedup = bench.measured_speedup
    return Candidate(plan=plan, predicted_ms=float(plan.latency_ms), step=step,  # type: ignore[arg-type]
                     measured_speedup=speedup, interval=(interval[0], interval[1]),
                     measured_ms=bench.compressed.median_ms, measured_original_ms=bench.original.median_ms,
                     budget_speedup=1.0 / budget_ratio, within_budget=speedup >= 1.0 / budget_ratio,
                     faster=interval[0] > 1.0)


def measure_candidates(backend: "Backend", traced: "TracedModel", frontier: Sequence[Plan], budget_ms: float,
                       *, input_shape: Sequence[int], precision: str = "fp32", count: int = 3, warmup: int = 10,
                       max_steps: int = MAX_STEPS, say: Callable[[str], None] = lambda line: None,
                       **bench_settings: Any) -> LoopResult:
    """Bench candidates of ``frontier`` for ``budget_ms``, stepping down the frontier, and choose (module doc).
    ``bench_settings`` go to :func:`~dpcompress.latency.bench.bench_modules` (rounds, sessions, ...)."""
    from dpcompress.graph.rewrite import unchanged_network

    plans = candidate_plans(frontier, budget_ms, count)
    if not plans:
        raise UserError(f"no plan on the frontier is predicted within {budget_ms:.4g} ms; raise the budget")
    original_ms = plans[0].original_latency_ms
    if not original_ms:
        raise UserError("the plans carry no original latency, so the budget cannot be measured; "
                        "solve from a table with every single conv")
    ratio = budget_ms / original_ms
    original = unchanged_network(traced)
    settings = dict(input_shape=input_shape, precision=precision, warmup=warmup, **bench_settings)
    candidates: List[Candidate] = []
    step = 1
    while True:
        for index, plan in enumerate(plans, start=1):
            candidate = bench_candidate(backend, original, traced, plan, ratio, step, **settings)
            candidates.append(candidate)
            say(Counted(f"  step {step}, candidate {index}/{len(plans)}: " + _described(candidate),
                        index, len(plans), "closed loop"))
        if any(c.within_budget and c.faster for c in candidates) or step >= max_steps:
            break
        plans, target_ms = _next_step(frontier, candidates, budget_ms, count)
        if not plans:
            say(f"  the frontier ends below {min(c.predicted_ms for c in candidates):.4g} ms: no cheaper plan to bench")
            break
        step += 1
        say(f"  step {step}: the plans measured over the budget; benching {len(plans)} predicted within "
            f"{target_ms:.4g} ms (the budget scaled by the table's optimism there)")
    return _choice(traced, candidates, ratio, budget_ms, step)


def _described(c: Candidate) -> str:
    verdict = ("within the budget" if c.within_budget and c.faster else
               "no faster than the original, beyond noise" if not c.faster else "over the budget")
    noise = " (inside the bench's noise)" if c.within_noise else ""
    return (f"{len(c.plan.activations)} activations, {len(c.plan.blocks)} blocks"
            + (f", {len(c.plan.pruned)} pruned" if c.plan.pruned else "")
            + f": predicted {1 / c.predicted_ratio:.2f}x, measured {c.measured_speedup:.2f}x "
            f"({c.interval[0]:.2f}-{c.interval[1]:.2f}x; the budget asks {c.budget_speedup:.2f}x): {verdict}{noise}")


def _next_step(frontier: Sequence[Plan], candidates: Sequence[Candidate], budget_ms: float, count: int
               ) -> Tuple[List[Plan], float]:
    """The next step's plans: predicted within the budget divided by the table's optimism in the last step
    (the median of measured over predicted ratios there), and below every plan benched so far."""
    last = [c for c in candidates if c.step == candidates[-1].step]
    optimism = max(1.0, statistics.median(c.measured_ratio / c.predicted_ratio for c in last))
    target_ms = budget_ms / optimism
    below_ms = min(c.predicted_ms for c in candidates)
    benched = {plan_key(c.plan) for c in candidates}
    plans = candidate_plans(frontier, target_ms, count, predicted_over=0.0, below_ms=below_ms, benched=benched)
    if not plans:  # the scaled budget lies below the frontier's end, or no plan between: the cheapest left
        left = [p for p in frontier if p.latency_ms is not None and p.latency_ms < below_ms
                and plan_key(p) not in benched]
        plans = sorted(left, key=lambda p: p.latency_ms)[:count]
    return plans, target_ms


def _choice(traced: "TracedModel", candidates: List[Candidate], ratio: float, budget_ms: float,
            steps: int) -> LoopResult:
    benched = f"{len(candidates)} plan{'s' if len(candidates) != 1 else ''} benched in {steps} step{'s' if steps != 1 else ''}"
    passing = [c for c in candidates if c.within_budget and c.faster]
    if passing:
        best = max(passing, key=lambda c: (c.plan.importance or 0.0, c.measured_speedup))
        reason = (f"the most important plan measured within the budget ({benched}): {best.measured_speedup:.2f}x "
                  f"against the {best.budget_speedup:.2f}x asked")
        return _chosen(best, candidates, ratio, budget_ms, reason, True, steps)
    faster = [c for c in candidates if c.faster]
    if faster:
        best = max(faster, key=lambda c: c.measured_speedup)
        reason = (f"no plan measured within the budget ({benched}); kept the fastest: it measured "
                  f"{best.measured_ratio:.3f} of the original ({best.measured_speedup:.2f}x) against the budget's "
                  f"{ratio:.3f} ({best.budget_speedup:.2f}x)")
        return _chosen(best, candidates, ratio, budget_ms, reason, False, steps)
    fastest = max(candidates, key=lambda c: c.measured_speedup)
    reason = (f"no plan measured faster than the original beyond the bench's noise ({benched}; the fastest "
              f"{fastest.measured_speedup:.2f}x, interval {fastest.interval[0]:.2f}-{fastest.interval[1]:.2f}x): "
              "kept the original network")
    return LoopResult(original_plan(traced, candidates[0].plan, budget_ms), True, ratio, candidates, reason,
                      False, steps)


def _chosen(best: Candidate, candidates: List[Candidate], ratio: float, budget_ms: float, reason: str,
            met: bool, steps: int) -> LoopResult:
    best.chosen = True
    if best.within_noise:
        reason += (f" (inside the bench's noise: its interval {best.interval[0]:.2f}-{best.interval[1]:.2f}x "
                   f"holds the budget's {best.budget_speedup:.2f}x)")
    return LoopResult(replace(best.plan, budget_ms=budget_ms), False, ratio, candidates, reason, met, steps)
