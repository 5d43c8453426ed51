"""The two-stage dynamic program (Kim et al., ICML 2023), exact over real-valued latencies.

Stage 1: for every segment (i, j), the cheapest split into valid blocks,
``Topt[i, j] = min(T[i, j], min_k Topt[i, k] + T[k, j])``, computed for all starts at
once, one end position at a time.

Stage 2: choose kept activations 0 = a0 < ... < ak = L maximising the summed segment
importance with the summed ``Topt`` within the budget. Instead of discretising the
budget, the DP carries, for every position, the Pareto frontier of (latency, importance)
over all ways to reach it; dominated partial plans are dropped. The frontier at L is the
whole latency/importance trade-off in one pass, and the answer for a budget is its best
point under that budget: exactly optimal, never over budget, and among equally
important plans the fastest. With a budget, partial plans that cannot reach L within it
are pruned early (using the exact cheapest completion), which keeps the frontiers small.

numpy only: no torch, no model; it works on tables alone.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from dpcompress.graph.chain import Chain
from dpcompress.errors import UserError
from dpcompress.search.plan import Plan
from dpcompress.fileio import PathLike
from dpcompress.tables import Block, ImportanceTable, LatencyTable, check_table_against_chain, write_csv_table

# Partial plans whose cheapest completion exceeds the budget by more than this
# relative slack are pruned; the slack only guards against float summation order,
# the final choice compares against the budget itself.
_PRUNE_SLACK = 1e-9
# A plan may exceed the budget by this relative amount (float summation order, a budget
# typed back from a printed latency with 10 significant digits), and no more.
_BUDGET_SLACK = 1e-9


@dataclass
class Stage1Result:
    """Cheapest splits of every segment: ``topt[i, j]`` (inf when no split exists) and,
    in ``last_block_start[i, j]``, where the last block of that split starts (-1: none)."""

    topt: np.ndarray  # float64 (L+1, L+1)
    last_block_start: np.ndarray  # int32 (L+1, L+1)

    @property
    def num_positions(self) -> int:
        return self.topt.shape[0] - 1

    def split_points(self, start: int, end: int) -> List[int]:
        """The inner block boundaries of the cheapest split of segment (start, end), ascending."""
        points: List[int] = []
        position = end
        while position != start:
            block_start = int(self.last_block_start[start, position])
            if block_start < 0:
                raise ValueError(f"segment ({start}, {end}) has no split into valid blocks")
            if block_start != start:
                points.append(block_start)
            position = block_start
        return points[::-1]


def stage1(latency: Mapping[Block, float], num_positions: int) -> Stage1Result:
    """Cheapest split of every segment (i, j) of positions 0..L into the blocks of ``latency``."""
    n = num_positions + 1
    starts_by_end: Dict[int, List[int]] = {}
    for (start, end) in latency:
        if end > num_positions:
            raise ValueError(f"block ({start}, {end}) ends past position {num_positions}")
        starts_by_end.setdefault(end, []).append(start)
    # Stored transposed (row = end position) so that gathering the rows of all block
    # starts for one end is a contiguous read.
    topt_by_end = np.full((n, n), np.inf)
    np.fill_diagonal(topt_by_end, 0.0)
    last_by_end = np.full((n, n), -1, dtype=np.int32)
    for end in range(1, n):
        starts = np.array(sorted(starts_by_end.get(end, ())), dtype=np.int64)
        if starts.size == 0:
            continue
        costs = np.array([latency[(int(s), end)] for s in starts])
        width = int(starts[-1]) + 1  # segments starting after the last block start cannot end here
        candidates = topt_by_end[starts, :width] + costs[:, None]
        best = candidates.argmin(axis=0)
        best_cost = candidates[best, np.arange(width)]
        reachable = np.isfinite(best_cost)
        topt_by_end[end, :width] = best_cost
        last_by_end[end, :width] = np.where(reachable, starts[best], -1)
    return Stage1Result(topt=np.ascontiguousarray(topt_by_end.T),
                        last_block_start=np.ascontiguousarray(last_by_end.T))


@dataclass
class Segments:
    """Allowed segments grouped by end position: starts and importance of each."""

    num_positions: int
    starts_by_end: Dict[int, np.ndarray]
    importance_by_end: Dict[int, np.ndarray]

    def count(self) -> int:
        return sum(len(s) for s in self.starts_by_end.values())

    def importance_of(self, start: int, end: int) -> float:
        starts = self.starts_by_end[end]  # ascending
        return float(self.importance_by_end[end][np.searchsorted(starts, start)])


def segments_from_table(importance: Mapping[Block, float], s1: Stage1Result,
                        allowed_positions: Optional[Iterable[int]] = None,
                        source: str = "importance table") -> Segments:
    """The importance table's rows as segments, checked against stage 1 and the allowed ends."""
    L = s1.num_positions
    allowed = None if allowed_positions is None else set(allowed_positions) | {0, L}
    grouped: Dict[int, List[Tuple[int, float]]] = {}
    for (start, end), value in sorted(importance.items()):
        if end > L:
            raise UserError(f"{source}: segment ({start}, {end}) ends past the latency table's last "
                            f"position {L}; the tables are for different models")
        if allowed is not None and not (start in allowed and end in allowed):
            bad = start if start not in allowed else end
            raise UserError(f"{source}: segment ({start}, {end}) ends at position {bad}, "
                            "which holds no removable activation in the model")
        if not math.isfinite(s1.topt[start, end]):
            raise UserError(f"{source}: segment ({start}, {end}) cannot be split into blocks of the "
                            "latency table; profile its blocks or drop the row")
        grouped.setdefault(end, []).append((start, value))
    return Segments(
        num_positions=L,
        starts_by_end={e: np.array([s for s, _ in rows], dtype=np.int64) for e, rows in grouped.items()},
        importance_by_end={e: np.array([v for _, v in rows], dtype=np.float64) for e, rows in grouped.items()},
    )


