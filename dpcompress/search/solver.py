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

Pruning options (LayerMerge's search space): a latency row may prune convs of its block
(replace them by identity), and an importance row gives the value of a segment with exactly
the set P of its convs pruned; P is the union of the options its blocks take. A segment with
P pruned is allowed only where the importance table has its row: a missing row is not worth
the unpruned segment's importance, because then pruning would cost nothing and the DP would
prune every conv that saves time, whatever the damage. ``solve`` and ``frontier`` without an
importance table therefore prune nothing; ``solve_for_model`` (what the CLI and the API call)
prices a table's pruning options as ``importance --method uniform`` does instead
(:func:`uniform_importance`: each segment 1, less 1 for each conv pruned), so that the options a
profile paid for are searched. For each allowed (segment,
P), stage 1 finds the cheapest split in which every block b takes the option pruning exactly
P ∩ b (blocks are disjoint, so these are all the splits whose union is P; ``PrunedStage1``),
and stage 2 chooses among the (segment, P) as it chooses among segments, less those that another
P of the same segment dominates (as fast and as important). The work grows with
the importance rows and their distinct pruned sets, never with the number of pruned sets a
segment could reach; with no pruning anywhere, every step is the two-stage DP's.

numpy only: no torch, no model; it works on tables alone.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from operator import itemgetter
from pathlib import Path
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np

from dpcompress.graph.chain import Chain
from dpcompress.errors import UserError
from dpcompress.graph.plan import Plan
from dpcompress.fileio import PathLike
from dpcompress.tables import (
    Block,
    ImportanceTable,
    LatencyTable,
    Pruned,
    PrunedBlock,
    check_table_against_chain,
    format_pruned,
    write_csv_table,
)

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
    blocks = list(latency)
    block_start = np.fromiter(map(itemgetter(0), blocks), dtype=np.int64, count=len(blocks))
    block_end = np.fromiter(map(itemgetter(1), blocks), dtype=np.int64, count=len(blocks))
    block_latency = np.fromiter(latency.values(), dtype=np.float64, count=len(blocks))
    past = np.flatnonzero(block_end > num_positions)
    if past.size:
        start, end = blocks[past[0]]
        raise ValueError(f"block ({start}, {end}) ends past position {num_positions}")
    # By end, then by start: the blocks ending at one position are one run, starts ascending.
    order = np.lexsort((block_start, block_end))
    block_start, block_end, block_latency = block_start[order], block_end[order], block_latency[order]
    bounds = np.flatnonzero(np.diff(block_end, prepend=-1)).tolist()
    # Stored transposed (row = end position) so that gathering the rows of all block
    # starts for one end is a contiguous read.
    topt_by_end = np.full((n, n), np.inf)
    np.fill_diagonal(topt_by_end, 0.0)
    last_by_end = np.full((n, n), -1, dtype=np.int32)
    for first, stop in zip(bounds, [*bounds[1:], len(blocks)]):
        end = int(block_end[first])
        if end < 1:
            continue
        starts, costs = block_start[first:stop], block_latency[first:stop]
        width = int(starts[-1]) + 1  # segments starting after the last block start cannot end here
        candidates = topt_by_end[starts, :width] + costs[:, None]
        best = candidates.argmin(axis=0)
        best_cost = candidates[best, np.arange(width)]
        reachable = np.isfinite(best_cost)
        topt_by_end[end, :width] = best_cost
        last_by_end[end, :width] = np.where(reachable, starts[best], -1)
    return Stage1Result(topt=np.ascontiguousarray(topt_by_end.T),
                        last_block_start=np.ascontiguousarray(last_by_end.T))


class PrunedStage1:
    """Stage 1 for segments with convs pruned: the cheapest split of segment (start, end) in which
    the blocks' options together prune exactly the set P.

    Every block b of such a split takes the option that prunes exactly P ∩ b (its unpruned row
    where that is empty): the blocks are disjoint, so these are all the splits whose options
    together prune P. Such a split is a chain of pruning blocks, each pruning the next run of P,
    with unpruned stretches between them whose cheapest splits stage 1 has in ``topt``. So for
    every prefix ``done`` of a pruned set (a node of the prefixes' trie: sets sharing leading convs
    share the work) the DP keeps, per segment start and per end of the block that prunes
    ``done[-1]``, the cheapest cost. A block pruning the run ``done[first:]`` extends the prefix
    ``done[:first]`` after an unpruned stretch; the cheapest way from that prefix to every block start
    (a min-plus product of its costs and ``topt``) is taken once per prefix and shared by all the
    blocks and longer prefixes that extend it. All prefixes of one length are computed at once.
    Only the costs are kept: the few splits a plan needs are traced back afterwards by redoing the
    same comparisons for one segment start, in the same order, so ties break the same way.
    """

    def __init__(self, table: LatencyTable, s1: Stage1Result, starts: Iterable[int],
                 pruned_sets: Iterable[Pruned]) -> None:
        self.s1 = s1
        self.starts = np.array(sorted(set(starts)), dtype=np.int64)  # the segment starts computed for
        self._row_of_start = {int(start): row for row, start in enumerate(self.starts)}
        n = s1.topt.shape[0]
        rows = self.starts.size
        # Position n stands for "no block end": nothing reaches it, so it pads each prefix's list of
        # reached block ends to a common length.
        self._topt = np.full((n + 1, n + 1), np.inf)
        self._topt[:n, :n] = s1.topt
        # The table's pruning options as arrays, and each option's rows in the table's order.
        options = list(table.pruned_latency_ms)
        self._block_start = np.fromiter(map(itemgetter(0), options), dtype=np.int64, count=len(options))
        self._block_end = np.fromiter(map(itemgetter(1), options), dtype=np.int64, count=len(options))
        self._block_latency = np.fromiter(table.pruned_latency_ms.values(), dtype=np.float64, count=len(options))
        first_row_of_option: Dict[Pruned, int] = {}
        option_code = np.fromiter(map(first_row_of_option.setdefault, map(itemgetter(2), options), itertools.count()),
                                  dtype=np.int64, count=len(options))
        by_option = np.argsort(option_code, kind="stable")
        bounds = np.flatnonzero(np.diff(option_code[by_option], prepend=-1)).tolist()
        # option -> (first, stop): its rows are by_option[first:stop]
        rows_of_option = dict(zip(map(itemgetter(2), map(options.__getitem__, by_option[bounds].tolist())),
                                  zip(bounds, [*bounds[1:], len(options)])))
        # The trie's nodes by length (every node's proper prefixes come before it); node 0 is ().
        prefixes = sorted({convs[:length] for convs in pruned_sets for length in range(len(convs) + 1)},
                          key=lambda convs: (len(convs), convs))
        self._node_of = {convs: node for node, convs in enumerate(prefixes)}
        # The arrays below are by (node, position, segment start's row), so that what one block or block end
        # needs for every row is contiguous.
        # _reach_of_node[node][k, row]: the cheapest cost of reaching the end _ends_of_node[node][k] (the
        # node's reached block ends, ascending) of a block whose option prunes node[-1], having pruned
        # exactly the node's convs, from the row's segment start (rows past its length: inf).
        self._ends_of_node: List[np.ndarray] = [np.empty(0, dtype=np.int64) for _ in prefixes]
        self._reach_of_node: List[np.ndarray] = [np.empty((0, 0)) for _ in prefixes]
        # _to_block_start[node, b, row]: the cheapest cost of going on unpruned from there to position b:
        # where longer prefixes go on with a block starting at b, or where a segment with the node's convs
        # pruned ends at b (then the segment's cost).
        self._to_block_start = np.full((len(prefixes), n, rows), np.inf)
        self._to_block_start[0] = s1.topt[self.starts].T
        # Each node's candidate blocks in the order ties break in (by the run's start in the node, then
        # the table's order): the node each extends and its row in the table.
        self._candidates: List[Tuple[np.ndarray, np.ndarray]] = [(np.empty(0, dtype=np.int64),) * 2 for _ in prefixes]
        lengths = np.array([len(convs) for convs in prefixes])
        for length in range(1, int(lengths.max(initial=0)) + 1):
            nodes = np.flatnonzero(lengths == length)
            target, parent, option_rows, previous = [], [], [], []
            # Only the rows whose segment starts before some node's first conv can prune it.
            rows_used = int(np.searchsorted(self.starts, max(prefixes[node][0] for node in nodes.tolist())))
            for node in nodes.tolist():
                convs = prefixes[node]
                for first in range(length):  # the block prunes convs[first:]
                    if convs[first:] in rows_of_option:
                        target.append(node)
                        parent.append(self._node_of[convs[:first]])
                        option_rows.append(rows_of_option[convs[first:]])
                        previous.append(convs[first - 1] if first else -1)
            if not option_rows:
                continue
            first_rows, stop_rows = np.array(option_rows, dtype=np.int64).T
            num_blocks = stop_rows - first_rows
            targets, parents = np.repeat(target, num_blocks), np.repeat(parent, num_blocks)
            block_rows = by_option[np.arange(int(num_blocks.sum()))
                                   + np.repeat(first_rows - (np.cumsum(num_blocks) - num_blocks), num_blocks)]
            # A block starting before the conv its prefix pruned last would hold that conv unpruned: every
            # end its prefix reached lies past the block's start, so the block costs inf from every row.
            possible = self._block_start[block_rows] >= np.repeat(previous, num_blocks)
            if not possible.any():
                continue
            targets, parents, block_rows = targets[possible], parents[possible], block_rows[possible]
            block_starts, block_ends = self._block_start[block_rows], self._block_end[block_rows]
            cost = self._to_block_start[parents, block_starts, :rows_used] + self._block_latency[block_rows][:, None]
            # The cheapest candidate per (node, block end), for every row at once.
            order = np.lexsort((block_ends, targets))
            sorted_targets, sorted_ends = targets[order], block_ends[order]
            group_start = np.flatnonzero(np.concatenate(
                ([True], (sorted_targets[1:] != sorted_targets[:-1]) | (sorted_ends[1:] != sorted_ends[:-1]))))
            group_nodes, group_ends = sorted_targets[group_start], sorted_ends[group_start]
            # Each group's place among its node's reached ends (ascending).
            node_bounds = np.flatnonzero(np.diff(group_nodes, prepend=-1))
            num_ends = np.diff(np.append(node_bounds, group_nodes.size))
            place = np.arange(group_nodes.size) - np.repeat(node_bounds, num_ends)
            reach = np.full((nodes.size, int(num_ends.max()), rows_used), np.inf)  # (node in level, end, row)
            reach[group_nodes - nodes[0], place] = np.minimum.reduceat(cost[order], group_start, axis=0)
            for lo, hi in zip(node_bounds.tolist(), [*node_bounds[1:].tolist(), group_nodes.size]):
                node = int(group_nodes[lo])
                self._ends_of_node[node] = group_ends[lo:hi]
                self._reach_of_node[node] = reach[node - nodes[0], :hi - lo]
            # The candidates are by node already (built node by node).
            node_bounds = np.flatnonzero(np.diff(targets, prepend=-1)).tolist()
            for lo, hi in zip(node_bounds, [*node_bounds[1:], targets.size]):
                self._candidates[int(targets[lo])] = (parents[lo:hi], block_rows[lo:hi])
            self._extend(nodes, reach)

    def _extend(self, nodes: np.ndarray, reach: np.ndarray) -> None:
        """_to_block_start of one length's ``nodes`` (ids ascending, consecutive) from their ``reach`` (node,
        reached end, row): for every position b and row (the rows past reach's stay inf), the cheapest of the
        node's reached block ends e plus ``topt[e, b]``."""
        n = self._to_block_start.shape[1]
        rows_used = reach.shape[2]
        # Nodes with the most ends first, so that each step of the running minimum over the ends works
        # on the leading nodes that still have one.
        num_ends = np.array([self._ends_of_node[node].size for node in nodes.tolist()])
        by_num_ends = np.argsort(-num_ends, kind="stable")
        nodes, num_ends, reach = nodes[by_num_ends], num_ends[by_num_ends], reach[by_num_ends]
        ends = _padded([self._ends_of_node[node] for node in nodes.tolist()], n)  # (node, end), as reach
        onward = self._topt[ends, :n]  # (node, end, b)
        best = reach[:, 0, None, :] + onward[:, 0, :, None]  # (node, b, row)
        for column in range(1, ends.shape[1]):
            active = int(np.count_nonzero(num_ends > column))
            np.minimum(best[:active], reach[:active, column, None, :] + onward[:active, column, :, None],
                       out=best[:active])
        self._to_block_start[nodes, :, :rows_used] = best

    def _cheapest_end(self, node: int, row: int, position: int) -> int:
        """The node's reached block end from which going on unpruned to ``position`` is cheapest (the
        first of equals): where the unpruned stretch to ``position`` starts."""
        ends = self._ends_of_node[node]
        return int(ends[(self._reach_of_node[node][:, row] + self._topt[ends, position]).argmin()])

    def costs(self, starts: np.ndarray, ends: np.ndarray, pruned_set: np.ndarray,
              pruned_sets: Sequence[Pruned]) -> np.ndarray:
        """The cheapest split's latency of each segment (starts[k], ends[k]) with pruned_sets[pruned_set[k]]
        (not empty) pruned; inf where no split exists."""
        nodes = np.array([self._node_of[convs] for convs in pruned_sets], dtype=np.int64)[pruned_set]
        return self._to_block_start[nodes, ends, np.searchsorted(self.starts, starts)]

    def split_points(self, start: int, end: int, pruned: Pruned) -> List[int]:
        """The inner block boundaries of the cheapest split of (start, end) with ``pruned`` pruned."""
        row = self._row_of_start[start]
        node = self._node_of[pruned]
        position = self._cheapest_end(node, row, end)  # the end of the last pruning block
        pruning_blocks = []
        while node != 0:
            # The block that reached ``position``: the first cheapest candidate ending there.
            parents, block_rows = self._candidates[node]
            here = np.flatnonzero(self._block_end[block_rows] == position)
            cost = (self._to_block_start[parents[here], self._block_start[block_rows[here]], row]
                    + self._block_latency[block_rows[here]])
            chosen = here[cost.argmin()]
            node, block_start = int(parents[chosen]), int(self._block_start[block_rows[chosen]])
            stretch_start = start if node == 0 else self._cheapest_end(node, row, block_start)
            pruning_blocks.append((stretch_start, block_start, position))
            position = stretch_start
        boundaries = [start]
        for stretch_start_at, block_start_at, block_end in reversed(pruning_blocks):
            if block_start_at != stretch_start_at:
                boundaries += [*self.s1.split_points(stretch_start_at, block_start_at), block_start_at]
            boundaries.append(block_end)
        if end != boundaries[-1]:
            boundaries += [*self.s1.split_points(boundaries[-1], end), end]
        return boundaries[1:-1]


def _padded(rows: Sequence[np.ndarray], pad: int) -> np.ndarray:
    """The rows as one array, each filled up with ``pad`` to the longest's length (at least 1)."""
    sizes = np.array([row.size for row in rows], dtype=np.int64)
    padded = np.full((len(rows), max(int(sizes.max(initial=0)), 1)), pad, dtype=np.int64)
    offsets = np.cumsum(sizes) - sizes
    padded[np.repeat(np.arange(len(rows)), sizes), np.arange(int(sizes.sum())) - np.repeat(offsets, sizes)] = \
        np.concatenate([np.empty(0, dtype=np.int64), *rows])
    return padded


@dataclass
class Segments:
    """Allowed segments grouped by end position. Entry k at ``end`` is the segment
    (``starts_by_end[end][k]``, end) with the convs ``pruned_by_end[end][k]`` pruned (() for none),
    worth ``importance_by_end[end][k]``, whose cheapest split costs ``latency_by_end[end][k]``."""

    num_positions: int
    starts_by_end: Dict[int, np.ndarray]
    importance_by_end: Dict[int, np.ndarray]
    latency_by_end: Dict[int, np.ndarray]
    pruned_by_end: Dict[int, List[Pruned]]
    pruned_stage1: Optional[PrunedStage1] = None  # the splits of the pruned segments, where any

    def count(self) -> int:
        return sum(len(s) for s in self.starts_by_end.values())

    def split_points(self, s1: Stage1Result, start: int, end: int, pruned: Pruned) -> List[int]:
        """The inner block boundaries of the cheapest split of segment (start, end) with ``pruned`` pruned."""
        if not pruned:
            return s1.split_points(start, end)
        assert self.pruned_stage1 is not None
        return self.pruned_stage1.split_points(start, end, pruned)


def pruned_sets(table: LatencyTable, start: int, end: int) -> List[Pruned]:
    """Every set of convs that some split of segment (start, end) into the table's blocks and their
    options prunes (() included where the unpruned blocks cover it), ascending: the (segment, pruned)
    pairs an importance table may give. Their number can grow exponentially with the segment."""
    options: Dict[Block, List[Pruned]] = {}
    for block in table.latency_ms:
        options.setdefault(block, []).append(())
    for block_start, block_end, pruned in table.pruned_latency_ms:
        options.setdefault((block_start, block_end), []).append(pruned)
    reached: Dict[int, Set[Pruned]] = {start: {()}}
    for position in range(start + 1, end + 1):
        sets = {tuple(sorted(before + option))
                for block_start in range(start, position) if block_start in reached
                for option in options.get((block_start, position), ())
                for before in reached[block_start]}
        if sets:
            reached[position] = sets
    return sorted(reached.get(end, ()), key=lambda pruned: (len(pruned), pruned))


def segments_from_table(importance_table: ImportanceTable, s1: Stage1Result, latency_table: LatencyTable,
                        allowed_positions: Optional[Iterable[int]] = None) -> Segments:
    """The importance table's rows as segments, checked against stage 1 and the allowed ends."""
    L = s1.num_positions
    source = importance_table.source
    unpruned, pruned = importance_table.importance, importance_table.pruned_importance
    # Each row as integers (start, end, index of its pruned set in ``sets``; 0 for none), so that the work
    # below is on arrays, whatever the number of rows. The loops over rows run in C (map, fromiter).
    # (The rows are many small objects: each is read once, by the transposing zips.)
    unpruned_starts, unpruned_ends = zip(*unpruned) if unpruned else ((), ())
    pruned_starts, pruned_ends, pruned_convs = zip(*pruned) if pruned else ((), (), ())
    first_row_of_set: Dict[Pruned, int] = {}
    first_row = np.fromiter(map(first_row_of_set.setdefault, pruned_convs, itertools.count()),
                            dtype=np.int64, count=len(pruned_convs))
    set_rows, set_of_row = np.unique(first_row, return_inverse=True)
    sets: List[Pruned] = [(), *(pruned_convs[row] for row in set_rows.tolist())]
    starts = np.array(unpruned_starts + pruned_starts, dtype=np.int64)
    ends = np.array(unpruned_ends + pruned_ends, dtype=np.int64)
    pruned_set = np.concatenate((np.zeros(len(unpruned), dtype=np.int64), set_of_row.reshape(-1) + 1))
    values = np.fromiter(itertools.chain(unpruned.values(), pruned.values()), dtype=np.float64,
                         count=len(unpruned) + len(pruned))
    is_pruned = pruned_set > 0
    # By end, unpruned first, then by start: with no pruning the DP meets its candidates, and breaks
    # ties among them, exactly as the two-stage DP did; at an exact tie an unpruned segment wins.
    order = np.lexsort((starts, is_pruned, ends))
    values, starts, ends, pruned_set, is_pruned = (
        values[order], starts[order], ends[order], pruned_set[order], is_pruned[order])

    def name(row: int) -> str:
        return _segment_name(int(starts[row]), int(ends[row]), sets[pruned_set[row]])

    past = np.flatnonzero(ends > L)
    if past.size:
        raise UserError(f"{source}: {name(past[0])} ends past the latency table's last "
                        f"position {L}; the tables are for different models")
    if allowed_positions is not None:
        allowed = np.zeros(L + 1, dtype=bool)
        allowed[[0, L, *allowed_positions]] = True
        outside = np.flatnonzero(~(allowed[starts] & allowed[ends]))
        if outside.size:
            row = outside[0]
            raise UserError(f"{source}: {name(row)} ends at position "
                            f"{starts[row] if not allowed[starts[row]] else ends[row]}, which holds no removable "
                            "activation in the model")
    latency = s1.topt[starts, ends]
    pruned_stage1 = None
    if is_pruned.any():
        pruned_stage1 = PrunedStage1(latency_table, s1, starts[is_pruned].tolist(), sets[1:])
        latency[is_pruned] = pruned_stage1.costs(starts[is_pruned], ends[is_pruned], pruned_set[is_pruned], sets)
    unsplittable = np.flatnonzero(~np.isfinite(latency))
    if unsplittable.size:
        row = unsplittable[0]
        if is_pruned[row]:
            raise UserError(f"{source}: {name(row)} cannot be split into blocks of the "
                            "latency table with those convs pruned; profile the blocks' pruning options or drop "
                            "the row")
        raise UserError(f"{source}: segment ({starts[row]}, {ends[row]}) cannot be split into blocks of the "
                        "latency table; profile its blocks or drop the row")
    if is_pruned.any():
        keep = _undominated_within_segments(starts, ends, latency, values, is_pruned)
        values, starts, ends, latency, pruned_set = (
            values[keep], starts[keep], ends[keep], latency[keep], pruned_set[keep])
    set_of_index = np.empty(len(sets), dtype=object)
    for index, convs in enumerate(sets):
        set_of_index[index] = convs
    group_start = np.flatnonzero(np.diff(ends, prepend=-1))
    groups = [(int(ends[a]), slice(a, b)) for a, b in zip(group_start, [*group_start[1:], ends.size])]
    return Segments(num_positions=L,
                    starts_by_end={end: starts[rows] for end, rows in groups},
                    importance_by_end={end: values[rows] for end, rows in groups},
                    latency_by_end={end: latency[rows] for end, rows in groups},
                    pruned_by_end={end: set_of_index[pruned_set[rows]].tolist() for end, rows in groups},
                    pruned_stage1=pruned_stage1)


def _undominated_within_segments(starts: np.ndarray, ends: np.ndarray, latency: np.ndarray,
                                 importance: np.ndarray, is_pruned: np.ndarray) -> np.ndarray:
    """Mask of the rows that no other row of the same segment (start, end) dominates (as fast or faster
    and as important or more; of equal rows, the unpruned or else the first). A plan using a dominated
    row does no better than the same plan with the row dominating it, so stage 2 never needs it."""
    segment = ends * (int(starts.max(initial=0)) + 1) + starts  # one integer per (start, end)
    order = np.lexsort((is_pruned, -importance, latency, segment))  # stable: the first of equals first
    group = np.cumsum(np.concatenate(([True], segment[order][1:] != segment[order][:-1]))) - 1
    # Integer keys that order the rows by segment, then by importance (dense ranks, so exact), so that one
    # running maximum gives each row the best importance of the faster rows of its segment before it.
    rank = np.unique(importance, return_inverse=True)[1].reshape(-1)
    key = group * (int(rank.max()) + 1) + rank[order]
    best_before = np.maximum.accumulate(np.concatenate(([-1], key[:-1])))
    keep = np.empty(order.size, dtype=bool)
    keep[order] = key > best_before
    return keep


def _segment_name(start: int, end: int, pruned: Pruned) -> str:
    return f"segment ({start}, {end})" + (f" pruned {format_pruned(pruned)!r}" if pruned else "")


def uniform_importance(table: LatencyTable, allowed_positions: Optional[Iterable[int]] = None
                       ) -> Optional[ImportanceTable]:
    """Uniform importance over the table's pruning options (None where it has none): every segment between
    allowed positions that the table's blocks cover is worth 1, and with P pruned 1 - len(P), as
    ``importance --method uniform`` prices them. A segment's pruned sets are those of its own block where it
    is one, else those of every block on a split of it into the table's blocks (as the importance
    module chooses a segment's rows)."""
    if not table.pruned_latency_ms:
        return None
    L = table.num_positions
    ends = sorted(set(range(L + 1) if allowed_positions is None else allowed_positions) | {0, L})
    options: Dict[Block, List[Pruned]] = {}
    for start, end, pruned in table.pruned_latency_ms:
        options.setdefault((start, end), []).append(pruned)
    blocks = sorted(table.latency_ms)
    importance: Dict[Block, float] = {}
    pruned_importance: Dict[PrunedBlock, float] = {}
    for i in ends:
        reached = {i}
        for a, b in blocks:  # sorted by start: each start is final before it is extended
            if a in reached:
                reached.add(b)
        for j in (j for j in ends if j > i and j in reached):
            importance[(i, j)] = 1.0
            for pruned in _segment_pruned_sets(blocks, table.latency_ms, options, i, j):
                pruned_importance[(i, j, pruned)] = 1.0 - len(pruned)
    return ImportanceTable(importance=importance, source=f"uniform importance over {table.source}'s pruning options",
                           pruned_importance=pruned_importance)


def _segment_pruned_sets(blocks: Sequence[Block], rows: Mapping[Block, float], options: Mapping[Block, List[Pruned]],
                         i: int, j: int) -> Set[Pruned]:
    if (i, j) in rows:
        return set(options.get((i, j), ()))
    return options_on_splits(blocks, lambda block: options.get(block, ()), i, j)


def options_on_splits(blocks: Iterable[Block], options: Callable[[Block], Iterable[Pruned]], start: int, end: int
                      ) -> Set[Pruned]:
    """The pruned sets ``options`` gives the blocks that lie on some split of segment (start, end) into
    ``blocks``: those reached from ``start`` and reaching ``end`` through blocks inside the segment."""
    inside = sorted((a, b) for a, b in blocks if start <= a and b <= end)
    reached, reaching = {start}, {end}
    for a, b in inside:  # sorted by start: each start is final before it is extended
        if a in reached:
            reached.add(b)
    for a, b in sorted(inside, key=lambda block: -block[1]):
        if b in reaching:
            reaching.add(a)
    return {pruned for a, b in inside if a in reached and b in reaching for pruned in options((a, b))}


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
    latency_by_end: Dict[int, np.ndarray] = {}
    pruned_by_end: Dict[int, List[Pruned]] = {}
    for index in range(1, len(ends)):
        end = int(ends[index])
        starts = ends[:index]
        starts = starts[np.isfinite(s1.topt[starts, end])]
        if starts.size:
            starts_by_end[end] = starts
            importance_by_end[end] = np.ones(starts.size)
            latency_by_end[end] = s1.topt[starts, end]
            pruned_by_end[end] = [()] * starts.size
    return Segments(num_positions=L, starts_by_end=starts_by_end, importance_by_end=importance_by_end,
                    latency_by_end=latency_by_end, pruned_by_end=pruned_by_end)


def cheapest_completion(segments: Segments) -> np.ndarray:
    """For every position p, the least latency from p to L through allowed segments (inf: none)."""
    L = segments.num_positions
    to_end = np.full(L + 1, np.inf)
    to_end[L] = 0.0
    # Process ends from the right, relaxing every segment that ends there.
    for end in sorted(segments.starts_by_end, reverse=True):
        if not math.isfinite(to_end[end]):
            continue
        np.minimum.at(to_end, segments.starts_by_end[end], segments.latency_by_end[end] + to_end[end])
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
        return tuple(end for end, _ in self.segments[:-1])

    @property
    def segments(self) -> List[Tuple[int, int]]:
        """The plan's segments in order, each as (end position, its entry among the segments ending there)."""
        return _segment_path(self._store, self._index)


class _Store:
    """Flat growable arrays of partial plans: latency, importance, parent index, end position, and
    which of the segments ending there reached it."""

    def __init__(self, capacity: int = 1024) -> None:
        self.latency = np.empty(capacity)
        self.importance = np.empty(capacity)
        self.parent = np.empty(capacity, dtype=np.int64)
        self.position = np.empty(capacity, dtype=np.int64)
        self.segment = np.empty(capacity, dtype=np.int64)
        self.size = 0

    def append(self, latency: np.ndarray, importance: np.ndarray, parent: np.ndarray, position: int,
               segment: np.ndarray) -> None:
        needed = self.size + latency.size
        if needed > self.latency.size:
            capacity = max(needed, 2 * self.latency.size)
            for name in ("latency", "importance", "parent", "position", "segment"):
                old = getattr(self, name)
                grown = np.empty(capacity, dtype=old.dtype)
                grown[: self.size] = old[: self.size]
                setattr(self, name, grown)
        sl = slice(self.size, needed)
        self.latency[sl], self.importance[sl], self.parent[sl], self.position[sl] = latency, importance, parent, position
        self.segment[sl] = segment
        self.size = needed


def stage2_frontier(segments: Segments, budget_ms: Optional[float] = None) -> List[FrontierPoint]:
    """Pareto frontier of (latency, importance) over all plans, sorted by latency.

    Latencies strictly increase along the frontier and so do importances; of plans with
    equal importance only the fastest is kept. With ``budget_ms``, only points within
    the budget are computed (the frontier's part under the budget is the same).
    """
    L = segments.num_positions
    to_end = cheapest_completion(segments)
    limit = math.inf if budget_ms is None else budget_ms + _PRUNE_SLACK * max(1.0, abs(budget_ms))
    store = _Store()
    first = np.zeros(L + 1, dtype=np.int64)  # frontier of position p: store[first[p]:stop[p]]
    stop = np.zeros(L + 1, dtype=np.int64)
    store.append(np.zeros(1), np.zeros(1), np.full(1, -1), 0, np.full(1, -1))
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
        latency = store.latency[parent] + segments.latency_by_end[end][segment_of]
        importance = store.importance[parent] + segments.importance_by_end[end][segment_of]
        if budget_ms is not None:
            fits = latency + to_end[end] <= limit
            latency, importance, parent, segment_of = latency[fits], importance[fits], parent[fits], segment_of[fits]
            if latency.size == 0:
                continue
        keep = _pareto_indices(latency, importance)
        first[end] = store.size
        store.append(latency[keep], importance[keep], parent[keep], end, segment_of[keep])
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


def _segment_path(store: _Store, index: int) -> List[Tuple[int, int]]:
    path = []
    while index > 0:  # index 0 is the root at position 0
        path.append((int(store.position[index]), int(store.segment[index])))
        index = int(store.parent[index])
    return path[::-1]


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


def build_segments(s1: Stage1Result, importance_table: Optional[ImportanceTable], latency_table: LatencyTable,
                   allowed_positions: Optional[Iterable[int]] = None) -> Segments:
    if importance_table is None:
        return uniform_segments(s1, allowed_positions)
    return segments_from_table(importance_table, s1, latency_table, allowed_positions)


def plan_for_point(point: FrontierPoint, s1: Stage1Result, segments: Segments, table: LatencyTable,
                   budget_ms: Optional[float] = None, solve_seconds: float = 0.0) -> Plan:
    """The full plan of a frontier point: boundaries from stage 1's splits, and its latency
    and importance summed exactly (``math.fsum``) from the tables, as anyone checking it would."""
    boundaries, pruned, importances = [0], [], []
    start = 0
    for end, entry in point.segments:
        segment_pruned = segments.pruned_by_end[end][entry]
        boundaries.extend(segments.split_points(s1, start, end, segment_pruned))
        boundaries.append(end)
        pruned.extend(segment_pruned)
        importances.append(segments.importance_by_end[end][entry])
        start = end
    try:
        original: Optional[float] = table.original_latency_ms()
    except UserError:
        original = None
    plan = Plan(activations=list(point.activations), boundaries=boundaries, num_positions=s1.num_positions,
                model=table.meta.get("model"), chain_fingerprint=table.meta.get("chain_fingerprint"),
                budget_ms=budget_ms, importance=math.fsum(importances), original_latency_ms=original,
                solve_seconds=solve_seconds, pruned=pruned)
    plan.latency_ms = math.fsum([*(table.block_latency(b, e, plan.pruned_in(b, e)) for b, e in plan.blocks),
                                 table.rest_ms])
    return plan


def _check_connected(segments: Segments, s1: Stage1Result, importance_table: Optional[ImportanceTable]) -> float:
    """The smallest achievable latency; a UserError when no allowed segments connect 0 to L."""
    smallest = float(cheapest_completion(segments)[0])
    if not math.isfinite(smallest):
        what = importance_table.source if importance_table is not None else "the allowed positions"
        raise UserError(f"{what}: no sequence of allowed segments runs from position 0 to "
                        f"{segments.num_positions}; add importance rows that connect them")
    return smallest


def frontier(latency_table: LatencyTable, importance_table: Optional[ImportanceTable] = None,
             allowed_positions: Optional[Iterable[int]] = None) -> List[Tuple[float, float, Plan]]:
    """Every Pareto-optimal (latency, importance, plan) of the tables, by increasing latency."""
    s1 = run_stage1(latency_table)
    segments = build_segments(s1, importance_table, latency_table, allowed_positions)
    _check_connected(segments, s1, importance_table)
    plans = _exact_frontier([plan_for_point(p, s1, segments, latency_table) for p in stage2_frontier(segments)])
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
    segments = build_segments(s1, importance_table, latency_table, allowed_positions)
    rest = latency_table.rest_ms  # paid by every plan: the DP works on the blocks' share of the budget
    smallest = _check_connected(segments, s1, importance_table) + rest
    points = stage2_frontier(segments, None if full_frontier else budget_ms - rest)
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


def buildable_rows(table: LatencyTable, chain: Chain) -> LatencyTable:
    """``table`` without the rows of blocks whose merge needs more memory than ``DPCOMPRESS_MAX_MERGE_BYTES``
    allows, so that no plan holds a block that export cannot build. A table profiled under a limit no
    larger (meta ``max_merge_bytes``) has no such row and is returned as is; older tables are checked
    row by row from the chain (``geometry.block_merge_bytes``)."""
    from dpcompress.graph.geometry import block_merge_bytes, max_merge_bytes

    limit = max_merge_bytes()
    profiled_under = table.meta.get("max_merge_bytes")
    if isinstance(profiled_under, int) and profiled_under <= limit:
        return table

    def buildable(start: int, end: int, pruned: Pruned = ()) -> bool:
        return end - start == 1 or block_merge_bytes(chain, start, end, pruned) <= limit

    return replace(table, latency_ms={b: v for b, v in table.latency_ms.items() if buildable(*b)},
                   pruned_latency_ms={b: v for b, v in table.pruned_latency_ms.items() if buildable(*b)})


def solve_for_model(latency_table: LatencyTable, importance_table: Optional[ImportanceTable], budget_ms: float,
                    chain: Optional[Chain] = None, with_frontier: bool = False) -> Tuple[Plan, List[Plan]]:
    """Solve, with segment ends restricted to the chain's activations and the plan tagged with
    its model and fingerprint when a chain is given (or known from the table's meta file, whose
    ``activation_positions`` restrict the ends where there is no chain). Without an importance table, a
    table's pruning options are priced uniformly (:func:`uniform_importance`).

    Returns the plan and, with ``with_frontier``, the plans of the whole frontier.
    """
    allowed = None
    if chain is not None:
        check_table_against_chain(latency_table, chain)
        if latency_table.num_positions != chain.num_positions:
            raise UserError(f"{latency_table.source} covers {latency_table.num_positions} positions but the "
                            f"model has {chain.num_positions} convs; profile this model")
        allowed = chain.activation_positions
        latency_table = buildable_rows(latency_table, chain)
    elif isinstance(latency_table.meta.get("activation_positions"), list):
        allowed = [int(p) for p in latency_table.meta["activation_positions"]]
    if importance_table is None:
        importance_table = uniform_importance(latency_table, allowed)
    if with_frontier:
        plan, plans = solve_with_frontier(latency_table, importance_table, budget_ms, allowed)
    else:
        plan, plans = solve(latency_table, importance_table, budget_ms, allowed), []
    if chain is not None:
        for p in [plan, *plans]:
            p.model = chain.model if chain.model is not None else p.model
            p.chain_fingerprint = chain.fingerprint()
    return plan, plans


def merge_only_frontier(latency_table: LatencyTable, importance_table: Optional[ImportanceTable],
                        chain: Optional[Chain] = None) -> List[Plan]:
    """The frontier of the same tables without their pruning options: merging alone (none where it cannot
    cover the chain)."""
    unpruned = None if importance_table is None else replace(importance_table, pruned_importance={})
    try:
        return solve_for_model(replace(latency_table, pruned_latency_ms={}), unpruned, math.inf, chain,
                               with_frontier=True)[1]
    except UserError:
        return []


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


FRONTIER_COLUMNS = ("latency_ms", "importance", "num_activations", "activations", "boundaries", "pruned")


def write_frontier_csv(path: PathLike, plans: Sequence[Plan]) -> None:
    """The frontier, one plan per row; positions space-separated."""
    write_csv_table(path, FRONTIER_COLUMNS, (
        {"latency_ms": p.latency_ms, "importance": p.importance, "num_activations": len(p.activations),
         "activations": " ".join(map(str, p.activations)), "boundaries": " ".join(map(str, p.boundaries)),
         "pruned": format_pruned(p.pruned)}
        for p in plans))
