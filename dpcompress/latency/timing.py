"""Timing statistics, and which rounds of a comparison were quiet (no torch needed).

A latency is reported as the median of many timed runs, with the standard
deviation as its spread. Two things are compared by alternating short rounds of
each in one process, so that drift (thermal, other load) hits both alike.

Alternating is not enough on a shared machine: its speed switches between a quiet
state and loaded ones for seconds to minutes at a time, and a loaded state slows
networks unevenly (mobilenet_v2 by some 30%, its merged versions by 0-15%; docs/journal/RESULTS.md,
"Quiet and loaded phases"), so that a speed-up or a table measured across states depends
on how long each lasted. A reference network timed in every round tells the rounds
apart: a round is quiet when the reference ran within ``QUIET_MARGIN`` of its fastest
tenth of rounds, and figures are taken from quiet rounds.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple


# A round is quiet when the reference ran within this factor of its 10th percentile: the quiet state
# spreads over some 12% on this machine, the loaded one sits 30-40% above it.
QUIET_MARGIN = 1.15
QUIET_QUANTILE = 0.1
# A row is never credited below this fraction of its raw median: the call overhead subtracted from it is
# itself a noisy measurement, which on a tiny conv or network under load can exceed the median.
MIN_KEPT_FRACTION = 0.1
# A network judged by its own rounds (besides the reference) needs this many: with fewer, its fastest
# tenth is its fastest round, and run-to-run noise alone would set rounds apart.
MIN_SELF_JUDGED_ROUNDS = 20


class Timeable(Protocol):
    def time(self, warmup: int, iters: int) -> List[float]: ...


@dataclass(frozen=True)
class TimingStats:
    median_ms: float
    std_ms: float  # population standard deviation of the samples
    min_ms: float
    max_ms: float
    count: int
    ci_low_ms: float = math.nan  # 95% confidence interval of the median (order statistics)
    ci_high_ms: float = math.nan

    @property
    def ci_half_width(self) -> float:
        """Half the width of the median's 95% interval, relative to the median."""
        return (self.ci_high_ms - self.ci_low_ms) / (2 * self.median_ms) if self.median_ms > 0 else math.inf

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)


def kept_latency(median_ms: float, overhead_ms: float) -> float:
    """A median less the call overhead it paid, floored at ``MIN_KEPT_FRACTION`` of the median."""
    return max(median_ms - overhead_ms, MIN_KEPT_FRACTION * median_ms)


def floored(latency_ms: float, overhead_ms: float) -> bool:
    """Whether a latency holds the floor of :func:`kept_latency` rather than the median less the overhead:
    ``max(m - o, f m)`` is the floor exactly when it is below ``o f / (1 - f)``."""
    return latency_ms < overhead_ms * MIN_KEPT_FRACTION / (1 - MIN_KEPT_FRACTION)


def median_interval(samples_ms: Sequence[float], z: float = 1.96) -> Tuple[float, float]:
    """Distribution-free 95% interval of the median: the order statistics n/2 -+ z*sqrt(n)/2
    (normal approximation of the binomial); the whole range where there are too few samples."""
    ordered = sorted(samples_ms)
    n = len(ordered)
    half = z * math.sqrt(n) / 2
    low, high = int(math.floor(n / 2 - half)), int(math.ceil(n / 2 + half))
    return float(ordered[max(low, 0)]), float(ordered[min(high, n - 1)])


def summarize(samples_ms: Sequence[float]) -> TimingStats:
    """Median, spread, range and the median's 95% interval of latency samples (ms)."""
    if not samples_ms:
        raise ValueError("no timing samples")
    low, high = median_interval(samples_ms)
    return TimingStats(
        median_ms=float(statistics.median(samples_ms)),
        std_ms=float(statistics.pstdev(samples_ms)),
        min_ms=float(min(samples_ms)),
        max_ms=float(max(samples_ms)),
        count=len(samples_ms),
        ci_low_ms=low,
        ci_high_ms=high,
    )


# Student's t at 97.5% for 1-30 degrees of freedom (a two-sided 95% interval); the normal's 1.96 beyond.
_T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
          2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(degrees_of_freedom: int) -> float:
    """The 97.5% quantile of Student's t (two-sided 95% intervals of a mean)."""
    if degrees_of_freedom < 1:
        raise ValueError("at least one degree of freedom")
    return _T_975[degrees_of_freedom - 1] if degrees_of_freedom <= len(_T_975) else 1.96


def time_runner(runner: Timeable, warmup: int, iters: int) -> TimingStats:
    if iters < 1:
        raise ValueError("iters must be at least 1")
    return summarize(runner.time(warmup, iters))


def quiet_level(reference_ms: Sequence[float]) -> float:
    """The reference's quiet level: the 10th percentile of its round medians (the lower of the
    two order statistics around it, so that a handful of rounds gives their fastest)."""
    if not reference_ms:
        raise ValueError("no reference rounds")
    ordered = sorted(reference_ms)
    return float(ordered[int(QUIET_QUANTILE * (len(ordered) - 1))])


def quiet_rounds(reference_ms: Sequence[float], level: Optional[float] = None, both_sides: bool = False) -> List[bool]:
    """Which rounds were quiet: the reference's median in that round within ``QUIET_MARGIN`` of
    ``level`` (by default :func:`quiet_level` of these rounds); with ``both_sides``, not faster than
    ``level`` by more than that either (the state of a level measured elsewhere, and no other)."""
    level = quiet_level(reference_ms) if level is None else level
    low = level / QUIET_MARGIN if both_sides else 0.0
    return [low <= ms <= QUIET_MARGIN * level for ms in reference_ms]


def calm_rounds(samples_ms: Sequence[float], per_round: int) -> List[bool]:
    """Which rounds a network itself ran near its fastest tenth of rounds in (``quiet_rounds`` of its
    round medians); every round where it has fewer than MIN_SELF_JUDGED_ROUNDS."""
    medians = round_medians(samples_ms, per_round)
    return quiet_rounds(medians) if len(medians) >= MIN_SELF_JUDGED_ROUNDS else [True] * len(medians)


def round_medians(samples_ms: Sequence[float], per_round: int) -> List[float]:
    """The median of each round of ``per_round`` consecutive samples."""
    return [float(statistics.median(samples_ms[i:i + per_round])) for i in range(0, len(samples_ms), per_round)]


def in_rounds(samples_ms: Sequence[float], per_round: int, keep: Sequence[bool]) -> List[float]:
    """The samples of the rounds ``keep`` marks."""
    return [ms for i, ms in enumerate(samples_ms) if keep[i // per_round]]