def uniform_segments(s1: Stage1Result, allowed_positions: Optional[Iterable[int]] = None) -> Segments:
    """Every segment between allowed positions that stage 1 can cover, each worth 1.

    Maximising the total then maximises the number of kept activations.
    """
    L = s1.num_positions
    if allowed_positions is None:
        ends = np.arange(L + 1)
    else:
        ends = np.array(sorted(set(allowed_positions) | {0, L}), dtype=np.int64)
    starts_by_end: Dict[int, np.ndarray] = {}
    importance_by_end: Dict[int, np.ndarray] = {}
    for index in range(1, len(ends)):
        end = int(ends[index])
        starts = ends[:index]
        starts = starts[np.isfinite(s1.topt[starts, end])]
        if starts.size:
            starts_by_end[end] = starts
            importance_by_end[end] = np.ones(starts.size)
    return Segments(num_positions=L, starts_by_end=starts_by_end, importance_by_end=importance_by_end)


def cheapest_completion(s1: Stage1Result, segments: Segments) -> np.ndarray:
    """For every position p, the least latency from p to L through allowed segments (inf: none)."""
    L = segments.num_positions
    to_end = np.full(L + 1, np.inf)
    to_end[L] = 0.0
    # Process ends from the right, relaxing every segment that ends there.
    for end in sorted(segments.starts_by_end, reverse=True):
        if not math.isfinite(to_end[end]):
            continue
        starts = segments.starts_by_end[end]
        np.minimum.at(to_end, starts, s1.topt[starts, end] + to_end[end])
    return to_end


@dataclass
class FrontierPoint:
    """One Pareto-optimal plan: its latency and importance as the DP summed them."""

    latency_ms: float
    importance: float
    _store: "_Store" = field(repr=False)
    _index: int = field(repr=False)

    @property
    def activations(self) -> Tuple[int, ...]:
        """The kept activations (without 0 and L), read back along the DP's parent links."""
        return _activations(self._store, self._index)


class _Store:
    """Flat growable arrays of partial plans: latency, importance, parent index, end position."""

    def __init__(self, capacity: int = 1024) -> None:
        self.latency = np.empty(capacity)
        self.importance = np.empty(capacity)
        self.parent = np.empty(capacity, dtype=np.int64)
        self.position = np.empty(capacity, dtype=np.int64)
        self.size = 0

    def append(self, latency: np.ndarray, importance: np.ndarray, parent: np.ndarray, position: int) -> None:
        needed = self.size + latency.size
        if needed > self.latency.size:
            capacity = max(needed, 2 * self.latency.size)
            for name in ("latency", "importance", "parent", "position"):
                old = getattr(self, name)
                grown = np.empty(capacity, dtype=old.dtype)
                grown[: self.size] = old[: self.size]
                setattr(self, name, grown)
        sl = slice(self.size, needed)
        self.latency[sl], self.importance[sl], self.parent[sl], self.position[sl] = latency, importance, parent, position
        self.size = needed


