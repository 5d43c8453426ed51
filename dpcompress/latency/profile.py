"""Latency tables: every valid block of a chain timed as the merged convolution it becomes.

A profile runs in phases, each in a function or small object of its own:

1. enumerate and de-duplicate (``blocks.enumerate_blocks``): every valid block (one row per pruning option
   with ``prune``), grouped by shape, so that blocks alike but for their positions are timed once;
2. bound (:class:`Bounds`): a dominated block, or one whose timing would run over the cap, is written with
   a lower bound of its latency instead of timed;
3. time (:class:`TableRun`): standalone, each block its own model; in-network, blocks inside whole networks
   (``network_timing``);
4. calibrate (``calibration``): on a shared machine the quiet-state anchor, timing again, plan networks and
   the fit of the rest; none where the target is quiet (a GPU), or standalone;
5. write (``table_file.PartialTable``): rows appended to ``<out>.partial`` as they finish, so an interrupted
   run resumes where it stopped; the finished table written sorted and atomically, with its meta.

Where the backend has a per-call cost that a layer inside a network does not pay
(``Backend.call_overhead_ms``: ONNX Runtime's session call and copies), it is
measured once per distinct block input shape and subtracted from each row; a row is
never credited below ``timing.MIN_KEPT_FRACTION`` of its raw median, since the overhead
estimate is itself a noisy measurement. The values go in the meta
(``call_overhead_ms``, keyed ``NxCxHxW``).

How rows are timed is the meta's ``timing``. ``in-network`` (the default where the backend
profiles nodes, ONNX Runtime): blocks are timed inside whole networks, several disjoint
blocks per network, each block's time read from the runtime's per-node profiler and
scaled to the network's plain latency (``dpcompress/latency/network_timing.py``); the network of
single convs gives the table's ``rest_ms`` (head, pooling, layout conversions, the call),
which the solver adds to every plan's latency, so that a plan's predicted latency is the
whole network's; how that rest is fitted to grow with the network, and how a shared machine's
state is kept out of the rows, is ``dpcompress/latency/calibration.py`` (meta ``calibration``, ``rest_fit``).
``standalone``: each block is its own model, timed cache-hot, the call overhead subtracted;
predictions from such tables run ahead of measurements for deep merges (docs/latency.md).

Pruning options (``prune``, LayerMerge's search space): each valid block has one row per
pruned set of ``pruning_options`` (the empty set included), the ``pruned`` column listing the
convs replaced by identity; the geometry is that of the convs that remain, so most options
share a shape with some other row and cost no timing of their own. An option that leaves no
conv and no shortcut (``BlockGeometry.identity``) is no node of the network: its latency is 0,
written without timing (``timed`` = 1: the value is exact, not a bound). Without ``prune`` the
table has no ``pruned`` column and one row per block, as before pruning existed.

Dominated blocks are not timed (``timed`` = 0, ``std_ms`` = nan). Merging a long
stretch gives huge kernels (mobilenet_v2 composes kernels up to 491x491 before they are
cropped to the taps that meet the input) that take seconds to build and to run, and
that the DP can never choose: stage 1 always has the splits of a block into smaller
timed blocks, so a block slower than one of them never wins. Single convs are timed
first, then blocks by growing FLOPs; a block whose FLOPs at ``prune_margin`` times the
fastest rate (FLOP/ms) measured so far would still take longer than its cheapest split
into timed blocks (with pruning: whose options together prune the same convs, so that the
split has the same importance) is written with that bound as its latency: a lower bound of its true
latency that is already too slow to matter, so the DP gives the same plans as with the
true value.

A block whose merge would take more memory than ``DPCOMPRESS_MAX_MERGE_BYTES`` allows
(``geometry.block_merge_bytes``: composing its weights, as export and bench would) gets no row,
so the DP never chooses a block that cannot be built; the meta lists them (``unbuildable_blocks``)
with the limit used (``max_merge_bytes``).

``max_block_seconds`` caps the time spent timing one block (single convs excepted: every
plan is built on them). A block that would take longer is written with the same lower
bound, ``timed`` = 0, and listed in the meta's ``capped_blocks``; the profile moves on.
Standalone, the time is the block's own: building it, warm-up and timed runs. In-network,
it is the time of the network that holds the block (built, warmed up, at least
``network_timing.MIN_ROUNDS`` rounds), every run of which runs the whole model, so the
cap must exceed a few dozen runs of the model itself. Either way a block is capped before
it is built where even its lower bound shows the runs alone over the cap, and otherwise
after one run, where that run shows it (in-network: its network shared with other blocks
is first re-timed alone). A capped block's bound need not exceed its splits, so the DP
may choose it: its row is optimistic, the plan's measured latency says by how much.
"""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Set, Union

