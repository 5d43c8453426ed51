"""End-to-end benchmark: the original network against its compressed (merged) version.

Both are prepared on the same backend and timed in one process, in rounds that run each in
turn, so that load and clock drift affect both alike. Two sessions of one network can run a
few percent apart for as long as they live (where their memory lies; docs/latency.md,
"Sessions"), so the rounds of one pair of sessions are not independent evidence: a bench
spreads its rounds over ``sessions`` sets, each building every network in two fresh
sessions, and the measured speed-up is the geometric mean of the sets' speed-ups, with a 95%
interval from Student's t over them. A set's speed-up is the ratio of the medians over its
quiet rounds: those where each network ran within ``QUIET_MARGIN`` of its fastest tenth of
rounds (the compressed network only where it has 20 rounds to judge by), and so did the
original in the round after (a loaded state of the machine slows one network more than the
other, see ``timing``). A bench that lasts a second sees one state; ``min_seconds`` spreads it
over long enough to meet a quiet one. A plan's predicted speed-up is its original latency over
its latency, both sums of latency-table rows.

Benches compare a plan's network with the original rebuilt by the same rewrite
(:func:`~dpcompress.graph.rewrite.unchanged_network`), so that both take the same path to the
runtime and a measured speed-up is only what compression bought.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from dpcompress.latency.timing import (QUIET_MARGIN, TimingStats, calm_rounds, in_rounds, quiet_level, quiet_rounds,
                                       round_medians, summarize, t_quantile_975)
from dpcompress.memory import release_freed_memory

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn

    from dpcompress.backends import Backend, Runner
    from dpcompress.graph.plan import Plan


# Rounds a given quiet level must be met in before it judges a bench (else the bench's own level does).
MIN_QUIET_ROUNDS = 3
# Quiet rounds a session set needs for its speed-up to count, where two sets or more have them.
MIN_SET_ROUNDS = 2
# Session sets a bench spreads its rounds over, and the rounds it times at least (docs/latency.md, "Benches"):
# sets go on until SESSION_SETS of them kept MIN_SET_ROUNDS quiet rounds each, up to MAX_ROUNDS.
SESSION_SETS = 4
DEFAULT_ROUNDS = 16
MAX_ROUNDS = 48


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
    measured_speedup: Optional[float] = None  # over the session sets (module doc)
    measured_speedup_interval: Optional[List[float]] = None  # its 95% interval, slowest to fastest
    session_speedups: List[float] = field(default_factory=list)  # each session set's figure

    @property
    def within_noise(self) -> bool:
        """Whether the measured speed-up's interval holds 1.00: the bench cannot tell the two apart."""
        interval = self.measured_speedup_interval
        return interval is not None and interval[0] <= 1.0 <= interval[1]

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
            "session_speedups": self.session_speedups,
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
            sets = len(self.session_speedups)
            lines.append(f"speed-up's 95% interval over {sets} session set{'s' if sets != 1 else ''}: "
                         f"{low:.2f}x-{high:.2f}x" + (" (holds 1.00x: no difference shown)" if self.within_noise else ""))
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
                  *, input_shape: Sequence[int], precision: str = "fp32", warmup: int = 10,
                  rounds: int = DEFAULT_ROUNDS, iters_per_round: int = 10, sessions: int = SESSION_SETS,
                  plan: Optional["Plan"] = None, until_ci: Optional[float] = None, max_rounds: int = MAX_ROUNDS,
                  min_seconds: float = 0.0, quiet_level_ms: Optional[float] = None) -> BenchResult:
    """Time ``original`` (and ``compressed``) on ``backend`` in ``sessions`` session sets (module doc); the
    figures are those of the quiet rounds. With ``quiet_level_ms`` (a table's ``anchor_quiet_ms``: the state
    the table was made in), the original's rounds are judged against it instead of against the bench's own
    fastest tenth (within QUIET_MARGIN of it either way), where at least MIN_QUIET_ROUNDS rounds meet it.

    Past ``rounds``, sets go on (up to ``max_rounds``) until ``sessions`` of them kept MIN_SET_ROUNDS quiet
    rounds each, and with ``until_ci`` until the speed-up's 95% interval (one network: its median's) is within
    ``until_ci`` of it (relative half-width; a stop by the interval's width leaves intervals that are narrow by
    chance too narrow, so it is not the default). With ``min_seconds``, they go on until that long has passed
    as well (past ``max_rounds`` if need be).
    """
    if rounds < 1 or iters_per_round < 1 or sessions < 1:
        raise ValueError("rounds, iters_per_round and sessions must be at least 1")
    runners = backend.prepare_all([original] if compressed is None else [original, compressed], input_shape,
                                  precision)
    release_freed_memory()  # what the exports held
    per_set = max(1, math.ceil(rounds / sessions))
    until = _stopping_rule(until_ci, min_seconds, iters_per_round, quiet_level_ms, sessions, max_rounds,
                           min(MIN_SET_ROUNDS, per_set))
    samples, set_of_round = time_in_session_sets(runners, warmup, rounds, per_set, iters_per_round, until,
                                                 1 << 30 if min_seconds > 0 else max(max_rounds, rounds))
    quiet, quiet_level_ms = quiet_of(samples, iters_per_round, quiet_level_ms)
    kept = [in_rounds(collected, iters_per_round, quiet) for collected in samples]
    result = BenchResult(
        backend=backend_record(backend), input_shape=[int(x) for x in input_shape], precision=precision,
        warmup=warmup, rounds=len(set_of_round), iters_per_round=iters_per_round, original=summarize(kept[0]),
        predicted_speedup=predicted_speedup(plan) if plan is not None else None, plan=_plan_figures(plan),
        quiet_rounds=sum(quiet), quiet_level_ms=quiet_level_ms)
    if compressed is None:
        return result
    by_set = quiet_set_speedups(samples, iters_per_round, quiet, set_of_round)
    compressed_stats = summarize(kept[1])
    speedup, interval = speedup_over_sets(by_set, result.original, compressed_stats)
    return replace(result, compressed=compressed_stats, measured_speedup=speedup, measured_speedup_interval=interval,
                   session_speedups=by_set,
                   all_rounds_speedup=summarize(samples[0]).median_ms / summarize(samples[1]).median_ms)