def stage2_frontier(s1: Stage1Result, segments: Segments,
                    budget_ms: Optional[float] = None) -> List[FrontierPoint]:
    """Pareto frontier of (latency, importance) over all plans, sorted by latency.

    Latencies strictly increase along the frontier and so do importances; of plans with
    equal importance only the fastest is kept. With ``budget_ms``, only points within
    the budget are computed (the frontier's part under the budget is the same).
    """
    L = segments.num_positions
    to_end = cheapest_completion(s1, segments)
    limit = math.inf if budget_ms is None else budget_ms + _PRUNE_SLACK * max(1.0, abs(budget_ms))
    store = _Store()
    first = np.zeros(L + 1, dtype=np.int64)  # frontier of position p: store[first[p]:stop[p]]
    stop = np.zeros(L + 1, dtype=np.int64)
    store.append(np.zeros(1), np.zeros(1), np.full(1, -1), 0)
    stop[0] = 1 if to_end[0] <= limit else 0
    for end in sorted(segments.starts_by_end):
        if not to_end[end] <= limit:  # cannot be completed (within the budget)
            continue
        starts = segments.starts_by_end[end]
        lengths = stop[starts] - first[starts]
        total = int(lengths.sum())
        if total == 0:
            continue
        segment_of = np.repeat(np.arange(starts.size), lengths)
        offsets = np.cumsum(lengths) - lengths
        parent = first[starts][segment_of] + (np.arange(total) - offsets[segment_of])
        latency = store.latency[parent] + s1.topt[starts, end][segment_of]
        importance = store.importance[parent] + segments.importance_by_end[end][segment_of]
        if budget_ms is not None:
            fits = latency + to_end[end] <= limit
            latency, importance, parent = latency[fits], importance[fits], parent[fits]
            if latency.size == 0:
                continue
        keep = _pareto_indices(latency, importance)
        first[end] = store.size
        store.append(latency[keep], importance[keep], parent[keep], end)
        stop[end] = store.size
    points = []
    for index in range(int(first[L]), int(stop[L])):
        if store.latency[index] > limit:
            break
        points.append(FrontierPoint(float(store.latency[index]), float(store.importance[index]), store, index))
    return points


