"""Seeded random latency and importance tables with pruning options, for the solver's tests (against brute
force, and against its recorded answers). A row is (start, end, pruned convs); latencies and importances
are multiples of 1/8 and 1/4, so that every sum is exact."""

from __future__ import annotations

import itertools
import random
from typing import Dict, List, Optional, Sequence, Tuple

from dpcompress.tables import Pruned

Row = Tuple[int, int, Pruned]  # (start, end, pruned)


def block_options(latency: Dict[Row, float]) -> Dict[Tuple[int, int], List[Pruned]]:
    options: Dict[Tuple[int, int], List[Pruned]] = {}
    for start, end, pruned in latency:
        options.setdefault((start, end), []).append(pruned)
    return options


def splits(latency: Dict[Row, float], start: int, end: int):
    """Every split of (start, end) into blocks with an option each: lists of rows."""
    options = block_options(latency)
    inner = range(start + 1, end)
    for r in range(len(inner) + 1):
        for cuts in itertools.combinations(inner, r):
            ends = [start, *cuts, end]
            blocks = list(zip(ends[:-1], ends[1:]))
            if all(b in options for b in blocks):
                for chosen in itertools.product(*(options[b] for b in blocks)):
                    yield [(b[0], b[1], o) for b, o in zip(blocks, chosen)]


def union(rows: Sequence[Row]) -> Pruned:
    return tuple(sorted(p for _, _, pruned in rows for p in pruned))


def random_instance(rng: random.Random, L: int, with_importance: bool, restrict: bool
                    ) -> Tuple[Dict[Row, float], List[int], Optional[Dict[Row, float]]]:
    """(latency rows, allowed activation positions, importance rows or None)."""
    reducible = [p for p in range(1, L + 1) if rng.random() < 0.6]
    max_span = rng.randint(1, L)
    latency: Dict[Row, float] = {}
    for i in range(L):
        for j in range(i + 1, min(L, i + max_span) + 1):
            if rng.random() > 0.8:
                continue
            if j == i + 1 or rng.random() < 0.85:  # some blocks exist only with convs pruned
                latency[(i, j, ())] = rng.randint(1, 60) / 8
            inside = [p for p in reducible if i < p <= j]
            for size in range(1, len(inside) + 1):
                for pruned in itertools.combinations(inside, size):
                    if rng.random() < 0.5:
                        latency[(i, j, pruned)] = rng.randint(0, 40) / 8
    allowed = sorted(rng.sample(range(1, L), rng.randint(0, L - 1))) if restrict else list(range(1, L))
    importance = None
    if with_importance:
        ends = [0, *allowed, L]
        # Only rows that the latency table can cover: the others are an error (tested in test_solver_pruning).
        importance = {(i, j, pruned): rng.randint(-12, 40) / 4
                      for i, j in itertools.combinations(ends, 2)
                      for pruned in {union(rows) for rows in splits(latency, i, j)}
                      if rng.random() < 0.7}
    return latency, allowed, importance


def unpruned_cover(latency: Dict[Row, float], L: int) -> bool:
    """Whether the unpruned blocks chain 0 to L: the solver requires it, as a table of the original
    network always has it (its single-conv blocks)."""
    reached = {0}
    for i, j, p in sorted(latency):
        if not p and i in reached:
            reached.add(j)
    return L in reached