def quiet_of(samples: Sequence[Sequence[float]], iters_per_round: int, level_ms: Optional[float]
             ) -> Tuple[List[bool], float]:
    """Which rounds were quiet (module doc), and the original's level they were judged against: ``level_ms``
    where at least MIN_QUIET_ROUNDS rounds meet it, else the bench's own fastest tenth. Every round where
    none was quiet (the fastest round was followed by a loaded one, and every other round loaded)."""
    per_round = round_medians(samples[0], iters_per_round)
    rounds = len(per_round)

    def judged(level: Optional[float]) -> List[bool]:
        # A state can slow the compressed network alone: each runner near its own fastest tenth too.
        calm = ([quiet_rounds(per_round, level, both_sides=level is not None)]
                + [calm_rounds(collected, iters_per_round) for collected in samples[1:]])
        return [all(c[k] for c in calm) and (k + 1 == rounds or calm[0][k + 1]) for k in range(rounds)]

    quiet = judged(level_ms) if level_ms is not None else []
    if sum(quiet) < MIN_QUIET_ROUNDS:
        level_ms = quiet_level(per_round)
        quiet = judged(None)
    return (quiet if any(quiet) else [True] * rounds), level_ms


def quiet_set_speedups(samples: Sequence[Sequence[float]], iters_per_round: int, quiet: Sequence[bool],
                       set_of_round: Sequence[int]) -> List[float]:
    """The speed-up of each session set over its quiet rounds: of the sets with MIN_SET_ROUNDS quiet rounds
    where two or more have (one round is a noisy figure, and under load a set may keep only one), else of
    every set with any."""
    masks = quiet_masks_by_set(quiet, set_of_round)
    enough = [mask for mask in masks if sum(mask) >= MIN_SET_ROUNDS]
    return set_speedups(samples, iters_per_round, enough if len(enough) >= 2 else masks)


def quiet_masks_by_set(quiet: Sequence[bool], set_of_round: Sequence[int]) -> List[List[bool]]:
    """For each session set, in order, the rounds that were its own and quiet."""
    return [[q and s == k for q, s in zip(quiet, set_of_round)] for k in sorted(set(set_of_round))]


def _plan_figures(plan: Optional["Plan"]) -> Optional[Dict[str, Any]]:
    if plan is None:
        return None
    return {"latency_ms": plan.latency_ms, "original_latency_ms": plan.original_latency_ms,
            "budget_ms": plan.budget_ms, "activations": list(plan.activations), "boundaries": list(plan.boundaries)}


