"""Blocks timed inside whole networks, as a deployed network pays for them.

A block timed alone is timed cache-hot (its weights stay in cache from one run to
the next), pays the layout conversions at its edges, and pays a runtime call of its
own; inside a network none of that holds (docs/journal/RESULTS.md, "Where predictions
went wrong"). So the profiler builds whole networks instead: the model with a set of
disjoint blocks each replaced by its merged convolution (random weights of the
block's geometry: latency does not depend on their values) and single convs
elsewhere, and reads each block's time from the runtime's per-node profiler.

The profiler's own bookkeeping slows every node a little; each network is therefore
also timed without it, in alternating rounds, and its node times are scaled so that
they add up to that plain latency less the call overhead. What the blocks do not
account for (the head, pooling, layout conversions, the call) is the network's rest,
taken from the network of single convs: the original.

A shared machine switches between a quiet state and loaded ones for seconds to minutes at a
time, and a loaded state slows some blocks far more than others, so a table
whose networks were timed partly in each would price them against each other wrongly.
With an ``Anchor`` (the network of single convs, run plainly between rounds), each round
is known quiet or loaded (``timing.quiet_rounds``, against the anchor's quiet level over
the whole profile), a network short of quiet rounds gets more, and its blocks are read
from the rounds that were quiet for the anchor and in which the network itself ran near
its fastest tenth of rounds. Rounds are judged against the level known so far, so a profile
that starts in a loaded state takes it for quiet until a quiet state shows; each network's
anchor level (``NetworkTiming.anchor_ms``) lets the profiler judge it again at the end.

A block may have convs pruned (LayerMerge's search space): blocks are then keyed
``(start, end, pruned)`` and the network holds the merged conv of the convs that remain. A
block with every conv pruned and no shortcut inside (``BlockGeometry.identity``) is no node of
the network at all: nothing to time (the profiler gives it latency 0 without building it), and
no name in the profiled parts.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

from dpcompress.graph.chain import Chain
from dpcompress.graph.geometry import BlockGeometry
from dpcompress.latency.timing import calm_rounds, in_rounds, kept_latency, quiet_level, quiet_rounds, summarize
from dpcompress.memory import release_freed_memory
from dpcompress.graph.plan import Plan
from dpcompress.tables import Pruned

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn

    from dpcompress.backends import Backend, NetworkProfile, Runner
    from dpcompress.graph.trace import TracedModel

Block = Tuple[int, int]
Option = Tuple[int, int, Pruned]  # a block and the convs it prunes (() for none)
# Recorded runs of a network stop after about this many seconds (at least MIN_ROUNDS rounds).
SECONDS_PER_NETWORK = 3.0
MIN_ROUNDS = 3
MAX_ITERS_PER_ROUND = 10


def packed_plan(chain: Chain, blocks: Sequence[Block], pruned: Sequence[int] = ()) -> Plan:
    """A plan with ``blocks`` (disjoint) merged, the convs at ``pruned`` (inside them) replaced by
    identity, and every other conv on its own; activations kept wherever they are not inside a block."""
    L = chain.num_positions
    inside = {p for start, end in blocks for p in range(start + 1, end)}
    if len(inside) != sum(end - start - 1 for start, end in blocks):
        raise ValueError(f"blocks overlap: {sorted(blocks)}")
    boundaries = [p for p in range(L + 1) if p not in inside]
    activations = [p for p in chain.activation_positions if p not in inside and 0 < p < L]
    return Plan(activations=activations, boundaries=boundaries, num_positions=L, pruned=sorted(pruned))


def geometry_conv(geometry: BlockGeometry, weight: Optional["torch.nn.Parameter"] = None) -> "torch.nn.Module":
    """The merged convolution of a block as an ``nn.Conv2d`` with random weights, or sharing
    ``weight`` where that has the conv's weight shape (a zero bias then, where it has one)."""
    import torch
    from torch import nn

    g = geometry
    shape = (g.out_channels, g.in_channels // g.groups, *g.kernel)
    if weight is None or tuple(weight.shape) != shape:
        return nn.Conv2d(g.in_channels, g.out_channels, g.kernel, stride=g.stride, padding=g.padding,
                         groups=g.groups, bias=g.bias).eval()
    conv = nn.Conv2d(g.in_channels, g.out_channels, g.kernel, stride=g.stride, padding=g.padding,
                     groups=g.groups, bias=g.bias, device="meta")
    conv.weight = weight
    if g.bias:
        conv.bias = nn.Parameter(torch.zeros(g.out_channels, dtype=weight.dtype, device=weight.device))
    return conv.eval()


def packed_network(traced: "TracedModel", plan: Plan,
                   geometries: Dict[Option, BlockGeometry]) -> Tuple["torch.nn.Module", Dict[str, Option]]:
    """The model with each block of ``plan`` one random conv of its geometry (keyed by the block and
    the convs the plan prunes in it); and the block of each submodule name. An identity block is no
    node, so it has no name."""
    from torch import nn

    from dpcompress.graph.rewrite import BLOCK_PREFIX, rewrite_blocks

    options = [(start, end, plan.pruned_in(start, end)) for start, end in plan.blocks]

    def make_block(start: int, end: int) -> "torch.nn.Module":
        geometry = geometries[(start, end, plan.pruned_in(start, end))]
        if geometry.identity:
            return nn.Identity()
        # A single conv's block shares the model's weight: then a network of single convs (the
        # original) holds no weights beyond the model's, and the others only their merged convs'.
        own = traced.gm.get_submodule(traced.unit_nodes(end).conv.target) if end - start == 1 else None
        return geometry_conv(geometry, getattr(own, "weight", None))

    holder = copy.copy(traced.gm)
    holder._modules = dict(traced.gm._modules)  # new blocks go here, not into the traced model
    network = rewrite_blocks(traced, plan, holder, make_block)
    names = {f"{BLOCK_PREFIX}{index}": option for index, option in enumerate(options)
             if not geometries[option].identity}
    return network.eval(), names


def pack(items: Sequence[Sequence[Tuple[int, ...]]],
         max_networks: int) -> Tuple[List[List[Tuple[int, ...]]], List[Sequence[Tuple[int, ...]]]]:
    """First-fit of ``items`` into at most ``max_networks`` sets of disjoint blocks (``(start, end, ...)``), in
    the given order, each item placed as the first of its alternative blocks that fits (a shape times alike
    at any of its positions); the items that fit nowhere are returned for a later round."""
    networks: List[List[Tuple[int, ...]]] = []
    left: List[Sequence[Tuple[int, ...]]] = []
    for alternatives in items:
        spot = next(((members, block) for members in networks for block in alternatives
                     if all(block[1] <= other[0] or other[1] <= block[0] for other in members)), None)
        if spot is not None:
            members, block = spot
            members.append(block)
        elif len(networks) < max_networks:
            networks.append([alternatives[0]])
        else:
            left.append(alternatives)
    return networks, left


def minimum_runs(warmup: int) -> int:
    """The fewest runs :func:`time_networks` makes of a network: warm-up and one first run of the plain
    network, warm-up of the profiled one, and MIN_ROUNDS rounds of one untimed and one timed run of each."""
    return 2 * max(1, warmup) + 1 + 4 * MIN_ROUNDS


@dataclass(frozen=True)
class NetworkTiming:
    blocks: Dict[Option, Tuple[float, float]]  # (start, end, pruned) -> (ms, spread ms), scaled
    wall_ms: float  # median of the plain (unprofiled) runs, call included
    scale: float  # plain time less the call over the profiled node time
    runs: int  # plain runs the figures come from
    quiet: bool = True  # from quiet rounds; False: too few were quiet, every round counted
    anchor_ms: Optional[float] = None  # the anchor's median around the rounds counted (with an anchor)

    @property
    def blocks_ms(self) -> float:
        """The blocks' times added up."""
        return math.fsum(ms for ms, _ in self.blocks.values())

    @property
    def rest_ms(self) -> float:
        """What the network spent outside its blocks (head, pooling, layout conversions, the call)."""
        return self.wall_ms - self.blocks_ms


class Anchor:
    """The network of single convs, ready to run plainly: its median over ``runs`` runs, taken
    between rounds, tells quiet rounds from loaded ones; its history spans every call."""

    def __init__(self, runner: "Runner", runs: int) -> None:
        self.runner, self.runs = runner, runs
        self.history: List[float] = []

    def measure(self) -> float:
        ms = float(statistics.median(self.runner.time(1, self.runs)))
        self.history.append(ms)
        return ms

    def quiet(self, marks: Sequence[float]) -> List[bool]:
        """Whether each round between consecutive ``marks`` (measurements) was quiet: both were, against
        the quiet level of every measurement so far."""
        calm = quiet_rounds(marks, quiet_level(self.history))
        return [before and after for before, after in zip(calm, calm[1:])]

    def is_quiet(self, ms: float) -> bool:
        """Whether an anchor level (a network's ``anchor_ms``) was quiet, against every measurement so far."""
        return quiet_rounds([ms], quiet_level(self.history))[0]



@dataclass
class _Network:
    """A network being timed: its two sessions, its rounds, and its plain runs and rounds so far."""
    names: Dict[str, Option]  # submodule name -> block
    profiled: "NetworkProfile"
    plain: "Runner"
    per_round: int  # runs a round
    rounds: int  # rounds planned
    walls: List[float] = field(default_factory=list)  # plain runs, round after round
    ran: List[int] = field(default_factory=list)  # the index of each of its rounds among all rounds


def time_networks(backend: "Backend", traced: "TracedModel", plans: Sequence[Plan],
                  geometries: Dict[Option, BlockGeometry], input_shape: Sequence[int], precision: str,
                  warmup: int, iters: int, call_overhead_ms: float,
                  max_seconds: Optional[float] = None,
                  anchor: Optional[Anchor] = None) -> List[Optional[NetworkTiming]]:
    """Time the blocks of each plan inside its network; the networks take turns, round by round.
    ``geometries`` holds each block's, keyed ``(start, end, the convs the plan prunes in it)``.

    With ``max_seconds``, a network whose building and first run show that timing it would take
    longer is dropped after that run: its entry is None. With an ``anchor``, the figures come from
    quiet rounds: a network with fewer than half its rounds (or MIN_ROUNDS) quiet gets more rounds,
    up to twice as many again, and where that is not enough counts every round (``quiet`` False).
    """
    import torch

    with torch.no_grad():
        prepared = [_prepared(backend, traced, plan, geometries, input_shape, precision, warmup, iters, max_seconds)
                    for plan in plans]
    rounds = _Rounds([network for network in prepared if network is not None], anchor)
    rounds.run()
    timings = [None if network is None else rounds.timing(network, call_overhead_ms) for network in prepared]
    prepared.clear()  # the sessions: all freed before the memory goes back
    rounds.networks.clear()
    release_freed_memory()
    return timings


def _prepared(backend: "Backend", traced: "TracedModel", plan: Plan, geometries: Dict[Option, BlockGeometry],
              input_shape: Sequence[int], precision: str, warmup: int, iters: int,
              max_seconds: Optional[float]) -> Optional[_Network]:
    """A plan's network built, its sessions warmed up and its rounds planned; None where ``max_seconds``
    shows it over the cap."""
    began = time.perf_counter()
    network, names = packed_network(traced, plan, geometries)
    plain, profiled = backend.prepare_network_timing(network, input_shape, precision, list(names))
    del network  # the runtime holds its own copy now: these weights (as many as the model's) and
    release_freed_memory()  # the export's go before the next network is built
    if max_seconds is not None:
        first = plain.time(0, 1)[0]  # cold: over what the others will take, which errs towards the cap
        if time.perf_counter() - began + minimum_runs(warmup) * first / 1e3 > max_seconds:
            profiled.part_times()  # ends its profiling: no trace is left behind
            return None
    profiled.run(0, warmup=max(1, warmup))
    first = plain.time(max(1, warmup), 1)[0]
    per_round = max(1, min(MAX_ITERS_PER_ROUND, int(0.25 / max(first / 1e3, 1e-6))))
    rounds = max(MIN_ROUNDS, min(math.ceil(max(iters, backend.min_network_runs) / per_round),
                                 math.ceil(SECONDS_PER_NETWORK / (per_round * max(first / 1e3, 1e-6)))))
    return _Network(names, profiled, plain, per_round, rounds)


class _Rounds:
    """Networks taking turns, round by round, the anchor measured before each round and after."""

    def __init__(self, networks: List[_Network], anchor: Optional[Anchor]) -> None:
        self.networks, self.anchor = networks, anchor
        self.planned = max((network.rounds for network in networks), default=0)
        self.marks = [anchor.measure()] if anchor is not None and networks else []
        self.quiet: List[bool] = []  # per round so far

    def kept(self, network: _Network) -> List[bool]:
        """Which of a network's rounds count: quiet for the anchor around it, and the network itself near
        its fastest tenth of rounds where it has enough to tell (a state can slow merged networks and
        leave the anchor be)."""
        if self.anchor is None:
            return [True] * len(network.ran)
        return [self.quiet[k] and calm for k, calm in zip(network.ran, calm_rounds(network.walls, network.per_round))]

    def wanted(self, network: _Network) -> bool:
        """Whether a network needs another round: planned, or short of quiet ones (and time is left)."""
        if len(network.ran) < network.rounds:
            return True
        if self.anchor is None or len(self.quiet) >= 3 * self.planned:
            return False
        return sum(self.kept(network)) < max(MIN_ROUNDS, math.ceil(network.rounds / 2))

    def run(self) -> None:
        while True:
            taking = [network for network in self.networks if self.wanted(network)]
            if not taking:
                break
            for network in taking:
                network.profiled.run(network.per_round, warmup=1)
                network.walls.extend(network.plain.time(1, network.per_round))
                network.ran.append(len(self.quiet))
            if self.anchor is None:
                self.quiet.append(True)
                continue
            self.marks.append(self.anchor.measure())
            self.quiet = self.anchor.quiet(self.marks)  # every round judged again: the level falls when a quiet state first shows

    def timing(self, network: _Network, call_overhead_ms: float) -> NetworkTiming:
        """A network's figures from the rounds that count (every round where too few do)."""
        counted = self.kept(network)
        enough = sum(counted) >= MIN_ROUNDS  # always, without an anchor: every round counts
        walls = in_rounds(network.walls, network.per_round, counted) if enough else network.walls
        times = network.profiled.part_times(counted if enough else None)
        anchor_ms = None
        if self.anchor is not None:  # the marks before and after each counted round
            around = [mark for k, c in zip(network.ran, counted) if c or not enough for mark in self.marks[k:k + 2]]
            anchor_ms = float(statistics.median(around))
        wall = summarize(walls).median_ms
        node_ms = times.total_ms
        # The call overhead is itself a noisy measurement: on a tiny network under load it can exceed
        # the wall, which would zero every block; the network is never credited below a floor of it.
        scale = kept_latency(wall, call_overhead_ms) / node_ms if node_ms > 0 else 1.0
        blocks = {}
        for name, block in network.names.items():
            ms, spread = times.parts.get(name, (0.0, 0.0))
            blocks[block] = (scale * ms, scale * spread)
        return NetworkTiming(blocks, wall, scale, len(walls), quiet=enough, anchor_ms=anchor_ms)


@dataclass(frozen=True)
class NetworkTimer:
    """What every network of one profile is timed with: ``time`` a round of plans, or make the ``anchor``."""
    backend: "Backend"
    traced: "TracedModel"
    geometries: Dict[Option, BlockGeometry]
    input_shape: Tuple[int, ...]
    precision: str
    warmup: int
    iters: int
    call_overhead_ms: float

    def time(self, plans: Sequence[Plan], max_seconds: Optional[float] = None,
             anchor: Optional[Anchor] = None) -> List[Optional[NetworkTiming]]:
        return time_networks(self.backend, self.traced, plans, self.geometries, self.input_shape, self.precision,
                             self.warmup, self.iters, self.call_overhead_ms, max_seconds=max_seconds, anchor=anchor)

    def anchor(self) -> Anchor:
        """The network of single convs, prepared to run plainly between rounds (about 50 ms a time)."""
        import torch

        with torch.no_grad():
            network, _ = packed_network(self.traced, packed_plan(self.traced.chain, []), self.geometries)
            runner = self.backend.prepare(network, self.input_shape, self.precision)
        del network
        first_ms = min(runner.time(max(1, self.warmup), 3))
        return Anchor(runner, max(3, min(10, math.ceil(50 / max(first_ms, 1e-3)))))
