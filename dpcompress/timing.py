"""Timing statistics and alternating A/B timing (no torch needed).

A latency is reported as the median of many timed runs, with the standard
deviation as its spread. Two things are compared by alternating short rounds of
each in one process, so that drift (thermal, other load) hits both alike.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Protocol, Sequence


class Timeable(Protocol):
    def time(self, warmup: int, iters: int) -> List[float]: ...


@dataclass(frozen=True)
class TimingStats:
    median_ms: float
    std_ms: float  # population standard deviation of the samples
    min_ms: float
    max_ms: float
    count: int

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)


def summarize(samples_ms: Sequence[float]) -> TimingStats:
    """Median, spread and range of latency samples (ms)."""
    if not samples_ms:
        raise ValueError("no timing samples")
    return TimingStats(
        median_ms=float(statistics.median(samples_ms)),
        std_ms=float(statistics.pstdev(samples_ms)),
        min_ms=float(min(samples_ms)),
        max_ms=float(max(samples_ms)),
        count=len(samples_ms),
    )


def time_runner(runner: Timeable, warmup: int, iters: int) -> TimingStats:
    if iters < 1:
        raise ValueError("iters must be at least 1")
    return summarize(runner.time(warmup, iters))


def alternate(runners: Sequence[Timeable], warmup: int, rounds: int, iters_per_round: int) -> List[List[float]]:
    """Samples of each runner, timed in turns: A×k, B×k, A×k, ... for ``rounds`` rounds.

    Each runner first gets ``warmup`` untimed passes; every round starts with one
    untimed pass of the runner so that switching between models (caches, clocks)
    is not charged to the first timed run.
    """
    if rounds < 1 or iters_per_round < 1:
        raise ValueError("rounds and iters_per_round must be at least 1")
    for runner in runners:
        runner.time(warmup, 0)
    samples: List[List[float]] = [[] for _ in runners]
    for _ in range(rounds):
        for runner, collected in zip(runners, samples):
            collected.extend(runner.time(1, iters_per_round))
    return samples
