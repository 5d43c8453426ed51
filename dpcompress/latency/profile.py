"""Latency tables: every valid block of a chain timed as the merged convolution it becomes.

Each block (i, j) is built as one ``nn.Conv2d`` with the geometry of
``block_geometry`` (random weights: latency does not depend on their values),
followed by the activation at position j as in the model, and timed at the input
shape it would see. Blocks with identical geometry (all but their positions) are
timed once. Rows are appended to ``<out>.partial`` as they finish (flushed and
fsynced), so an interrupted run resumes where it stopped; the finished table is
written sorted and atomically, with ``<name>.meta.json`` beside it.

Table columns: ``start,end,latency_ms,std_ms,in_channels,out_channels,kernel,
stride,groups,in_h,in_w,timed``, and ``pruned`` where the table has pruning options. ``kernel`` and ``stride`` are one integer when square
(``3``) and ``HxW`` otherwise (``3x5``); ``in_h``/``in_w`` are the block's input size.

Where the backend has a per-call cost that a layer inside a network does not pay
(``Backend.call_overhead_ms``: ONNX Runtime's session call and copies), it is
measured once per distinct block input shape and subtracted from each row; a row is
never credited below ``MIN_KEPT_FRACTION`` of its raw median, since the overhead
estimate is itself a noisy measurement. The values go in the meta
(``call_overhead_ms``, keyed ``NxCxHxW``).

How rows are timed is the meta's ``timing``. ``in-network`` (the default where the backend
profiles nodes, ONNX Runtime): blocks are timed inside whole networks, several disjoint
blocks per network, each block's time read from the runtime's per-node profiler and
scaled to the network's plain latency (``dpcompress/latency/network_timing.py``); the network of
single convs gives the table's ``rest_ms`` (head, pooling, layout conversions, the call),
which the solver adds to every plan's latency, so that a plan's predicted latency is the
whole network's. That rest grows with the network, and a node's time depends on the network
around it (OpenVINO's run faster in a network as light as a deep plan), so once the rows are done
the profile also times two plan networks (``plan_covers``: the cheapest cover of the chain by its
rows, and every other merged block of it) and fits the rest as ``rest_ms`` plus ``rest_per_block``
times a plan's blocks (``profile_rest_fit``) over whole networks: each plan network's wall against
its rows (``plan_network_rests``), and the network of single convs' against its own. Where no plan
network ran near the quiet level, or whole networks give a rest that shrinks as the network grows,
the fit is over every network that stayed quiet: the plan networks and each packed network's wall
against its own blocks (meta ``rest_fit`` says which).
``standalone``: each block is its own model, timed cache-hot, the call overhead subtracted;
predictions from such tables run ahead of measurements for deep merges (benchmarks/RESULTS.md).

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

import csv
import datetime
import io
import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from dpcompress import __version__
from dpcompress.backends import MEDIAN_OF_RUNS
from dpcompress.graph.chain import Chain
from dpcompress.errors import UserError
from dpcompress.fileio import write_json_atomic, write_text_atomic
from dpcompress.graph.geometry import BlockGeometry, block_geometry, block_merge_bytes, max_merge_bytes, pruning_options
from dpcompress.tables import PRUNED_COLUMN, Pruned, format_pruned, meta_path_for, read_latency_table
from dpcompress.latency.timing import QUIET_MARGIN, quiet_level, quiet_rounds, time_runner

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn

    from dpcompress.backends import Backend
    from dpcompress.graph.trace import TracedModel
    from dpcompress.latency.network_timing import Anchor

from dpcompress.tables import TABLE_FORMAT  # noqa: E402  (the tables' to define)
TABLE_COLUMNS = ("start", "end", "latency_ms", "std_ms", "in_channels", "out_channels",
                 "kernel", "stride", "groups", "in_h", "in_w", "timed")
PRUNED_TABLE_COLUMNS = (*TABLE_COLUMNS, PRUNED_COLUMN)  # a table with pruning options
# Meta fields that must agree for a run to resume (or reuse) an existing table.
RESUME_KEYS = ("format", "timing", "model", "input_shape", "batch_size", "backend", "backend_version", "backend_options",
               "device", "device_name", "threads", "precision", "warmup", "iters", "prune_margin", "call_overhead",
               "prune", "chain_fingerprint", "dpcompress_version", "statistic")
# What a meta from before a key existed meant by it.
RESUME_DEFAULTS = {"prune": False, "statistic": MEDIAN_OF_RUNS}
MIN_KEPT_FRACTION = 0.1
DEFAULT_PRUNE_MARGIN = 2.0
DEFAULT_MAX_BLOCK_SECONDS = 60.0
TIMINGS = ("in-network", "standalone")
# Networks profiled at once in in-network timing (they take turns, so drift hits them alike),
# and the weight bytes (fp32: the model's in each network, and the merged blocks') they may hold
# together: each byte is held some four times (torch, the ONNX export, two sessions).
NETWORKS_PER_ROUND = 6
NETWORK_BYTES_PER_ROUND = 512 << 20
# The anchor (the network of single convs, timed between rounds to tell quiet rounds from loaded
# ones) is one more session of the model: models with more weights than this go without it.
ANCHOR_MAX_BYTES = 256 << 20

# A rest fitted to the profile's networks (``fit_rest``) needs this many quiet ones, whose blocks' sums
# span at least REST_FIT_SPAN (largest over smallest): with fewer, or closer, the slope is noise.
MIN_REST_NETWORKS = 5
REST_FIT_SPAN = 1.2
# Plan networks (``plan_covers``) count in the fit where the anchor ran within PLAN_NETWORK_MARGIN of its quiet
# level beside them (a loaded state raises a deep plan's speed-up by some 0.6 of the original's slowdown, and
# these few networks weigh most in the fit's slope); those that did not are timed again, up to PLAN_NETWORK_TRIES
# times in all.
PLAN_NETWORK_MARGIN = 1.05
PLAN_NETWORK_TRIES = 3

Option = Tuple[int, int, Pruned]  # a block and the convs it replaces by identity (() for none)
Row = Dict[str, Any]


def fit_rest(networks: Sequence[Tuple[float, float]], min_networks: int = MIN_REST_NETWORKS,
             interpolating: bool = False) -> Optional[Tuple[float, float]]:
    """The rest as a fixed part plus a share of the blocks: least squares of each network's rest (its wall less
    its blocks) on its blocks' sum, from ``(blocks_ms, rest_ms)`` pairs. Returns ``(fixed_ms, per_block)``, or
    None where there are fewer than ``min_networks`` networks, their sums span too little, or the rest shrinks
    as the network grows (noise, not a cost). A fixed part fitted below 0 is none: the share is then fitted
    alone; unless ``interpolating``, where the networks are the smallest and largest plans the line will price
    (the deepest plan and the original), and it holds their walls between them whatever its value at 0."""
    if len(networks) < min_networks:
        return None
    sums = [blocks for blocks, _ in networks]
    if min(sums) <= 0 or max(sums) < REST_FIT_SPAN * min(sums):
        return None
    mean_x = math.fsum(sums) / len(sums)
    mean_y = math.fsum(rest for _, rest in networks) / len(networks)
    spread = math.fsum((x - mean_x) ** 2 for x in sums)
    per_block = math.fsum((x - mean_x) * (y - mean_y) for x, y in networks) / spread
    fixed_ms = mean_y - per_block * mean_x
    if fixed_ms < 0 and not interpolating:
        fixed_ms, per_block = 0.0, math.fsum(x * y for x, y in networks) / math.fsum(x * x for x in sums)
    if per_block < 0:
        return None
    return fixed_ms, per_block


def plan_network_rests(plan_networks: Sequence[Sequence[float]]) -> List[List[float]]:
    """Each plan network's ``[rows_ms, wall_ms, anchor_ms, singles_wall_ms]`` as a point of ``fit_rest``:
    ``[rows_ms, rest_ms, anchor_ms]``, where the wall is the plan's against the anchor's beside it, times the
    network of single convs' own wall (its rows and rest): the state cancels in the ratio, where a plan timed in
    a slower state than the single convs would read as rows that run slow in a plan."""
    return [[rows_ms, wall_ms / anchor_ms * singles_wall_ms - rows_ms, anchor_ms]
            for rows_ms, wall_ms, anchor_ms, singles_wall_ms in plan_networks]


class RestFit(NamedTuple):
    """A profile's fitted rest: ``fixed_ms`` plus ``per_block`` times a plan's blocks, and the networks it was
    fitted ``over`` (meta ``rest_fit``: WHOLE_NETWORKS or ALL_NETWORKS)."""
    fixed_ms: float
    per_block: float
    over: str


# The network of single convs and the plan networks: the original and plans as the solver returns them, each
# whole network's wall against the table's rows. A packed network's rest is its wall against its own nodes'
# times, which leaves out what its blocks' neighbours change in them.
WHOLE_NETWORKS = "whole networks"
ALL_NETWORKS = "all quiet networks"
REST_FIT_WORDS = {WHOLE_NETWORKS: "the original and whole plans, each network against the table's rows",
                  ALL_NETWORKS: "the profile's quiet networks"}


def profile_rest_fit(network_rests: Sequence[Sequence[Optional[float]]],
                     plan_networks: Sequence[Sequence[float]],
                     level_ms: Optional[float], singles_rest_ms: Optional[float] = None) -> Optional[RestFit]:
    """The rest fitted over a profile's evidence (meta ``network_rests`` and ``plan_networks``), judged by its
    quiet level ``level_ms`` (None: everything counts). Where plan networks were timed within
    PLAN_NETWORK_MARGIN of the level, over the whole networks (those plans, and the network of single convs:
    its rows' sum and ``singles_rest_ms``, from the wall each plan was scaled to); else, or where the whole
    networks' rest shrinks as the network grows, over those plans and the packed networks that were quiet."""
    quiet = [(blocks_ms, rest) for blocks_ms, rest, anchor_ms in network_rests
             if anchor_ms is None or level_ms is None or quiet_rounds([anchor_ms], level_ms)[0]]
    near_entries = [entry for entry in plan_networks if level_ms is None or entry[2] <= PLAN_NETWORK_MARGIN * level_ms]
    near = [(rows_ms, rest) for rows_ms, rest, _ in plan_network_rests(near_entries)]
    if near and singles_rest_ms is not None:
        singles = sorted({(singles_wall_ms - singles_rest_ms, singles_rest_ms) for *_, singles_wall_ms in near_entries})
        whole = fit_rest([*near, *singles], min_networks=2, interpolating=True)
        if whole is not None:
            return RestFit(*whole, WHOLE_NETWORKS)
    fitted = fit_rest([*quiet, *near])  # type: ignore[list-item]
    return RestFit(*fitted, ALL_NETWORKS) if fitted is not None else None


def cover_blocks(num_positions: int, merged: Sequence[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """Every block of the plan that merges ``merged`` (disjoint) and keeps every other conv single."""
    inside = {p for start, end in merged for p in range(start + 1, end + 1)}
    return [*merged, *((p - 1, p) for p in range(1, num_positions + 1) if p not in inside)]


def plan_covers(num_positions: int, latency_ms: Dict[Tuple[int, int], float]) -> List[List[Tuple[int, int]]]:
    """The merged blocks of the plan networks a profile times to check its rows as whole plans pay them:
    the cheapest cover of positions 0..``num_positions`` by the blocks of ``latency_ms`` (a deep plan, as the
    solver picks at its smallest budgets), and every other merged block of it (a plan half as deep). Empty
    where the cheapest cover merges nothing."""
    best: Dict[int, Tuple[float, int]] = {0: (0.0, 0)}  # position -> cheapest cost there, the block's start
    for start, end in sorted(latency_ms, key=lambda block: block[1]):
        if start in best:
            cost = best[start][0] + latency_ms[(start, end)]
            if end not in best or cost < best[end][0]:
                best[end] = (cost, start)
    if num_positions not in best:
        return []
    merged: List[Tuple[int, int]] = []
    end = num_positions
    while end > 0:
        start = best[end][1]
        if end - start > 1:
            merged.append((start, end))
        end = start
    merged.reverse()
    if not merged:
        return []
    return [merged, merged[::2]] if len(merged) > 1 else [merged]


class BlockShape(NamedTuple):
    """Everything about a block that affects its latency: its geometry minus its positions."""

    in_channels: int
    out_channels: int
    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    groups: int
    in_chw: Tuple[int, ...]
    activation: Optional[str]
    bias: bool


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


def partial_paths(table_path: "os.PathLike[str] | str") -> Tuple[Path, Path]:
    """Where an unfinished run keeps its rows and meta."""
    path = Path(table_path)
    return path.with_name(path.name + ".partial"), path.with_name(meta_path_for(path).name + ".partial")


def format_pair(pair: Sequence[int]) -> str:
    """``(3, 3)`` -> ``"3"``; ``(3, 5)`` -> ``"3x5"``."""
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}x{pair[1]}"


def block_shape(geometry: BlockGeometry) -> BlockShape:
    g = geometry
    return BlockShape(g.in_channels, g.out_channels, g.kernel, g.stride, g.padding, g.groups,
                      tuple(g.in_shape[1:]), g.activation, g.bias)


def group_by_shape(geometries: Dict[Option, BlockGeometry]) -> Dict[BlockShape, List[Option]]:
    """Blocks (with their pruned convs) grouped by shape, groups in order of their first block."""
    groups: Dict[BlockShape, List[Option]] = {}
    for block, geometry in geometries.items():
        groups.setdefault(block_shape(geometry), []).append(block)
    return groups


def activation_module(kind: Optional[str]) -> "torch.nn.Module":
    """The ``torch.nn`` module for an activation kind as the tracer names it ("ReLU", "relu6", "SiLU", ...)."""
    from torch import nn

    if kind is None:
        return nn.Identity()
    known = {cls.__name__.lower(): cls for cls in (
        nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.GELU, nn.LeakyReLU, nn.ELU,
        nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.PReLU, nn.SELU, nn.CELU, nn.Softplus)}
    cls = known.get(kind.lower())
    if cls is None:
        raise UserError(f"the profiler does not know activation {kind!r}; "
                        f"known: {', '.join(sorted(c.__name__ for c in known.values()))}")
    return cls()


def block_module(geometry: BlockGeometry) -> "torch.nn.Module":
    """The merged convolution of a block plus its end activation, with random weights."""
    from torch import nn

    g = geometry
    conv = nn.Conv2d(g.in_channels, g.out_channels, g.kernel, stride=g.stride, padding=g.padding,
                     groups=g.groups, bias=g.bias)
    return nn.Sequential(conv, activation_module(g.activation)).eval()


def block_input_shape(geometry: BlockGeometry, batch_size: int) -> Tuple[int, int, int, int]:
    _, c, h, w = geometry.in_shape
    return (batch_size, c, h, w)


def block_flops(geometry: BlockGeometry, batch_size: int) -> float:
    """Multiply-adds x 2 of the merged convolution (the activation is not counted)."""
    g = geometry
    _, _, out_h, out_w = g.out_shape
    return 2.0 * batch_size * out_h * out_w * g.out_channels * (g.in_channels // g.groups) * g.kernel[0] * g.kernel[1]


def table_row(geometry: BlockGeometry, pruned: Pruned, latency_ms: float, std_ms: float,
              timed: bool = True) -> Row:
    g = geometry
    return {"start": g.start, "end": g.end, "latency_ms": latency_ms, "std_ms": std_ms,
            "in_channels": g.in_channels, "out_channels": g.out_channels,
            "kernel": format_pair(g.kernel), "stride": format_pair(g.stride), "groups": g.groups,
            "in_h": g.in_shape[2], "in_w": g.in_shape[3], "timed": int(timed), PRUNED_COLUMN: format_pruned(pruned)}


def row_option(row: Row) -> Option:
    return (row["start"], row["end"], tuple(int(p) for p in row[PRUNED_COLUMN].split()))


def _csv_line(row: Row, columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    values = dict(row, latency_ms=f"{row['latency_ms']:.6f}", std_ms=f"{row['std_ms']:.6f}")
    # A table without pruning options has no pruned column (its rows' cells are all empty).
    csv.DictWriter(buffer, columns, lineterminator="\n", extrasaction="ignore").writerow(values)
    return buffer.getvalue()


def table_text(rows: Iterable[Row], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """The CSV text of ``rows``, header first, sorted by (start, end, pruned convs)."""
    ordered = sorted(rows, key=row_option)
    return ",".join(columns) + "\n" + "".join(_csv_line(r, columns) for r in ordered)


def read_rows(path: Path) -> Dict[Option, Row]:
    """Rows of a (possibly partial) table by block and pruned convs (none where the table has no pruned
    column). A line cut short by an interruption is dropped."""
    rows: Dict[Option, Row] = {}
    with open(path, newline="") as f:
        for record in csv.DictReader(f):
            try:
                row: Row = dict(record, start=int(record["start"]), end=int(record["end"]),
                                latency_ms=float(record["latency_ms"]), std_ms=float(record["std_ms"]),
                                timed=int(record["timed"]), pruned=record.get(PRUNED_COLUMN) or "")
                option = row_option(row)
            except (KeyError, TypeError, ValueError, AttributeError):
                continue
            if any(row.get(c) in (None, "") for c in TABLE_COLUMNS):
                continue
            rows[option] = row
    return rows


TIMING_TEXT = {
    "in-network": ("each block timed inside a whole network (disjoint blocks merged, single convs elsewhere) by "
                   "the runtime's per-node profiler, node times scaled to the network's unprofiled latency less "
                   "the call; rest_ms is what the network of single convs spends outside its convs"),
    "standalone": "each block timed alone as its own model, runs back to back (cache-hot)",
}


def profile_meta(chain: Chain, backend: "Backend", *, model_spec: Optional[str], input_shape: Sequence[int],
                 batch_size: int, precision: str, warmup: int, iters: int,
                 prune_margin: Optional[float] = DEFAULT_PRUNE_MARGIN, timing: str = "standalone",
                 max_block_seconds: Optional[float] = None, prune: bool = False) -> Dict[str, Any]:
    """The meta of a table profiled with these settings (``date`` is set when the table is finished)."""
    return {
        "format": TABLE_FORMAT,
        "timing": timing,
        "timing_method": TIMING_TEXT[timing],
        "model": model_spec,
        "input_shape": [int(x) for x in input_shape],
        "batch_size": int(batch_size),
        "backend": backend.name,
        "backend_version": backend.version,
        "backend_options": backend.options(),
        "device": backend.device,
        "device_name": backend.device_name,
        "threads": backend.threads,
        "precision": precision,
        "warmup": int(warmup),
        "iters": int(iters),
        "statistic": MEDIAN_OF_RUNS if timing == "standalone" else backend.network_statistic,
        "call_overhead": ("subtracted: latency_ms is the median minus call_overhead_ms at the block's input shape "
                          "(the backend's cost of an empty call), floored at "
                          f"{MIN_KEPT_FRACTION:g} x the median") if timing == "standalone" else
                         ("part of rest_ms: paid once per network, measured as the cost of an empty call at the "
                          "model's input shape (call_overhead_ms)"),
        "prune_margin": prune_margin,
        "max_block_seconds": max_block_seconds,
        "pruning": ("rows with timed=0 were not timed: their latency is a lower bound, FLOPs / (m x the fastest "
                    "FLOP/ms measured in rows not floored by the call overhead), m = prune_margin "
                    f"(or {DEFAULT_PRUNE_MARGIN:g} where pruning is off). Either the bound exceeds the cheapest "
                    "split of the block into timed blocks, so the DP never picks it (bounded_blocks), or timing "
                    "the block would have taken more than max_block_seconds (the blocks in capped_blocks; "
                    "the DP may pick these, with an optimistic latency)")
                   if prune_margin or max_block_seconds is not None else "off: every block was timed",
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


def _check_resumable(path: Path, found: Dict[str, Any], wanted: Dict[str, Any], table_path: Path) -> None:
    def value(meta: Dict[str, Any], key: str) -> Any:
        return meta.get(key, RESUME_DEFAULTS.get(key))

    differing = [k for k in RESUME_KEYS if value(found, k) != value(wanted, k)]
    if differing:
        details = ", ".join(f"{k}: {value(found, k)!r} there, {value(wanted, k)!r} now" for k in differing)
        raise UserError(f"{path} was made with other settings ({details}); "
                        f"use a new --out or --overwrite to replace {table_path}")


def _read_meta(path: Path, table_path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{table_path} exists without its meta file {path}; "
                        "use a new --out or --overwrite to replace it") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); use a new --out or --overwrite") from None


def _shape_key(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def _existing_rows(table_path: Path, meta: Dict[str, Any],
                   overwrite: bool) -> Tuple[Dict[Option, Row], Dict[str, Any]]:
    """Rows already measured with the same settings (from an interrupted run, else from the finished
    table) and the meta they were written with (the call overheads subtracted from them, the rest of
    in-network timing, the capped blocks)."""
    partial_table, partial_meta = partial_paths(table_path)
    if overwrite:
        for path in (partial_table, partial_meta):
            path.unlink(missing_ok=True)
        return {}, {}
    for rows_path, found_path in ((partial_table, partial_meta), (table_path, meta_path_for(table_path))):
        if rows_path.exists():
            found = _read_meta(found_path, table_path)
            _check_resumable(found_path, found, meta, table_path)
            _check_evidence(found_path, found, table_path)
            return read_rows(rows_path), found
    return {}, {}


# The meta's networks a profile refits its rest over, and each entry's fields (``fit_rest``).
EVIDENCE_FIELDS = {"network_rests": ("blocks_ms", "rest_ms", "anchor_ms"),
                   "plan_networks": ("rows_ms", "wall_ms", "anchor_ms", "singles_wall_ms")}


def _check_evidence(path: Path, found: Dict[str, Any], table_path: Path) -> None:
    """A resumed meta's networks are what its rest is fitted over again: entries of the wrong form
    (a hand-edited meta) are refused here, in one line, rather than failing the fit."""
    for key, fields in EVIDENCE_FIELDS.items():
        entries = found.get(key) or []
        optional = {"anchor_ms"} if key == "network_rests" else set()  # no anchor: models over its limit
        well_formed = isinstance(entries, list) and all(
            isinstance(entry, list) and len(entry) == len(fields)
            and all((isinstance(v, (int, float)) and not isinstance(v, bool)) or (v is None and f in optional)
                    for f, v in zip(fields, entry))
            for entry in entries)
        if not well_formed:
            raise UserError(f"{path}: {key} must be a list of [{', '.join(fields)}] entries; "
                            f"use a new --out or --overwrite to replace {table_path}")


def _floored(latency_ms: float, overhead_ms: float) -> bool:
    """Whether a standalone row holds the floor ``MIN_KEPT_FRACTION`` x its raw median rather than the median
    less the call overhead: ``max(m - o, f m)`` is the floor exactly when it is below ``o f / (1 - f)``."""
    return latency_ms < overhead_ms * MIN_KEPT_FRACTION / (1 - MIN_KEPT_FRACTION)


def default_timing(backend: "Backend", traced: Optional["TracedModel"]) -> str:
    """in-network where the model is at hand and the backend profiles nodes, else standalone."""
    return "in-network" if traced is not None and backend.profiles_networks else "standalone"


def profile_table(chain: Chain, backend: "Backend", out: "os.PathLike[str] | str", *,
                  model_spec: Optional[str] = None, input_shape: Optional[Sequence[int]] = None,
                  batch_size: Optional[int] = None, precision: str = "fp32", warmup: int = 10, iters: int = 50,
                  overwrite: bool = False, prune_margin: Optional[float] = DEFAULT_PRUNE_MARGIN,
                  progress: Optional[Callable[[ProfileProgress], None]] = None,
                  traced: Optional["TracedModel"] = None, timing: Optional[str] = None,
                  max_block_seconds: Optional[float] = DEFAULT_MAX_BLOCK_SECONDS,
                  prune: bool = False) -> ProfileResult:
    """Time every valid block of ``chain`` on ``backend`` and write the latency table ``out`` (+ meta).

    ``batch_size`` replaces N of the chain's input shape for timing (default: that N).
    Re-running with the same settings resumes an interrupted run and re-times nothing
    it already has; other settings are refused unless ``overwrite``. ``prune_margin``
    None times every block; otherwise dominated blocks are bounded, not timed (module doc).
    ``timing`` is ``in-network`` (needs ``traced``, the model ``chain`` was traced from, and a
    backend that profiles nodes) or ``standalone``; default: :func:`default_timing`.
    ``max_block_seconds`` bounds, instead of timing, a block that would take longer (module doc; None: no cap).
    ``prune`` writes a row per pruning option of each block (module doc).
    """
    from dpcompress.backends import check_precision
    from dpcompress.latency.network_timing import minimum_runs

    if warmup < 0 or iters < 1:
        raise UserError("--warmup must be >= 0 and --iters >= 1")
    if prune_margin is not None and prune_margin < 1:
        raise UserError(f"--prune-margin must be at least 1 (got {prune_margin}); use --time-all to time every block")
    if max_block_seconds is not None and not max_block_seconds > 0:
        raise UserError(f"--max-block-seconds must be positive (got {max_block_seconds})")
    timing = timing or default_timing(backend, traced)
    if timing not in TIMINGS:
        raise UserError(f"unknown timing {timing!r}; use one of {', '.join(TIMINGS)}")
    if timing == "in-network" and not backend.profiles_networks:
        raise UserError(f"the {backend.name} backend cannot time blocks inside a network; use --timing standalone")
    if timing == "in-network" and traced is None:
        raise UserError("in-network timing needs the model, not only its chain; use --timing standalone")
    check_precision(precision, backend.device)
    input_shape = tuple(input_shape or chain.input_shape)
    batch_size = int(batch_size or input_shape[0])
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {batch_size})")
    table_path = Path(out)
    meta = profile_meta(chain, backend, model_spec=model_spec, input_shape=input_shape, batch_size=batch_size,
                        precision=precision, warmup=warmup, iters=iters, prune_margin=prune_margin, timing=timing,
                        max_block_seconds=max_block_seconds, prune=prune)
    columns = PRUNED_TABLE_COLUMNS if prune else TABLE_COLUMNS
    blocks = [(start, end, pruned) for start, end in chain.valid_blocks()
              for pruned in (pruning_options(chain, start, end) if prune else [()])]
    geometries = {option: block_geometry(chain, *option) for option in blocks}  # computed once: not cheap
    # A block whose merge would take more memory than allowed gets no row: the DP cannot choose it.
    limit = max_merge_bytes()
    unbuildable = sorted(option for option in geometries
                         if option[1] - option[0] > 1 and block_merge_bytes(chain, *option) > limit)
    for option in unbuildable:
        del geometries[option]
    blocks = [option for option in blocks if option in geometries]
    meta = dict(meta, max_merge_bytes=limit, unbuildable_blocks=_option_entries(unbuildable))
    valid = set(blocks)
    existing, found = _existing_rows(table_path, meta, overwrite)
    overhead_by_shape: Dict[str, float] = dict(found.get("call_overhead_ms") or {})
    rest_ms: Optional[float] = found.get("singles_rest_ms", found.get("rest_ms"))  # the singles' network's
    # Each quiet network's blocks' sum, rest and anchor level (None without an anchor), for ``fit_rest``.
    network_rests: List[List[Optional[float]]] = [list(entry) for entry in found.get("network_rests") or []]
    # Each plan network's (``plan_covers``) quiet try: its blocks' sum by the table's rows, wall, anchor level and
    # the network of single convs' wall it is scaled to (``plan_network_rests``).
    plan_networks: List[List[Optional[float]]] = [list(entry) for entry in found.get("plan_networks") or []]
    rows = {b: r for b, r in existing.items() if b in valid}
    capped = {_capped_option(entry) for entry in found.get("capped_blocks") or []} & set(rows)
    resumed = len(rows)
    # Identity options are no node at all: latency 0, exact without timing.
    for option, geometry in geometries.items():
        if geometry.identity and option not in rows:
            rows[option] = table_row(geometry, option[2], 0.0, 0.0)
    groups = group_by_shape({option: g for option, g in geometries.items() if not g.identity})
    for shape in groups:
        activation_module(shape.activation)  # an unknown activation fails now, not halfway through
    # A shape one of whose blocks already has a timed row needs no timing: its latency is reused.
    to_time = [shape for shape, members in groups.items() if not any(rows.get(b, {}).get("timed") for b in members)]
    flops = {shape: block_flops(geometries[members[0]], batch_size) for shape, members in groups.items()}
    # Single convs first (every bound is checked against them), then by growing cost.
    order = sorted(groups, key=lambda shape: (all(e - s > 1 for s, e, _ in groups[shape]), flops[shape]))
    starts_of: Dict[int, List[int]] = {}  # end position -> starts of the valid blocks ending there
    for start, end in chain.valid_blocks():
        starts_of.setdefault(end, []).append(start)
    bound_margin = prune_margin or DEFAULT_PRUNE_MARGIN
    # Every plan is built on the single convs, so they are always timed, whatever the cap.
    has_single = {shape: any(e - s == 1 for s, e, _ in members) for shape, members in groups.items()}

    def overhead_of(block: Option) -> float:
        return overhead_by_shape.get(_shape_key(block_input_shape(geometries[block], batch_size)), 0.0)

    def measured(block: Option, row: Row) -> bool:
        """Whether a row's latency is a measurement of its conv (timed and, standalone, not floored)."""
        if not row["timed"] or row["latency_ms"] <= 0:
            return False
        return timing != "standalone" or not _floored(row["latency_ms"], overhead_of(block))

    # The bounds divide FLOPs by the fastest rate measured, so that rate must come from measurements
    # only. A floored row holds MIN_KEPT_FRACTION x its raw median, not its conv's time: a tiny conv
    # whose time is mostly the call overhead would look up to 1 / MIN_KEPT_FRACTION times faster than
    # it is, which pulls every bound down: dominated blocks would be timed, capped ones look cheap.
    best_rate = max((flops[block_shape(geometries[b])] / r["latency_ms"] for b, r in rows.items() if measured(b, r)),
                    default=0.0)

    def lower_bound(shape: BlockShape) -> Optional[float]:
        return flops[shape] / (bound_margin * best_rate) if best_rate > 0 else None

    def pruned_within(block: Option, start: int, end: int) -> Option:
        """The part (start, end) of ``block``, pruning what ``block`` prunes there."""
        return (start, end, tuple(p for p in block[2] if start < p <= end))

    def singles_ms(block: Option) -> Optional[float]:
        singles = [rows.get(pruned_within(block, p - 1, p)) for p in range(block[0] + 1, block[1] + 1)]
        if any(r is None or not r["timed"] for r in singles):
            return None
        return sum(r["latency_ms"] for r in singles)  # type: ignore[index]

    def cheapest_split_ms(block: Option) -> Optional[float]:
        """The cheapest cover of ``block`` by two or more timed blocks that together prune what it
        prunes (stage 1 over the rows so far); bounded rows do not count: their latency is no upper bound."""
        start, end, _ = block
        best = {start: 0.0}
        for k in range(start + 1, end + 1):
            parts = [(m, pruned_within(block, m, k)) for m in starts_of.get(k, ()) if m in best]
            costs = [best[m] + rows[part]["latency_ms"] for m, part in parts
                     if part != block and part in rows and rows[part]["timed"]]
            if costs:
                best[k] = min(costs)
        return best.get(end)

    def dominated(shape: BlockShape, blocks: List[Option]) -> Optional[float]:
        """The lower bound to write for ``blocks``, if it shows each of them slower than a split of it."""
        bound = lower_bound(shape) if prune_margin else None
        if bound is None:
            return None
        for block in blocks:
            if block[1] - block[0] == 1:
                return None
            singles = singles_ms(block)  # one split, and usually enough
            if singles is not None and bound > singles:
                continue
            split = cheapest_split_ms(block)
            if split is None or bound <= split:
                return None
        return bound

    def over_cap(shape: BlockShape, runs: int) -> Optional[float]:
        """The lower bound to write for a shape whose ``runs`` runs would take longer than the cap even at it."""
        bound = lower_bound(shape)
        if max_block_seconds is None or has_single[shape] or bound is None:
            return None
        return bound if runs * bound / 1e3 > max_block_seconds else None

    # Keyed NxCxHxW as in the meta; an interrupted run's values are kept, so that every row of a
    # table has the same overhead taken off for its input shape.
    network_input = (batch_size, *input_shape[1:])
    overhead_shapes = ({block_input_shape(geometries[groups[shape][0]], batch_size) for shape in to_time}
                       if timing == "standalone" else ({tuple(network_input)} if to_time else set()))
    for shape_in in sorted(overhead_shapes):
        if _shape_key(shape_in) not in overhead_by_shape:
            overhead_by_shape[_shape_key(shape_in)] = backend.call_overhead_ms(shape_in, precision, warmup, iters)
    meta = dict(meta, call_overhead_ms=overhead_by_shape, capped_blocks=_option_entries(capped))
    if rest_ms is not None:
        meta["rest_ms"] = rest_ms

    partial_table, partial_meta = partial_paths(table_path)
    # Plan networks are timed once the rows are done: by a run that timed rows, or that resumes one cut short.
    time_plans = timing == "in-network" and "plan_networks" not in found and (bool(to_time) or partial_table.exists())
    write_json_atomic(partial_meta, meta)
    write_text_atomic(partial_table, table_text(rows.values(), columns))  # drops a line cut short last time
    started = time.perf_counter()
    timed = handled = 0
    runs_per_block = warmup + iters if timing == "standalone" else minimum_runs(warmup)

    def report() -> None:
        if progress is None:
            return
        elapsed = time.perf_counter() - started
        eta = elapsed / handled * (len(to_time) - handled) if handled else None
        progress(ProfileProgress(len(rows), len(blocks), handled, len(to_time), elapsed, eta))

    def write(sink: Any, shape: BlockShape, latency: float, std: float, was_timed: bool) -> List[Option]:
        written = []
        for block in groups[shape]:
            if block not in rows:
                row = table_row(geometries[block], block[2], latency, std, was_timed)
                rows[block] = row
                sink.write(_csv_line(row, columns))
                written.append(block)
        return written

    def cap(sink: Any, shape: BlockShape, bound: float) -> None:
        """Write ``shape``'s rows as bounds over the cap; the partial meta lists them, for a resumed run."""
        nonlocal handled
        capped.update(write(sink, shape, bound, float("nan"), False))
        meta["capped_blocks"] = _option_entries(capped)
        write_json_atomic(partial_meta, meta)
        handled += 1

    def settle(sink: Any, shape: BlockShape) -> bool:
        """Write ``shape``'s rows without timing it where that is possible: an earlier row of the same
        shape, a bound that shows it dominated, or one that shows its runs over the cap. True when done so."""
        nonlocal handled
        members = groups[shape]
        missing = [b for b in members if b not in rows]
        if not missing:
            return True
        done = next((rows[b] for b in members if b in rows and rows[b]["timed"]), None)
        if done is not None:
            write(sink, shape, done["latency_ms"], done["std_ms"], True)
            return True
        bound = dominated(shape, missing)
        if bound is not None:
            write(sink, shape, bound, float("nan"), False)
            handled += 1
            return True
        bound = over_cap(shape, runs_per_block)
        if bound is not None:
            cap(sink, shape, bound)
            return True
        return False

    def flush(sink: Any) -> None:
        sink.flush()
        os.fsync(sink.fileno())
        report()

    report()
    anchor: Optional["Anchor"] = None  # in-network timing's, where the model is small enough for one
    with open(partial_table, "a") as sink:
        if timing == "standalone":
            for shape in order:
                if settle(sink, shape):
                    flush(sink)
                    continue
                geometry = geometries[groups[shape][0]]
                shape_in = block_input_shape(geometry, batch_size)
                overhead = overhead_by_shape[_shape_key(shape_in)]
                began = time.perf_counter()
                runner = backend.prepare(block_module(geometry), shape_in, precision)
                if max_block_seconds is not None and not has_single[shape]:
                    first_ms = runner.time(0, 1)[0]  # one run shows what the others will cost
                    if time.perf_counter() - began + runs_per_block * first_ms / 1e3 > max_block_seconds:
                        cap(sink, shape, lower_bound(shape) or _kept_latency(first_ms, overhead))
                        flush(sink)
                        continue
                stats = time_runner(runner, warmup, iters)
                latency = _kept_latency(stats.median_ms, overhead)
                if latency > 0 and not _floored(latency, overhead):
                    best_rate = max(best_rate, flops[shape] / latency)
                write(sink, shape, latency, stats.std_ms, True)
                timed += 1
                handled += 1
                flush(sink)
        else:
            from dpcompress.latency.network_timing import pack, packed_plan, time_networks

            assert traced is not None
            overhead = overhead_by_shape[_shape_key(network_input)] if to_time else 0.0
            pending = list(order)
            model_bytes = _parameter_bytes(traced)
            anchor = _anchor(backend, traced, geometries, network_input, precision, warmup) \
                if (pending or time_plans) and model_bytes <= ANCHOR_MAX_BYTES else None
            loaded = int(found.get("loaded_networks") or 0)
            networks_per_round = max(1, min(NETWORKS_PER_ROUND, NETWORK_BYTES_PER_ROUND // max(1, model_bytes)))

            def round_shapes(shapes: List[BlockShape]) -> List[BlockShape]:
                """The first of ``shapes`` whose merged weights fit in the round beside the networks' own
                (at least one): merged kernels reach hundreds of MiB (mnasnet1_0 at 64x64: 540 MiB), and
                each is held by torch, the ONNX export and two sessions."""
                room = NETWORK_BYTES_PER_ROUND - networks_per_round * model_bytes
                taken: List[BlockShape] = []
                for shape in shapes:
                    room -= _weight_bytes(geometries[groups[shape][0]])
                    if taken and room < 0:
                        break
                    taken.append(shape)
                return taken

            alone: set = set()  # shapes whose shared network went over the cap: next, each in its own
            shape_anchor: Dict[BlockShape, float] = {}  # the anchor's level while each shape's network ran
            rest_anchor_ms: Optional[float] = None
            judged_again = False
            stale: Dict[BlockShape, Tuple[float, float, float]] = {}  # timed again: latency, std, anchor before
            stale_rest: Optional[Tuple[float, float]] = None
            while pending:
                # Shapes settled without timing go; the rest, cheapest first, fill a round of networks.
                pending = [shape for shape in pending if not settle(sink, shape)]
                flush(sink)
                if not pending:
                    break
                # The network of single convs comes first: every single conv, and the rest of the network.
                singles_network = rest_ms is None or any(e - s == 1 for shape in pending
                                                         for s, e, _ in groups[shape])
                lone = [shape for shape in pending if shape in alone][:NETWORKS_PER_ROUND]
                if singles_network:
                    networks: List[List[Option]] = [[]]
                elif lone:
                    networks = [[_member_for(groups[shape], rows)] for shape in lone]
                else:
                    networks, _ = pack([_member_for(groups[shape], rows) for shape in round_shapes(pending)],
                                       networks_per_round)
                plans = [packed_plan(chain, [(s, e) for s, e, _ in members],
                                     pruned=[p for *_, pruned in members for p in pruned]) for members in networks]
                # The cap needs a bound to write: none before a rate was measured (the singles' network).
                limit = None if singles_network or best_rate <= 0 else max_block_seconds
                results = time_networks(backend, traced, plans, geometries, network_input, precision, warmup,
                                        iters, overhead, max_seconds=limit, anchor=anchor)
                timed_now = set()
                loaded += sum(1 for result in results if result is not None and not result.quiet)
                if anchor is not None:
                    meta.update(quiet_margin=QUIET_MARGIN, anchor_quiet_ms=quiet_level(anchor.history),
                                loaded_networks=loaded)
                for members, result in zip(networks, results):
                    if result is None:  # over the cap
                        shapes = [block_shape(geometries[block]) for block in members]
                        if len(members) == 1:
                            cap(sink, shapes[0], lower_bound(shapes[0]))  # type: ignore[arg-type]
                        alone.update(shapes)
                        continue
                    for block, (latency, std) in result.blocks.items():
                        shape = block_shape(geometries[block])
                        if shape in timed_now or not any(b not in rows for b in groups[shape]):
                            continue
                        anchor_ms = result.anchor_ms
                        if shape in stale and (anchor_ms is None or anchor_ms >= stale[shape][2]):
                            latency, std, anchor_ms = stale[shape]  # timed again no nearer quiet: kept
                        write(sink, shape, latency, std, True)
                        timed_now.add(shape)
                        if anchor_ms is not None:
                            shape_anchor[shape] = anchor_ms
                        if latency > 0:
                            best_rate = max(best_rate, flops[shape] / latency)
                network_rests.extend([result.blocks_ms, result.rest_ms, result.anchor_ms] for result in results
                                     if result is not None and result.quiet)
                meta["network_rests"] = network_rests
                if singles_network:
                    assert results[0] is not None
                    rest_ms, rest_anchor_ms = results[0].rest_ms, results[0].anchor_ms
                    if stale_rest is not None and (rest_anchor_ms is None or rest_anchor_ms >= stale_rest[1]):
                        rest_ms, rest_anchor_ms = stale_rest
                    meta["rest_ms"] = rest_ms
                write_json_atomic(partial_meta, meta)
                timed += len(timed_now)
                handled += len(timed_now & set(pending))
                pending = [shape for shape in pending if shape not in timed_now]
                flush(sink)
                if not pending and anchor is not None and not judged_again:
                    # Judged against the whole profile's quiet level now: networks timed in a state taken for
                    # quiet before a quieter one showed (a profile that starts loaded) are timed again, once;
                    # where the new network ran no nearer the quiet level, the first figures stay.
                    judged_again = True
                    pending = [shape for shape in order if shape in shape_anchor
                               and not anchor.is_quiet(shape_anchor[shape])]
                    for shape in pending:
                        first = next(rows[block] for block in groups[shape] if block in rows)
                        stale[shape] = (first["latency_ms"], first["std_ms"], shape_anchor.pop(shape))
                        for block in groups[shape]:
                            rows.pop(block, None)
                    if rest_ms is not None and rest_anchor_ms is not None and not anchor.is_quiet(rest_anchor_ms):
                        stale_rest = (rest_ms, rest_anchor_ms)
                        rest_ms = None
                    timed -= len(pending)
                    handled -= len(pending)
                    meta["retimed_shapes"] = len(pending)
            if time_plans and rest_ms is not None and anchor is not None:
                # A node's time depends on the network around it (OpenVINO's run faster in a light network):
                # whole plans' walls against their rows' sums tell how a plan pays its rows.
                row_ms = {(s, e): r["latency_ms"] for (s, e, pruned), r in rows.items() if not pruned and r["timed"]}
                singles_wall_ms = math.fsum([*(row_ms[(p - 1, p)] for p in range(1, chain.num_positions + 1)), rest_ms])
                covers = plan_covers(chain.num_positions, row_ms)
                for _ in range(PLAN_NETWORK_TRIES):  # a loaded state can outlast one try's extra rounds
                    results = time_networks(backend, traced, [packed_plan(chain, cover) for cover in covers],
                                            geometries, network_input, precision, warmup, iters, overhead, anchor=anchor)
                    near = [result is not None and result.quiet and result.anchor_ms is not None
                            and result.anchor_ms <= PLAN_NETWORK_MARGIN * quiet_level(anchor.history)
                            for result in results]
                    for cover, result in zip(covers, results):
                        if result is not None and result.quiet:
                            table_ms = math.fsum(row_ms[block] for block in cover_blocks(chain.num_positions, cover))
                            plan_networks.append([table_ms, result.wall_ms, result.anchor_ms, singles_wall_ms])
                    covers = [cover for cover, result, ok in zip(covers, results, near) if result is not None and not ok]
                    if not covers:
                        break
                # The level as the fit judges by it: a profile run again on the table judges by the meta's.
                meta.update(plan_networks=plan_networks, anchor_quiet_ms=quiet_level(anchor.history))
                write_json_atomic(partial_meta, meta)

    if network_rests:  # kept by a run that timed nothing, as the fit below is
        meta["network_rests"] = network_rests
    for key in ("quiet_margin", "anchor_quiet_ms", "loaded_networks", "retimed_shapes"):
        if key not in meta and key in found:  # set by the run that timed the networks; this one timed none
            meta[key] = found[key]
    if time_plans or "plan_networks" in found:
        meta["plan_networks"] = plan_networks
    if timing == "in-network" and meta.get("rest_ms") is not None:
        # A network's rest grows with the network (OpenVINO: a deep plan's is smaller than the original's):
        # fitted over the networks that stayed quiet by the whole profile's level, where the fit holds.
        if anchor is not None and anchor.history:
            level_ms: Optional[float] = quiet_level(anchor.history)
        else:  # nothing timed now: the level the networks were judged by when they were
            level_ms = found.get("anchor_quiet_ms")
        fitted = profile_rest_fit(network_rests, plan_networks, level_ms, meta["rest_ms"])  # type: ignore[arg-type]
        if fitted is not None:
            meta.update(singles_rest_ms=meta["rest_ms"], rest_ms=fitted.fixed_ms, rest_per_block=fitted.per_block,
                        rest_fit=fitted.over)
    meta = dict(meta, num_blocks=len(chain.valid_blocks()), num_rows=len(blocks), unique_shapes=len(groups),
                identity_rows=sum(1 for g in geometries.values() if g.identity),
                bounded_blocks=sum(1 for b, r in rows.items() if not r["timed"] and b not in capped),
                capped_blocks=_option_entries(capped),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    write_json_atomic(meta_path_for(table_path), meta)
    write_text_atomic(table_path, table_text(rows.values(), columns))
    partial_table.unlink()
    partial_meta.unlink()
    return ProfileResult(table_path, meta_path_for(table_path), meta,
                         sorted(rows.values(), key=row_option), timed, resumed)


def _anchor(backend: "Backend", traced: "TracedModel", geometries: Dict[Option, BlockGeometry],
            input_shape: Sequence[int], precision: str, warmup: int) -> "Anchor":
    """The network of single convs, prepared to run plainly between rounds (about 50 ms a time)."""
    import torch

    from dpcompress.latency.network_timing import Anchor, packed_network, packed_plan

    with torch.no_grad():
        network, _ = packed_network(traced, packed_plan(traced.chain, []), geometries)
        runner = backend.prepare(network, input_shape, precision)
    del network
    first_ms = min(runner.time(max(1, warmup), 3))
    return Anchor(runner, max(3, min(10, math.ceil(50 / max(first_ms, 1e-3)))))


def median_of_tables(tables: Sequence["os.PathLike[str] | str"], out: "os.PathLike[str] | str") -> Dict[str, Any]:
    """Write at ``out`` the table whose every row is the median of that row over ``tables`` (made alike,
    each in a process of its own), with the median rest and call overheads; returns its meta.

    A shared machine's speed switches between states for seconds to minutes at a time, unevenly over
    kinds of conv (benchmarks/RESULTS.md, "Quiet and loaded phases"): tables made one after another meet
    different states, and a median over several leans on none. A row timed in any of the tables gets
    the median of its timed values; a row that every table bounded (as dominated, or over the per-block cap) gets the largest of its
    bounds: a median of bounds against medians of timed rows could make a dominated block look cheaper
    than the convs it stands for, and the DP would pick it."""
    if not tables:
        raise ValueError("median_of_tables needs at least one table")
    metas = [_read_meta(meta_path_for(path), Path(path)) for path in tables]
    for path, meta in zip(tables[1:], metas[1:]):
        _check_resumable(meta_path_for(path), meta, metas[0], Path(out))
    row_sets = [read_rows(Path(path)) for path in tables]
    if any(set(rows) != set(row_sets[0]) for rows in row_sets[1:]):
        raise UserError(f"the tables {', '.join(map(str, tables))} do not have the same blocks; make them alike")
    rows = {}
    for option, first in row_sets[0].items():
        timed = [r[option] for r in row_sets if r[option]["timed"]]
        if timed:
            rows[option] = dict(first, latency_ms=statistics.median(r["latency_ms"] for r in timed),
                                std_ms=statistics.median(r["std_ms"] for r in timed), timed=1)
        else:
            rows[option] = dict(first, latency_ms=max(r[option]["latency_ms"] for r in row_sets),
                                std_ms=float("nan"), timed=0)
    # Capped where some table capped it and no table timed it; the other bounds are dominance bounds.
    capped = {option for m in metas for option in map(_capped_option, m.get("capped_blocks") or [])
              if not rows[option]["timed"]}
    meta = dict(metas[0], processes=len(tables),
                process_original_ms=[read_latency_table(path).original_latency_ms() for path in tables],
                capped_blocks=_option_entries(capped),
                bounded_blocks=sum(1 for option, row in rows.items() if not row["timed"] and option not in capped),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    for key in ("network_rests", "plan_networks", "rest_per_block", "singles_rest_ms", "rest_fit"):
        meta.pop(key, None)  # the first table's own fit
    singles_rests = [m.get("singles_rest_ms", m.get("rest_ms")) for m in metas]
    if all(m.get("rest_per_block") is not None for m in metas):  # every table fitted its rest: the medians
        meta.update(rest_ms=statistics.median(m["rest_ms"] for m in metas),
                    rest_per_block=statistics.median(m["rest_per_block"] for m in metas),
                    singles_rest_ms=statistics.median(singles_rests))
        fits = {m.get("rest_fit") for m in metas}
        if len(fits) == 1 and None not in fits:  # each over the same kind of networks
            meta["rest_fit"] = fits.pop()
    elif all(rest is not None for rest in singles_rests):
        meta["rest_ms"] = statistics.median(singles_rests)
    if all(m.get("anchor_quiet_ms") is not None for m in metas):
        meta["anchor_quiet_ms"] = statistics.median(m["anchor_quiet_ms"] for m in metas)
        meta["loaded_networks"] = sum(m.get("loaded_networks") or 0 for m in metas)
        meta["retimed_shapes"] = sum(m.get("retimed_shapes") or 0 for m in metas)
    overheads = [m.get("call_overhead_ms") or {} for m in metas]
    meta["call_overhead_ms"] = {shape: statistics.median(o[shape] for o in overheads if shape in o)
                                for shape in overheads[0]}
    write_json_atomic(meta_path_for(out), meta)
    write_text_atomic(out, table_text(rows.values(), metas[0].get("columns") or TABLE_COLUMNS))
    return meta


def _option_entries(options: Iterable[Option]) -> List[List[Any]]:
    """Blocks listed in the meta (capped_blocks, unbuildable_blocks): ``[start, end]``, with the pruned
    convs third where there are any."""
    return [[s, e, list(pruned)] if pruned else [s, e] for s, e, pruned in sorted(options)]


def _capped_option(entry: Sequence[Any]) -> Option:
    return (int(entry[0]), int(entry[1]), tuple(int(p) for p in entry[2]) if len(entry) > 2 else ())


def _kept_latency(median_ms: float, overhead_ms: float) -> float:
    """A standalone row's latency: the median less the call overhead, floored (module doc)."""
    return max(median_ms - overhead_ms, MIN_KEPT_FRACTION * median_ms)


def _member_for(members: List[Option], rows: Dict[Option, Row]) -> Option:
    """The block that stands for a shape in a timed network: the first without a row."""
    return next(b for b in members if b not in rows)


def _weight_bytes(geometry: BlockGeometry) -> int:
    g = geometry
    return 4 * g.out_channels * (g.in_channels // g.groups) * g.kernel[0] * g.kernel[1]


def _parameter_bytes(traced: "TracedModel") -> int:
    return sum(p.numel() * p.element_size() for p in traced.gm.parameters())
