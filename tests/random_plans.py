"""Random valid plans for a traced chain, for the exactness tests: activations kept at random, each segment
split at random valid points (blocks small enough to merge quickly), and convs pruned at random."""

from __future__ import annotations

import random
from dataclasses import replace

from dpcompress.graph.chain import Chain
from dpcompress.graph.geometry import block_geometry, greedy_boundaries
from dpcompress.graph.plan import Plan

# Weights per composed (uncropped) block in these tests: keeps them fast; merging itself is
# limited only by DPCOMPRESS_MAX_MERGE_BYTES. VGG11's smallest mergeable pair (128->256->256,
# 5x5) needs the larger cap.
MAX_WEIGHTS = 400_000
MAX_WEIGHTS_VGG = 2_000_000


def small_enough(chain: Chain, i: int, j: int) -> bool:
    g = block_geometry(chain, i, j)
    cap = MAX_WEIGHTS_VGG if "vgg" in (chain.model or "") else MAX_WEIGHTS
    kh, kw = g.composed_kernel
    return j == i + 1 or g.out_channels * g.in_channels // g.groups * kh * kw <= cap


def plan_all_removed(chain: Chain) -> Plan:
    """No activation kept; each block as long as it can be within the weight cap."""
    boundaries = [0]
    while boundaries[-1] < chain.num_positions:
        start = boundaries[-1]
        boundaries.append(max(j for j in range(start + 1, chain.num_positions + 1)
                              if chain.is_valid_block(start, j) and small_enough(chain, start, j)))
    return Plan(activations=[], boundaries=boundaries, num_positions=chain.num_positions)


def random_plan(chain: Chain, seed: int) -> Plan:
    """Keep a random subset of activations; split each segment at random valid points."""
    rng = random.Random(seed)
    kept = sorted(p for p in chain.activation_positions if rng.random() < 0.5)
    ends = [0, *kept, chain.num_positions]
    boundaries = [0]
    for a, b in zip(ends[:-1], ends[1:]):
        position = a
        while position < b:
            options = [j for j in range(position + 1, b + 1)
                       if chain.is_valid_block(position, j) and small_enough(chain, position, j)]
            reachable = [j for j in options if j == b or _coverable(chain, j, b)]
            position = rng.choice(reachable)
            boundaries.append(position)
    return Plan(activations=kept, boundaries=boundaries, num_positions=chain.num_positions)


def _coverable(chain: Chain, start: int, end: int) -> bool:
    try:
        greedy_boundaries(chain, start, end)
        return True
    except ValueError:
        return False


def with_random_pruning(chain: Chain, plan: Plan, seed: int) -> Plan:
    """``plan`` pruning each reducible conv with probability 1/2, and every reducible conv of a few blocks."""
    rng = random.Random(seed)
    reducible = set(chain.reducible_positions())
    pruned = set()
    for start, end in plan.blocks:
        inside = [p for p in range(start + 1, end + 1) if p in reducible]
        everything = rng.random() < 0.2
        pruned.update(p for p in inside if everything or rng.random() < 0.5)
    return replace(plan, pruned=sorted(pruned))