from dpcompress import __version__
from dpcompress.backends.base import MEDIAN_OF_RUNS, check_precision
from dpcompress.errors import UserError
from dpcompress.graph.chain import Chain
from dpcompress.latency.blocks import (BlockShape, Option, TableBlocks, block_input_shape, block_module,
                                       enumerate_blocks, weight_bytes)
from dpcompress.latency.calibration import DEFAULT_CALIBRATION, CalibrationSettings, NoCalibration, calibration_for
from dpcompress.latency.network_timing import NetworkTimer, minimum_runs, pack, packed_plan
from dpcompress.latency.table_file import (PRUNED_TABLE_COLUMNS, TABLE_COLUMNS, PartialTable, Row, capped_option,
                                           existing_rows, option_entries, row_option, table_row)
from dpcompress.latency.timing import MIN_KEPT_FRACTION, floored, kept_latency, time_runner
from dpcompress.tables import TABLE_FORMAT, meta_path_for

if TYPE_CHECKING:  # pragma: no cover
    from dpcompress.backends.base import Backend
    from dpcompress.graph.trace import TracedModel

DEFAULT_PRUNE_MARGIN = 2.0
DEFAULT_MAX_BLOCK_SECONDS = 60.0
TIMINGS = ("in-network", "standalone")
AUTO = "auto"  # ProfileSettings.calibration: quiet-state handling on a CPU, none on a GPU (``default_calibration``)


@dataclass(frozen=True)
class ProfileSettings:
    """How a table is profiled (``profile_table``; what the meta records of them, ``profile_meta``)."""

    model_spec: Optional[str] = None
    input_shape: Optional[Sequence[int]] = None  # default: the chain's
    batch_size: Optional[int] = None  # replaces N of the input shape for timing (default: that N)
    precision: str = "fp32"
    warmup: int = 10
    iters: int = 50
    overwrite: bool = False  # replace a table made with other settings (else refused)
    prune_margin: Optional[float] = DEFAULT_PRUNE_MARGIN  # None: time every block, dominated ones too
    timing: Optional[str] = None  # in-network or standalone; default: ``default_timing``
    max_block_seconds: Optional[float] = DEFAULT_MAX_BLOCK_SECONDS  # None: no cap
    prune: bool = False  # a row per pruning option of each block
    # In-network timing's machine-state handling: settings, None for none, AUTO for ``default_calibration``.
    calibration: Union[CalibrationSettings, None, str] = AUTO
    # Networks profiled at once in in-network timing (they take turns, so drift hits them alike), and the
    # weight bytes (fp32: the model's in each network, and the merged blocks') they may hold together:
    # each byte is held some four times (torch, the ONNX export, two sessions).
    networks_per_round: int = 6
    network_bytes_per_round: int = 512 << 20


def default_timing(backend: "Backend", traced: Optional["TracedModel"]) -> str:
    """in-network where the model is at hand and the backend profiles nodes, else standalone."""
    return "in-network" if traced is not None and backend.profiles_networks else "standalone"


def default_calibration(backend: "Backend") -> Optional[CalibrationSettings]:
    """Quiet-state handling on a CPU, shared with whatever else runs; none on a GPU, which a profile has
    to itself."""
    return DEFAULT_CALIBRATION if backend.device == "cpu" else None