def _stopping_rule(until_ci: Optional[float], min_seconds: float, iters_per_round: int,
                   quiet_level_ms: Optional[float], sessions: int, max_rounds: int, set_rounds: int
                   ) -> Callable[[List[List[float]], List[int]], bool]:
    """Whether the sets timed so far are enough (``bench_modules``; a set counts with ``set_rounds`` quiet
    rounds), judged by the quiet rounds as the bench's figures are."""
    began = time.perf_counter()

    def enough(samples: List[List[float]], set_of_round: List[int]) -> bool:
        if min_seconds > 0 and time.perf_counter() - began < min_seconds:
            return False
        if len(set_of_round) >= max_rounds:
            return True
        quiet, _ = quiet_of(samples, iters_per_round, quiet_level_ms)
        if len(samples) == 1:
            return not until_ci or summarize(in_rounds(samples[0], iters_per_round, quiet)).ci_half_width <= until_ci
        if sum(sum(mask) >= set_rounds for mask in quiet_masks_by_set(quiet, set_of_round)) < sessions:
            return False
        if not until_ci:
            return True
        speedup, (low, high) = speedup_over_sets(quiet_set_speedups(samples, iters_per_round, quiet, set_of_round))
        return (high - low) / (2 * speedup) <= until_ci

    return enough


def time_in_session_sets(runners: Sequence["Runner"], warmup: int, rounds: int, per_set: int, iters_per_round: int,
                         enough: Optional[Callable[[List[List[float]], List[int]], bool]], max_rounds: int
                         ) -> Tuple[List[List[float]], List[int]]:
    """Each runner's samples, ``iters_per_round`` a round, and the session set of each round.

    A set builds every network in two sessions of its own, in the order A B ... B' A', and each round runs
    them in that order, each with one untimed pass first (switching networks is not charged to a timed
    run), half the round's runs in each session. Every other set goes the other way (B A ... A' B'): a
    session's speed depends on when it was built and where it runs in a round, and the orders cancel that.
    Sets of ``per_set`` rounds go on until ``rounds`` rounds were timed and ``enough`` says so, or until
    ``max_rounds``. The first set's first sessions are ``runners`` themselves.
    """
    samples: List[List[float]] = [[] for _ in runners]
    set_of_round: List[int] = []
    head = iters_per_round - iters_per_round // 2  # runs in the first session of each network, each round
    firsts: List["Runner"] = list(runners)
    while True:
        index = len(set(set_of_round))
        order = list(range(len(runners)))[::-1 if index % 2 else 1]
        if index:
            firsts = _built_in_order(lambda k: firsts[k].another(), order)
        seconds = _built_in_order(lambda k: firsts[k].another(), order[::-1])
        for k in order:
            firsts[k].time(warmup, 0)
        for k in order[::-1]:
            seconds[k].time(warmup, 0)
        for _ in range(per_set):
            runs = {k: firsts[k].time(1, head) for k in order}
            tail = {k: seconds[k].time(1, iters_per_round - head) if iters_per_round > head else []
                    for k in order[::-1]}
            for k, collected in enumerate(samples):
                collected.extend(runs[k] + tail[k])
            set_of_round.append(index)
        del seconds  # before the next set's sessions are built
        done = len(set_of_round)
        if done >= max_rounds or (done >= rounds and (enough is None or enough(samples, set_of_round))):
            return samples, set_of_round


def _built_in_order(build: Callable[[int], "Runner"], order: Sequence[int]) -> List["Runner"]:
    """``build(k)`` for each network k, called in ``order``; the list in network order."""
    built = {k: build(k) for k in order}
    return [built[k] for k in range(len(order))]


def set_speedups(samples: Sequence[Sequence[float]], iters_per_round: int, masks: Iterable[Sequence[bool]]
                 ) -> List[float]:
    """The original's median over the compressed network's, in the rounds of each mask that marks any."""
    speedups = []
    for mask in masks:
        original, compressed = (in_rounds(collected, iters_per_round, mask) for collected in samples[:2])
        if original:
            speedups.append(statistics.median(original) / statistics.median(compressed))
    return speedups


def speedup_over_sets(by_set: Sequence[float], original: Optional[TimingStats] = None,
                      compressed: Optional[TimingStats] = None) -> Tuple[float, List[float]]:
    """The speed-up over session sets and its 95% interval: the geometric mean of the sets' figures, with
    Student's t over their logarithms (sets, not rounds, are the independent evidence: a session's own
    speed lasts as long as it does). With one set, its figure, and the range from the two medians' 95%
    intervals (``original``, ``compressed``)."""
    if len(by_set) >= 2:
        logs = [math.log(x) for x in by_set]
        mean = statistics.fmean(logs)
        half = t_quantile_975(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
        return math.exp(mean), [math.exp(mean - half), math.exp(mean + half)]
    assert original is not None and compressed is not None, "one set: the interval comes from the medians"
    speedup = by_set[0] if by_set else original.median_ms / compressed.median_ms
    return speedup, [original.ci_low_ms / compressed.ci_high_ms, original.ci_high_ms / compressed.ci_low_ms]
