"""End-to-end benchmark: the original network against its compressed (merged) version.

Both are prepared on the same backend and timed in alternating rounds in one
process, so that load and clock drift affect both alike; the measured speed-up is
the ratio of the medians over the quiet rounds: those where each ran within
``QUIET_MARGIN`` of its fastest tenth of rounds (the compressed network only where it has
20 rounds to judge by), and so did the original in the round after (a loaded state of the
machine slows one network more than the other, see ``timing``). A bench that lasts a second
sees one state; ``min_seconds`` spreads it over long enough to meet a quiet one. A plan's
predicted speed-up is its original latency over its latency, both sums of latency-table rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from dpcompress.latency.timing import (QUIET_MARGIN, TimingStats, alternate, calm_rounds, in_rounds, narrow_enough,
                                       quiet_level, quiet_rounds, round_medians, summarize)
from dpcompress.memory import release_freed_memory

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn

    from dpcompress.backends import Backend
    from dpcompress.graph.plan import Plan


# Rounds a given quiet level must be met in before it judges a bench (else the bench's own level does).
MIN_QUIET_ROUNDS = 3


@dataclass(frozen=True)
class BenchResult:
    backend: Dict[str, Any]  # name, version, device, device_name, threads, options
    input_shape: List[int]
    precision: str
    warmup: int
    rounds: int
    iters_per_round: int
    original: TimingStats
    compressed: Optional[TimingStats] = None
    predicted_speedup: Optional[float] = None
    plan: Optional[Dict[str, Any]] = field(default=None)  # the plan's figures: latency_ms, original_latency_ms, ...
    quiet_rounds: Optional[int] = None  # rounds the figures come from (of ``rounds``)
    all_rounds_speedup: Optional[float] = None  # the ratio of the medians over every round
    quiet_level_ms: Optional[float] = None  # the original's quiet level the rounds were judged against

    @property
    def measured_speedup(self) -> Optional[float]:
        if self.compressed is None:
            return None
        return self.original.median_ms / self.compressed.median_ms

    @property
    def measured_speedup_interval(self) -> Optional[List[float]]:
        """The speed-up's range from the two medians' 95% intervals (slowest to fastest)."""
        if self.compressed is None:
            return None
        o, c = self.original, self.compressed
        return [o.ci_low_ms / c.ci_high_ms, o.ci_high_ms / c.ci_low_ms]

    @property
    def predicted_speedup_measured_rest(self) -> Optional[float]:
        """The plan's predicted saving (table sums) taken off the measured original latency.

        The table covers only the trunk convolutions, timed one by one; everything else in
        the measured network (pooling, classifier, residual adds, per-run overhead) is a
        constant that dilutes the speed-up. This figure keeps that constant.
        """
        if self.plan is None or not self.plan.get("latency_ms") or not self.plan.get("original_latency_ms"):
            return None
        saved = self.plan["original_latency_ms"] - self.plan["latency_ms"]
        remaining = self.original.median_ms - saved
        return self.original.median_ms / remaining if remaining > 0 else None

    def to_json(self) -> Dict[str, Any]:
        return {
            "backend": self.backend,
            "input_shape": self.input_shape,
            "precision": self.precision,
            "warmup": self.warmup,
            "rounds": self.rounds,
            "iters_per_round": self.iters_per_round,
            "original": self.original.to_json(),
            "compressed": self.compressed.to_json() if self.compressed else None,
            "measured_speedup": self.measured_speedup,
            "measured_speedup_interval": self.measured_speedup_interval,
            "quiet_rounds": self.quiet_rounds,
            "all_rounds_speedup": self.all_rounds_speedup,
            "quiet_level_ms": self.quiet_level_ms,
            "predicted_speedup": self.predicted_speedup,
            "predicted_speedup_measured_rest": self.predicted_speedup_measured_rest,
            "plan": self.plan,
        }

    def summary_lines(self) -> List[str]:
        """Lines a script can read: ``measured speed-up: 1.42x``, ``predicted speed-up: 1.50x``."""
        def stats_line(label: str, stats: TimingStats) -> str:
            return (f"{label}: median {stats.median_ms:.3f} ms (95% interval {stats.ci_low_ms:.3f}-"
                    f"{stats.ci_high_ms:.3f}, std {stats.std_ms:.3f} ms, {stats.count} runs)")

        lines = [stats_line("original", self.original)]
        if self.compressed is not None:
            low, high = self.measured_speedup_interval  # type: ignore[misc]
            lines.append(stats_line("compressed", self.compressed))
            lines.append(f"speed-up from the medians' 95% intervals: {low:.2f}x-{high:.2f}x")
            lines.append(f"measured speed-up: {self.measured_speedup:.2f}x")
        if self.quiet_rounds is not None and self.quiet_rounds < self.rounds:
            all_rounds = f"; over all rounds {self.all_rounds_speedup:.2f}x" if self.all_rounds_speedup else ""
            lines.append(f"quiet rounds: {self.quiet_rounds} of {self.rounds}, the original within "
                         f"{QUIET_MARGIN:.2f}x of {self.quiet_level_ms:.3f} ms (the machine was loaded in the "
                         f"others{all_rounds})")
        if self.predicted_speedup is not None:
            lines.append(f"predicted speed-up: {self.predicted_speedup:.2f}x")
        if self.predicted_speedup_measured_rest is not None:
            lines.append(f"predicted speed-up with the measured rest: {self.predicted_speedup_measured_rest:.2f}x")
        return lines


def predicted_speedup(plan: "Plan") -> Optional[float]:
    """original_latency_ms / latency_ms of the plan, when it has both (a solved plan does)."""
    if plan.latency_ms and plan.original_latency_ms:
        return plan.original_latency_ms / plan.latency_ms
    return None


def backend_record(backend: "Backend") -> Dict[str, Any]:
    return {"name": backend.name, "version": backend.version, "device": backend.device,
            "device_name": backend.device_name, "threads": backend.threads, "options": backend.options()}


def bench_modules(backend: "Backend", original: "torch.nn.Module", compressed: Optional["torch.nn.Module"] = None,
                  *, input_shape: Sequence[int], precision: str = "fp32", warmup: int = 10, rounds: int = 10,
                  iters_per_round: int = 10, plan: Optional["Plan"] = None, until_ci: Optional[float] = None,
                  max_rounds: int = 100, min_seconds: float = 0.0,
                  quiet_level_ms: Optional[float] = None) -> BenchResult:
    """Time ``original`` (and ``compressed``) on ``backend``, alternating rounds when there are two;
    the figures are those of the quiet rounds. With ``quiet_level_ms`` (a table's ``anchor_quiet_ms``:
    the state the table was made in), the original's rounds are judged against it instead of against
    the bench's own fastest tenth (within QUIET_MARGIN of it either way), where at least
    MIN_QUIET_ROUNDS rounds meet it.

    With ``until_ci``, rounds go on past ``rounds`` (up to ``max_rounds``) until each median's
    95% interval is within ``until_ci`` of it (relative half-width). With ``min_seconds``, they go on
    until that long has passed as well (up to ``max_rounds`` only if ``until_ci`` is set).
    """
    runners = backend.prepare_all([original] if compressed is None else [original, compressed], input_shape,
                                  precision)
    release_freed_memory()  # what the exports held
    until = narrow_enough(until_ci) if until_ci else None
    if min_seconds > 0:
        began, narrow = time.perf_counter(), until
        until = lambda samples: (time.perf_counter() - began >= min_seconds  # noqa: E731
                                 and (narrow is None or narrow(samples)))
        max_rounds = max_rounds if until_ci else 1 << 30
    samples = alternate(runners, warmup, rounds, iters_per_round, until=until, max_rounds=max_rounds)
    rounds = len(samples[0]) // iters_per_round
    per_round = [round_medians(collected, iters_per_round) for collected in samples]

    def judged(level: Optional[float]) -> List[bool]:
        # A state can slow the compressed network alone: each runner near its own fastest tenth too.
        calm = ([quiet_rounds(per_round[0], level, both_sides=level is not None)]
                + [calm_rounds(collected, iters_per_round) for collected in samples[1:]])
        return [all(c[k] for c in calm) and (k + 1 == rounds or calm[0][k + 1]) for k in range(rounds)]

    quiet = judged(quiet_level_ms) if quiet_level_ms is not None else []
    if sum(quiet) < MIN_QUIET_ROUNDS:
        quiet_level_ms = quiet_level(per_round[0])
        quiet = judged(None)
    if sum(quiet) == 0:  # the fastest round was followed by a loaded one, and every other round loaded
        quiet = [True] * rounds
    kept = [in_rounds(collected, iters_per_round, quiet) for collected in samples]
    plan_figures = None
    if plan is not None:
        plan_figures = {"latency_ms": plan.latency_ms, "original_latency_ms": plan.original_latency_ms,
                        "budget_ms": plan.budget_ms, "activations": list(plan.activations),
                        "boundaries": list(plan.boundaries)}
    return BenchResult(
        backend=backend_record(backend), input_shape=[int(x) for x in input_shape], precision=precision,
        warmup=warmup, rounds=rounds, iters_per_round=iters_per_round,
        original=summarize(kept[0]),
        compressed=summarize(kept[1]) if compressed is not None else None,
        predicted_speedup=predicted_speedup(plan) if plan is not None else None,
        plan=plan_figures,
        quiet_rounds=sum(quiet), quiet_level_ms=quiet_level_ms,
        all_rounds_speedup=(summarize(samples[0]).median_ms / summarize(samples[1]).median_ms
                            if compressed is not None else None),
    )