def _pareto_indices(latency: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated points, by increasing latency.

    Of points with equal latency only the most important counts (the first of equals).
    """
    # The candidates are runs already sorted by latency, which a stable sort merges fast.
    order = np.argsort(latency, kind="stable")
    sorted_latency, sorted_importance = latency[order], importance[order]
    group_start = np.flatnonzero(np.concatenate(([True], sorted_latency[1:] != sorted_latency[:-1])))
    group_max = np.maximum.reduceat(sorted_importance, group_start)
    best_before = np.maximum.accumulate(np.concatenate(([-np.inf], group_max[:-1])))
    group_of = np.repeat(np.arange(group_start.size), np.diff(np.append(group_start, latency.size)))
    # Each group's representative: its first most important point.
    is_max = np.flatnonzero(sorted_importance == group_max[group_of])
    first_max = is_max[np.concatenate(([True], group_of[is_max][1:] != group_of[is_max][:-1]))]
    return order[first_max[group_max > best_before]]


def _activations(store: _Store, index: int) -> Tuple[int, ...]:
    positions = []
    index = int(store.parent[index])
    while index > 0:  # index 0 is the root at position 0
        positions.append(int(store.position[index]))
        index = int(store.parent[index])
    return tuple(positions[::-1])


# ---- the library entry points used by the CLI and the other stages ----

def original_latency(table: LatencyTable) -> float:
    """Latency of the uncompressed network: the sum of its single-conv blocks."""
    return table.original_latency_ms()


def run_stage1(table: LatencyTable) -> Stage1Result:
    """Stage 1 on a table, with a UserError when no chain of blocks covers 0..L."""
    s1 = stage1(table.latency_ms, table.num_positions)
    if not math.isfinite(s1.topt[0, table.num_positions]):
        reached = int(np.flatnonzero(np.isfinite(s1.topt[0]))[-1])
        raise UserError(f"{table.source}: no chain of blocks runs from position 0 to {table.num_positions}; "
                        f"nothing starting at or before position {reached} reaches further; "
                        "add the missing rows")
    return s1


def build_segments(s1: Stage1Result, importance_table: Optional[ImportanceTable],
                   allowed_positions: Optional[Iterable[int]] = None) -> Segments:
    if importance_table is None:
        return uniform_segments(s1, allowed_positions)
    return segments_from_table(importance_table.importance, s1, allowed_positions, importance_table.source)


def plan_for_point(point: FrontierPoint, s1: Stage1Result, segments: Segments, table: LatencyTable,
                   budget_ms: Optional[float] = None, solve_seconds: float = 0.0) -> Plan:
    """The full plan of a frontier point: boundaries from stage 1's splits, and its latency
    and importance summed exactly (``math.fsum``) from the tables, as anyone checking it would."""
    L = s1.num_positions
    ends = [0, *point.activations, L]
    boundaries = [0]
    for start, end in zip(ends[:-1], ends[1:]):
        boundaries.extend(s1.split_points(start, end))
        boundaries.append(end)
    latency = math.fsum([*(table.latency_ms[block] for block in zip(boundaries[:-1], boundaries[1:])),
                         table.rest_ms])
    importance = math.fsum(segments.importance_of(start, end) for start, end in zip(ends[:-1], ends[1:]))
    try:
        original: Optional[float] = table.original_latency_ms()
    except UserError:
        original = None
    return Plan(activations=list(point.activations), boundaries=boundaries, num_positions=L,
                model=table.meta.get("model"), chain_fingerprint=table.meta.get("chain_fingerprint"),
                budget_ms=budget_ms, latency_ms=latency, importance=importance,
                original_latency_ms=original, solve_seconds=solve_seconds)


def _check_connected(segments: Segments, s1: Stage1Result, importance_table: Optional[ImportanceTable]) -> float:
    """The smallest achievable latency; a UserError when no allowed segments connect 0 to L."""
    smallest = float(cheapest_completion(s1, segments)[0])
    if not math.isfinite(smallest):
        what = importance_table.source if importance_table is not None else "the allowed positions"
        raise UserError(f"{what}: no sequence of allowed segments runs from position 0 to "
                        f"{segments.num_positions}; add importance rows that connect them")
    return smallest


def frontier(latency_table: LatencyTable, importance_table: Optional[ImportanceTable] = None,
             allowed_positions: Optional[Iterable[int]] = None) -> List[Tuple[float, float, Plan]]:
    """Every Pareto-optimal (latency, importance, plan) of the tables, by increasing latency."""
    s1 = run_stage1(latency_table)
    segments = build_segments(s1, importance_table, allowed_positions)
    _check_connected(segments, s1, importance_table)
    plans = _exact_frontier([plan_for_point(p, s1, segments, latency_table) for p in stage2_frontier(s1, segments)])
    return [(plan.latency_ms, plan.importance, plan) for plan in plans]  # type: ignore[misc]


def _exact_frontier(plans: List[Plan]) -> List[Plan]:
    """Drop the points that the exact sums show dominated (the DP's sums can differ in the last bit)."""
    if not plans:
        return plans
    keep = _pareto_indices(np.array([p.latency_ms for p in plans]), np.array([p.importance for p in plans]))
    return [plans[i] for i in keep]


def solve(latency_table: LatencyTable, importance_table: Optional[ImportanceTable], budget_ms: float,
          allowed_positions: Optional[Iterable[int]] = None) -> Plan:
    """The plan maximising importance within ``budget_ms`` (uniform importance when None)."""
    return _solve(latency_table, importance_table, budget_ms, allowed_positions, full_frontier=False)[0]


def solve_with_frontier(latency_table: LatencyTable, importance_table: Optional[ImportanceTable],
                        budget_ms: float, allowed_positions: Optional[Iterable[int]] = None
                        ) -> Tuple[Plan, List[Plan]]:
    """The plan for ``budget_ms`` and the plans of the whole frontier, from one solve."""
    chosen, points, s1, segments = _solve(latency_table, importance_table, budget_ms, allowed_positions,
                                          full_frontier=True)
    return chosen, _exact_frontier([plan_for_point(p, s1, segments, latency_table) for p in points])


def _solve(latency_table: LatencyTable, importance_table: Optional[ImportanceTable], budget_ms: float,
           allowed_positions: Optional[Iterable[int]], full_frontier: bool
           ) -> Tuple[Plan, List[FrontierPoint], Stage1Result, Segments]:
    began = time.perf_counter()
    s1 = run_stage1(latency_table)
    segments = build_segments(s1, importance_table, allowed_positions)
    rest = latency_table.rest_ms  # paid by every plan: the DP works on the blocks' share of the budget
    smallest = _check_connected(segments, s1, importance_table) + rest
    points = stage2_frontier(s1, segments, None if full_frontier else budget_ms - rest)
    # The DP's sums may differ from the exact sums in the last bits, so the final check against
    # the budget uses each candidate's exact latency, best importance first, and forgives a
    # difference of summation order (a budget typed back from the smallest latency printed
    # below must give a plan).
    limit = budget_ms + _BUDGET_SLACK * max(1.0, abs(budget_ms))
    for point in reversed(points):
        if point.latency_ms + rest > limit:
            continue
        plan = plan_for_point(point, s1, segments, latency_table, budget_ms)
        if plan.latency_ms <= limit:  # type: ignore[operator]
            plan.solve_seconds = time.perf_counter() - began
            return plan, points, s1, segments
    raise UserError(f"budget {budget_ms:.10g} ms is below the smallest achievable latency "
                    f"{smallest:.10g} ms; raise the budget")


def resolve_budget(table: LatencyTable, budget_ms: Optional[float], budget_ratio: Optional[float]) -> float:
    """``--budget-ms X`` or ``--budget-ratio R`` (R times the original latency): exactly one."""
    if (budget_ms is None) == (budget_ratio is None):
        raise UserError("give exactly one of --budget-ms and --budget-ratio")
    if budget_ratio is not None:
        if not budget_ratio > 0:
            raise UserError(f"--budget-ratio must be positive, got {budget_ratio}")
        return budget_ratio * table.original_latency_ms()
    assert budget_ms is not None
    if not math.isfinite(budget_ms):
        raise UserError(f"--budget-ms must be a finite number, got {budget_ms}")
    return budget_ms


def solve_for_model(latency_table: LatencyTable, importance_table: Optional[ImportanceTable], budget_ms: float,
                    chain: Optional[Chain] = None, with_frontier: bool = False) -> Tuple[Plan, List[Plan]]:
    """Solve, with segment ends restricted to the chain's activations and the plan tagged with
    its model and fingerprint when a chain is given (or known from the table's meta file).

    Returns the plan and, with ``with_frontier``, the plans of the whole frontier.
    """
    allowed = None
    if chain is not None:
        check_table_against_chain(latency_table, chain)
        if latency_table.num_positions != chain.num_positions:
            raise UserError(f"{latency_table.source} covers {latency_table.num_positions} positions but the "
                            f"model has {chain.num_positions} convs; profile this model")
        allowed = chain.activation_positions
    if with_frontier:
        plan, plans = solve_with_frontier(latency_table, importance_table, budget_ms, allowed)
    else:
        plan, plans = solve(latency_table, importance_table, budget_ms, allowed), []
    if chain is not None:
        for p in [plan, *plans]:
            p.model = chain.model if chain.model is not None else p.model
            p.chain_fingerprint = chain.fingerprint()
    return plan, plans


def load_chain(path: PathLike) -> Chain:
    """A chain from ``dpcompress trace --json`` output."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as err:
        raise UserError(f"cannot read chain {path}: {err.strerror or err}") from err
    except ValueError as err:
        raise UserError(f"{path}: not valid JSON ({err}); regenerate it with `dpcompress trace --json`") from err
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object; regenerate it with `dpcompress trace --json`")
    return Chain.from_json(data)


FRONTIER_COLUMNS = ("latency_ms", "importance", "num_activations", "activations", "boundaries")


def write_frontier_csv(path: PathLike, plans: Sequence[Plan]) -> None:
    """The frontier, one plan per row; positions space-separated."""
    write_csv_table(path, FRONTIER_COLUMNS, (
        {"latency_ms": p.latency_ms, "importance": p.importance, "num_activations": len(p.activations),
         "activations": " ".join(map(str, p.activations)), "boundaries": " ".join(map(str, p.boundaries))}
        for p in plans))
