"""End-to-end benchmark: the original network against its compressed (merged) version.

Both are prepared on the same backend and timed in alternating rounds in one
process, so that load and clock drift affect both alike; the measured speed-up is
the ratio of the medians. A plan's predicted speed-up is its original latency over
its latency, both sums of latency-table rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from dpcompress.latency.timing import TimingStats, alternate, narrow_enough, summarize
from dpcompress.memory import release_freed_memory

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn

    from dpcompress.backends import Backend
    from dpcompress.search.plan import Plan


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
                  max_rounds: int = 100) -> BenchResult:
    """Time ``original`` (and ``compressed``) on ``backend``, alternating rounds when there are two.

    With ``until_ci``, rounds go on past ``rounds`` (up to ``max_rounds``) until each median's
    95% interval is within ``until_ci`` of it (relative half-width).
    """
    runners = backend.prepare_all([original] if compressed is None else [original, compressed], input_shape,
                                  precision)
    release_freed_memory()  # what the exports held
    samples = alternate(runners, warmup, rounds, iters_per_round,
                        until=narrow_enough(until_ci) if until_ci else None, max_rounds=max_rounds)
    rounds = len(samples[0]) // iters_per_round
    plan_figures = None
    if plan is not None:
        plan_figures = {"latency_ms": plan.latency_ms, "original_latency_ms": plan.original_latency_ms,
                        "budget_ms": plan.budget_ms, "activations": list(plan.activations),
                        "boundaries": list(plan.boundaries)}
    return BenchResult(
        backend=backend_record(backend), input_shape=[int(x) for x in input_shape], precision=precision,
        warmup=warmup, rounds=rounds, iters_per_round=iters_per_round,
        original=summarize(samples[0]),
        compressed=summarize(samples[1]) if compressed is not None else None,
        predicted_speedup=predicted_speedup(plan) if plan is not None else None,
        plan=plan_figures,
    )


def bench_spec(backend: "Backend", model_spec: str, *, weights: Optional[str] = None,
               input_shape: Sequence[int] = (1, 3, 224, 224), plan_path: Optional[str] = None,
               precision: str = "fp32", warmup: int = 10, rounds: int = 10, iters_per_round: int = 10,
               until_ci: Optional[float] = None, max_rounds: int = 100,
               submodule: Optional[str] = None) -> BenchResult:
    """Build the model a spec names and bench it, against its merged version when a plan is given. With
    ``submodule``, bench that submodule alone, at the input it receives inside the model."""
    from dpcompress.pipeline import traced_from_spec

    _, traced, site = traced_from_spec(model_spec, weights, input_shape, submodule)
    model = traced.model
    if site is not None:
        input_shape = (input_shape[0], *site.input_shape[1:])
    compressed = plan = None
    if plan_path is not None:
        from dpcompress.graph.rewrite import merged_model
        from dpcompress.search.plan import load_plan

        plan = load_plan(plan_path)
        compressed = merged_model(traced, plan)  # checks the plan
    return bench_modules(backend, model, compressed, input_shape=input_shape, precision=precision, warmup=warmup,
                         rounds=rounds, iters_per_round=iters_per_round, plan=plan, until_ci=until_ci,
                         max_rounds=max_rounds)