def resolved_settings(settings: ProfileSettings, chain: Chain, backend: "Backend",
                      traced: Optional["TracedModel"]) -> ProfileSettings:
    """``settings`` checked, with every default made explicit (timing, input shape, batch, calibration)."""
    s = settings
    if s.warmup < 0 or s.iters < 1:
        raise UserError("--warmup must be >= 0 and --iters >= 1")
    if s.prune_margin is not None and s.prune_margin < 1:
        raise UserError(f"--prune-margin must be at least 1 (got {s.prune_margin}); use --time-all to time every block")
    if s.max_block_seconds is not None and not s.max_block_seconds > 0:
        raise UserError(f"--max-block-seconds must be positive (got {s.max_block_seconds})")
    timing = s.timing or default_timing(backend, traced)
    if timing not in TIMINGS:
        raise UserError(f"unknown timing {timing!r}; use one of {', '.join(TIMINGS)}")
    if timing == "in-network" and not backend.profiles_networks:
        raise UserError(f"the {backend.name} backend cannot time blocks inside a network; use --timing standalone")
    if timing == "in-network" and traced is None:
        raise UserError("in-network timing needs the model, not only its chain; use --timing standalone")
    check_precision(s.precision, backend.device)
    input_shape = tuple(s.input_shape or chain.input_shape)
    batch_size = int(s.batch_size or input_shape[0])
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {batch_size})")
    calibration = default_calibration(backend) if s.calibration == AUTO else s.calibration
    return replace(s, timing=timing, input_shape=input_shape, batch_size=batch_size,
                   calibration=calibration if timing == "in-network" else None)


@dataclass(frozen=True)
class ProfileProgress:
    done_blocks: int  # rows in the table so far (resumed ones included)
    total_blocks: int
    shapes_done: int  # distinct shapes this run has timed or bounded so far
    shapes_total: int  # distinct shapes this run has to time or bound
    elapsed_s: float
    eta_s: Optional[float]  # None until the first shape has been timed


@dataclass(frozen=True)
class ProfileResult:
    table_path: Path
    meta_path: Path
    meta: Dict[str, Any]
    rows: List[Row]
    timed_shapes: int  # shapes timed by this call
    resumed_blocks: int  # rows found from an earlier (interrupted) run
    notes: List[str] = field(default_factory=list)  # what the calibration could not do as intended


TIMING_TEXT = {
    "in-network": ("each block timed inside a whole network (disjoint blocks merged, single convs elsewhere) by "
                   "the runtime's per-node profiler, node times scaled to the network's unprofiled latency less "
                   "the call; rest_ms is what the network of single convs spends outside its convs"),
    "standalone": "each block timed alone as its own model, runs back to back (cache-hot)",
}


def profile_meta(chain: Chain, backend: "Backend", settings: ProfileSettings) -> Dict[str, Any]:
    """The meta of a table profiled with ``settings`` (resolved; ``date`` is set when the table is finished)."""
    s = settings
    timing, prune_margin, prune = s.timing, s.prune_margin, s.prune
    assert timing is not None and s.input_shape is not None and s.batch_size is not None
    return {
        "format": TABLE_FORMAT,
        "timing": timing,
        "timing_method": TIMING_TEXT[timing],
        "model": s.model_spec,
        "input_shape": [int(x) for x in s.input_shape],
        "batch_size": int(s.batch_size),
        "backend": backend.name,
        "backend_version": backend.version,
        "backend_options": backend.options(),
        "device": backend.device,
        "device_name": backend.device_name,
        "threads": backend.threads,
        "precision": s.precision,
        "warmup": int(s.warmup),
        "iters": int(s.iters),
        "statistic": MEDIAN_OF_RUNS if timing == "standalone" else backend.network_statistic,
        "call_overhead": ("subtracted: latency_ms is the median minus call_overhead_ms at the block's input shape "
                          "(the backend's cost of an empty call), floored at "
                          f"{MIN_KEPT_FRACTION:g} x the median") if timing == "standalone" else
                         ("part of rest_ms: paid once per network, measured as the cost of an empty call at the "
                          "model's input shape (call_overhead_ms)"),
        "prune_margin": prune_margin,
        "max_block_seconds": s.max_block_seconds,
        "pruning": ("rows with timed=0 were not timed: their latency is a lower bound, FLOPs / (m x the fastest "
                    "FLOP/ms measured in rows not floored by the call overhead), m = prune_margin "
                    f"(or {DEFAULT_PRUNE_MARGIN:g} where pruning is off). Either the bound exceeds the cheapest "
                    "split of the block into timed blocks, so the DP never picks it (bounded_blocks), or timing "
                    "the block would have taken more than max_block_seconds (the blocks in capped_blocks; "
                    "the DP may pick these, with an optimistic latency)")
                   if prune_margin or s.max_block_seconds is not None else "off: every block was timed",
        "prune": prune,
        "pruning_options": ("each block has one row per pruned set of pruning_options (LayerMerge's search space: "
                            "reducible convs replaced by identity, one set per distinct merged conv); a set that "
                            "leaves no conv and no shortcut is the identity: latency 0, not timed")
                           if prune else "none: every row prunes nothing",
        "chain_fingerprint": chain.fingerprint(),
        "num_positions": chain.num_positions,
        "activation_positions": chain.activation_positions,  # a solve given only this table keeps to them
        "dpcompress_version": __version__,
        "columns": list(PRUNED_TABLE_COLUMNS if prune else TABLE_COLUMNS),
    }


def _shape_key(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


class Bounds:
    """Phase 2: the latency written for a block not worth timing (module doc), a lower bound: its FLOPs at
    ``margin`` times the fastest rate measured so far. Written where it shows the block slower than a split
    of it into timed blocks (``dominated``), or its runs over the cap (``over_cap``)."""

    def __init__(self, blocks: TableBlocks, rows: Dict[Option, Row], prune_margin: Optional[float],
                 max_block_seconds: Optional[float], best_rate: float) -> None:
        self.blocks, self.rows = blocks, rows
        self.prune_margin, self.max_block_seconds = prune_margin, max_block_seconds
        self.margin = prune_margin or DEFAULT_PRUNE_MARGIN
        self.best_rate = best_rate  # FLOP/ms: measurements only (a floored row's is no rate of its conv)

    def measured(self, shape: BlockShape, latency_ms: float) -> None:
        """A shape timed now at ``latency_ms``, a measurement of its conv."""
        if latency_ms > 0:
            self.best_rate = max(self.best_rate, self.blocks.flops[shape] / latency_ms)

    def lower_bound(self, shape: BlockShape) -> Optional[float]:
        return self.blocks.flops[shape] / (self.margin * self.best_rate) if self.best_rate > 0 else None

    def dominated(self, shape: BlockShape, missing: List[Option]) -> Optional[float]:
        """The lower bound to write for ``missing``, if it shows each of them slower than a split of it."""
        bound = self.lower_bound(shape) if self.prune_margin else None
        if bound is None:
            return None
        for block in missing:
            if block[1] - block[0] == 1:
                return None
            singles = self._singles_ms(block)  # one split, and usually enough
            if singles is not None and bound > singles:
                continue
            split = self._cheapest_split_ms(block)
            if split is None or bound <= split:
                return None
        return bound

    def over_cap(self, shape: BlockShape, runs: int) -> Optional[float]:
        """The lower bound to write for a shape whose ``runs`` runs would take longer than the cap even at it."""
        bound = self.lower_bound(shape)
        if self.max_block_seconds is None or self.blocks.has_single[shape] or bound is None:
            return None
        return bound if runs * bound / 1e3 > self.max_block_seconds else None

    @staticmethod
    def _within(block: Option, start: int, end: int) -> Option:
        """The part (start, end) of ``block``, pruning what ``block`` prunes there."""
        return (start, end, tuple(p for p in block[2] if start < p <= end))

    def _singles_ms(self, block: Option) -> Optional[float]:
        singles = [self.rows.get(self._within(block, p - 1, p)) for p in range(block[0] + 1, block[1] + 1)]
        if any(r is None or not r["timed"] for r in singles):
            return None
        return sum(r["latency_ms"] for r in singles)  # type: ignore[index]

    def _cheapest_split_ms(self, block: Option) -> Optional[float]:
        """The cheapest cover of ``block`` by two or more timed blocks that together prune what it
        prunes (stage 1 over the rows so far); bounded rows do not count: their latency is no upper bound."""
        start, end, _ = block
        best = {start: 0.0}
        for k in range(start + 1, end + 1):
            parts = [(m, self._within(block, m, k)) for m in self.blocks.starts_of.get(k, ()) if m in best]
            costs = [best[m] + self.rows[part]["latency_ms"] for m, part in parts
                     if part != block and part in self.rows and self.rows[part]["timed"]]
            if costs:
                best[k] = min(costs)
        return best.get(end)


class TableRun:
    """Phase 3: the shapes left to time, timed (standalone or in networks) or settled without timing, each
    written to ``table`` as it finishes; ``calibration`` sees every round of networks."""

    def __init__(self, settings: ProfileSettings, backend: "Backend", blocks: TableBlocks, table: PartialTable,
                 bounds: Bounds, calibration: NoCalibration, meta: Dict[str, Any], capped: Set[Option],
                 overheads: Dict[str, float], to_time: List[BlockShape],
                 progress: Optional[Callable[[ProfileProgress], None]]) -> None:
        self.settings, self.backend, self.blocks, self.table = settings, backend, blocks, table
        self.bounds, self.calibration, self.meta, self.capped = bounds, calibration, meta, capped
        self.overheads, self.to_time, self.progress = overheads, to_time, progress
        self.rows = table.rows
        self.timed = self.handled = 0
        self.runs_per_block = (settings.warmup + settings.iters if settings.timing == "standalone"
                               else minimum_runs(settings.warmup))
        self.started = time.perf_counter()

    def report(self) -> None:
        if self.progress is None:
            return
        elapsed = time.perf_counter() - self.started
        eta = elapsed / self.handled * (len(self.to_time) - self.handled) if self.handled else None
        self.progress(ProfileProgress(len(self.rows), len(self.blocks.blocks), self.handled, len(self.to_time),
                                      elapsed, eta))

    def flush(self) -> None:
        self.table.flush()
        self.report()

    def write(self, shape: BlockShape, latency: float, std: float, was_timed: bool) -> List[Option]:
        """Rows for the blocks of ``shape`` that have none yet."""
        written = [block for block in self.blocks.groups[shape] if block not in self.rows]
        for block in written:
            self.table.add(block, table_row(self.blocks.geometries[block], block[2], latency, std, was_timed))
        return written

    def cap(self, shape: BlockShape, bound: float) -> None:
        """Write ``shape``'s rows as bounds over the cap; the partial meta lists them, for a resumed run."""
        self.capped.update(self.write(shape, bound, float("nan"), False))
        self.meta["capped_blocks"] = option_entries(self.capped)
        self.table.save_meta(self.meta)
        self.handled += 1

    def settle(self, shape: BlockShape) -> bool:
        """Write ``shape``'s rows without timing it where that is possible: an earlier row of the same
        shape, a bound that shows it dominated, or one that shows its runs over the cap. True when done so."""
        members = self.blocks.groups[shape]
        missing = [b for b in members if b not in self.rows]
        if not missing:
            return True
        done = next((self.rows[b] for b in members if b in self.rows and self.rows[b]["timed"]), None)
        if done is not None:
            self.write(shape, done["latency_ms"], done["std_ms"], True)
            return True
        bound = self.bounds.dominated(shape, missing)
        if bound is not None:
            self.write(shape, bound, float("nan"), False)
            self.handled += 1
            return True
        bound = self.bounds.over_cap(shape, self.runs_per_block)
        if bound is not None:
            self.cap(shape, bound)
            return True
        return False

    def time_standalone(self) -> None:
        """Each shape its own model, timed back to back."""
        s, blocks = self.settings, self.blocks
        assert s.batch_size is not None
        for shape in blocks.order:
            if self.settle(shape):
                self.flush()
                continue
            geometry = blocks.geometries[blocks.groups[shape][0]]
            shape_in = block_input_shape(geometry, s.batch_size)
            overhead = self.overheads[_shape_key(shape_in)]
            began = time.perf_counter()
            runner = self.backend.prepare(block_module(geometry), shape_in, s.precision)
            if s.max_block_seconds is not None and not blocks.has_single[shape]:
                first_ms = runner.time(0, 1)[0]  # one run shows what the others will cost
                if time.perf_counter() - began + self.runs_per_block * first_ms / 1e3 > s.max_block_seconds:
                    self.cap(shape, self.bounds.lower_bound(shape) or kept_latency(first_ms, overhead))
                    self.flush()
                    continue
            stats = time_runner(runner, s.warmup, s.iters)
            latency = kept_latency(stats.median_ms, overhead)
            if not floored(latency, overhead):
                self.bounds.measured(shape, latency)
            self.write(shape, latency, stats.std_ms, True)
            self.timed += 1
            self.handled += 1
            self.flush()

    def time_in_network(self, traced: "TracedModel") -> None:
        """Shapes inside whole networks, a round of networks at a time, cheapest first; once they are done,
        those the calibration wants timed again, then its plan networks."""
        s, blocks = self.settings, self.blocks
        network_input = (s.batch_size, *s.input_shape[1:])  # type: ignore[index]
        overhead = self.overheads[_shape_key(network_input)] if self.to_time else 0.0
        timer = NetworkTimer(self.backend, traced, blocks.geometries, network_input, s.precision, s.warmup, s.iters,
                             overhead)
        model_bytes = sum(p.numel() * p.element_size() for p in traced.gm.parameters())
        pending = list(blocks.order)
        self.calibration.start(timer.anchor, model_bytes, bool(pending))
        per_round = max(1, min(s.networks_per_round, s.network_bytes_per_round // max(1, model_bytes)))
        alone: Set[BlockShape] = set()  # shapes whose shared network went over the cap: next, each in its own
        while pending:
            # Shapes settled without timing go; the rest, cheapest first, fill a round of networks.
            pending = [shape for shape in pending if not self.settle(shape)]
            self.flush()
            if not pending:
                break
            pending = self._network_round(timer, pending, alone, per_round, model_bytes)
            if not pending:
                pending = self._time_again()
        row_ms = {option: r["latency_ms"] for option, r in self.rows.items() if r["timed"]}
        calibration = self.calibration
        if calibration.time_plan_networks(
                lambda covers: timer.time([packed_plan(traced.chain, [(s, e) for s, e, _ in cover],
                                                       [p for _, _, pruned in cover for p in pruned])
                                           for cover in covers], anchor=calibration.anchor),
                traced.chain.num_positions, row_ms, self.meta):
            self.table.save_meta(self.meta)

    def _network_round(self, timer: NetworkTimer, pending: List[BlockShape], alone: Set[BlockShape],
                       per_round: int, model_bytes: int) -> List[BlockShape]:
        """One round of networks over the first of ``pending``; the shapes still pending after it."""
        blocks, rows, calibration = self.blocks, self.rows, self.calibration
        # The network of single convs comes first: every single conv, and the rest of the network.
        singles_network = calibration.rest_ms is None or any(e - s == 1 for shape in pending
                                                             for s, e, _ in blocks.groups[shape])
        lone = [shape for shape in pending if shape in alone][:self.settings.networks_per_round]
        if singles_network:
            networks: List[List[Option]] = [[]]
        elif lone:
            networks = [self._members(shape)[:1] for shape in lone]
        else:
            networks, _ = pack([self._members(shape) for shape in self._round_shapes(pending, per_round, model_bytes)],
                               per_round)
        plans = [packed_plan(timer.traced.chain, [(s, e) for s, e, _ in members],
                             pruned=[p for *_, pruned in members for p in pruned]) for members in networks]
        # The cap needs a bound to write: none before a rate was measured (the singles' network).
        limit = None if singles_network or self.bounds.best_rate <= 0 else self.settings.max_block_seconds
        results = timer.time(plans, max_seconds=limit, anchor=calibration.anchor)
        calibration.round_timed(results, self.meta)
        timed_now: Set[BlockShape] = set()
        for members, result in zip(networks, results):
            if result is None:  # over the cap
                shapes = [blocks.shape_of(block) for block in members]
                if len(members) == 1:
                    self.cap(shapes[0], self.bounds.lower_bound(shapes[0]))  # type: ignore[arg-type]
                alone.update(shapes)
                continue
            for block, (latency, std) in result.blocks.items():
                shape = blocks.shape_of(block)
                if shape in timed_now or not any(b not in rows for b in blocks.groups[shape]):
                    continue
                latency, std = calibration.kept(shape, latency, std, result.anchor_ms)
                self.write(shape, latency, std, True)
                timed_now.add(shape)
                self.bounds.measured(shape, latency)
        calibration.round_read(results, results[0] if singles_network else None, self.meta)
        self.table.save_meta(self.meta)
        self.timed += len(timed_now)
        self.handled += len(timed_now & set(pending))
        pending = [shape for shape in pending if shape not in timed_now]
        self.flush()
        return pending

    def _time_again(self) -> List[BlockShape]:
        """The shapes the calibration wants timed again, their rows dropped."""
        groups = self.blocks.groups
        again = self.calibration.time_again(
            self.blocks.order, lambda shape: next(self.rows[b] for b in groups[shape] if b in self.rows), self.meta)
        for shape in again:
            for block in groups[shape]:
                self.rows.pop(block, None)
        self.timed -= len(again)
        self.handled -= len(again)
        return again

    def _members(self, shape: BlockShape) -> List[Option]:
        """The blocks that can stand for a shape in a timed network: those without a row."""
        return [b for b in self.blocks.groups[shape] if b not in self.rows]

    def _round_shapes(self, shapes: List[BlockShape], per_round: int, model_bytes: int) -> List[BlockShape]:
        """The first of ``shapes`` whose merged weights fit in the round beside the networks' own (at least
        one): merged kernels reach hundreds of MiB (mnasnet1_0 at 64x64: 540 MiB), and each is held by torch,
        the ONNX export and two sessions."""
        room = self.settings.network_bytes_per_round - per_round * model_bytes
        taken: List[BlockShape] = []
        for shape in shapes:
            room -= weight_bytes(self.blocks.geometries[self.blocks.groups[shape][0]])
            if taken and room < 0:
                break
            taken.append(shape)
        return taken


def profile_table(chain: Chain, backend: "Backend", out: "os.PathLike[str] | str",
                  settings: Optional[ProfileSettings] = None, *, traced: Optional["TracedModel"] = None,
                  progress: Optional[Callable[[ProfileProgress], None]] = None, **options: Any) -> ProfileResult:
    """Time every valid block of ``chain`` on ``backend`` and write the latency table ``out`` (+ meta).

    ``settings`` (or its fields as keywords, ``options``: a keyword replaces the field) say how
    (:class:`ProfileSettings`). Re-running with the same settings resumes an interrupted run and re-times
    nothing it already has; other settings are refused unless ``overwrite``. In-network timing needs
    ``traced``, the model ``chain`` was traced from, and a backend that profiles nodes.
    """
    settings = resolved_settings(replace(settings or ProfileSettings(), **options), chain, backend, traced)
    assert settings.batch_size is not None
    table_path = Path(out)
    blocks = enumerate_blocks(chain, settings.prune, settings.batch_size)  # phase 1
    meta = dict(profile_meta(chain, backend, settings), max_merge_bytes=blocks.max_merge_bytes,
                unbuildable_blocks=option_entries(blocks.unbuildable))
    existing, found = existing_rows(table_path, meta, settings.overwrite)
    overheads: Dict[str, float] = dict(found.get("call_overhead_ms") or {})
    rows = {b: r for b, r in existing.items() if b in blocks.geometries}
    capped = {capped_option(entry) for entry in found.get("capped_blocks") or []} & set(rows)
    resumed = len(rows)
    # Identity options are no node at all: latency 0, exact without timing.
    for option, geometry in blocks.geometries.items():
        if geometry.identity and option not in rows:
            rows[option] = table_row(geometry, option[2], 0.0, 0.0)
    # A shape one of whose blocks already has a timed row needs no timing: its latency is reused.
    to_time = [shape for shape, members in blocks.groups.items()
               if not any(rows.get(b, {}).get("timed") for b in members)]
    bounds = Bounds(blocks, rows, settings.prune_margin, settings.max_block_seconds,  # phase 2
                    _measured_rate(blocks, rows, overheads, settings))
    _measure_overheads(backend, blocks, to_time, overheads, settings)
    meta = dict(meta, call_overhead_ms=overheads, capped_blocks=option_entries(capped))
    table = PartialTable(table_path, PRUNED_TABLE_COLUMNS if settings.prune else TABLE_COLUMNS, rows)
    # Plan networks are timed once the rows are done: by a run that timed rows, or resumes one cut short.
    calibration = calibration_for(settings.calibration, found,  # type: ignore[arg-type]
                                  plans_wanted=bool(to_time) or table.partial_table.exists())
    calibration.begin(meta)
    table.open(meta)
    run = TableRun(settings, backend, blocks, table, bounds, calibration, meta, capped, overheads, to_time, progress)
    run.report()
    try:
        if settings.timing == "standalone":  # phase 3
            run.time_standalone()
        else:
            assert traced is not None
            run.time_in_network(traced)
    finally:
        table.close()
    calibration.finish(meta)  # phase 4
    meta = dict(meta, num_blocks=len(chain.valid_blocks()), num_rows=len(blocks.blocks),
                unique_shapes=len(blocks.groups),
                identity_rows=sum(1 for g in blocks.geometries.values() if g.identity),
                bounded_blocks=sum(1 for b, r in rows.items() if not r["timed"] and b not in capped),
                capped_blocks=option_entries(capped),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    table.finish(meta)  # phase 5
    return ProfileResult(table_path, meta_path_for(table_path), meta, sorted(rows.values(), key=row_option),
                         run.timed, resumed, calibration.notes)


def _measured_rate(blocks: TableBlocks, rows: Dict[Option, Row], overheads: Dict[str, float],
                   settings: ProfileSettings) -> float:
    """The fastest FLOP rate of the rows found: the bounds divide FLOPs by it, so it must come from
    measurements only. A floored row holds MIN_KEPT_FRACTION x its raw median, not its conv's time: a tiny
    conv whose time is mostly the call overhead would look up to 1 / MIN_KEPT_FRACTION times faster than it
    is, which pulls every bound down: dominated blocks would be timed, capped ones look cheap."""
    assert settings.batch_size is not None

    def measured(block: Option, row: Row) -> bool:
        """Whether a row's latency is a measurement of its conv (timed and, standalone, not floored)."""
        if not row["timed"] or row["latency_ms"] <= 0:
            return False
        shape_in = block_input_shape(blocks.geometries[block], settings.batch_size)  # type: ignore[arg-type]
        return settings.timing != "standalone" or not floored(row["latency_ms"], overheads.get(_shape_key(shape_in), 0.0))

    return max((blocks.flops[blocks.shape_of(b)] / r["latency_ms"] for b, r in rows.items() if measured(b, r)),
               default=0.0)


def _measure_overheads(backend: "Backend", blocks: TableBlocks, to_time: List[BlockShape],
                       overheads: Dict[str, float], settings: ProfileSettings) -> None:
    """The call overhead at each input shape still to be timed, keyed NxCxHxW as in the meta; an interrupted
    run's values are kept, so that every row of a table has the same overhead taken off for its input shape."""
    assert settings.batch_size is not None and settings.input_shape is not None
    if settings.timing == "standalone":
        shapes = {block_input_shape(blocks.geometries[blocks.groups[shape][0]], settings.batch_size)
                  for shape in to_time}
    else:
        shapes = {(settings.batch_size, *settings.input_shape[1:])} if to_time else set()
    for shape_in in sorted(shapes):
        if _shape_key(shape_in) not in overheads:
            overheads[_shape_key(shape_in)] = backend.call_overhead_ms(shape_in, settings.precision, settings.warmup,
                                                                       settings.iters)
