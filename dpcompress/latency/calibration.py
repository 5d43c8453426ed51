"""The machine's state in an in-network profile: the quiet-state anchor, timing again, plan networks and the
fit of the rest. One interface, two kinds: :class:`QuietCalibration` (a shared CPU) and :class:`NoCalibration`
(a quiet target such as a GPU, and standalone timing).

A shared machine switches between a quiet state and loaded ones for seconds to minutes at a time, and a loaded
state slows some blocks far more than others (docs/latency.md). So where the target is shared, the profile
runs an anchor (the network of single convs) between its rounds of networks (``network_timing.Anchor``) and
reads each network from its quiet rounds; once every shape is timed, the networks that ran in a state taken
for quiet before a quieter one showed are timed again, once, and the first figures stay where the new network
ran no nearer the quiet level.

The network of single convs gives the table's ``rest_ms`` (head, pooling, layout conversions, the call). That
rest grows with the network, and a node's time depends on the network around it (OpenVINO's run faster in a
network as light as a deep plan), so once the rows are done the profile also times two plan networks
(``plan_covers``: the cheapest cover of the chain by its rows, pruning options included, and every other
merged block of it: pruned plans cost less than any cover without pruning, so the line reaches them) and fits
the rest as ``rest_ms`` plus ``rest_per_block`` times a plan's blocks. The method (``CalibrationSettings.
rest_fit``) is over WHOLE_NETWORKS: each plan network's wall against its rows (``plan_network_rests``) and the
network of single convs' against its own, where the plan networks ran within ``plan_network_margin`` of the
quiet level. The line holds those walls between the deepest plan and the original, so it may have a negative
fixed part, or a negative share where merged blocks cost more in a plan than where their rows were read (ONNX
Runtime). Where the cheapest cover merges nothing, the original's own rest is that line. Where it cannot be
applied (no plan network ran near the level, or whole networks give no line: rows that would cost nothing),
the fit is over ALL_NETWORKS that stayed quiet (the plan networks and each packed network's wall against its
own blocks), and the profile says so (``Calibration.notes``); the meta's ``rest_fit`` names the fit used and
``calibration`` the kind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from dpcompress.latency.blocks import Option
from dpcompress.latency.timing import QUIET_MARGIN, quiet_level, quiet_rounds

if TYPE_CHECKING:  # pragma: no cover
    from dpcompress.latency.network_timing import Anchor, NetworkTiming

# The network of single convs and the plan networks: the original and plans as the solver returns them, each
# whole network's wall against the table's rows. A packed network's rest is its wall against its own nodes'
# times, which leaves out what its blocks' neighbours change in them.
WHOLE_NETWORKS = "whole networks"
ALL_NETWORKS = "all quiet networks"
REST_FIT_WORDS = {WHOLE_NETWORKS: "the original and whole plans, each network against the table's rows",
                  ALL_NETWORKS: "the profile's quiet networks"}
# The meta's ``calibration``: which kind made the table.
QUIET_ANCHOR = "quiet anchor"
NO_CALIBRATION = "none"


@dataclass(frozen=True)
class CalibrationSettings:
    """How a profile on a shared machine handles its state (module doc)."""

    rest_fit: str = WHOLE_NETWORKS  # the intended fit of the rest: WHOLE_NETWORKS, or ALL_NETWORKS alone
    # A fit over packed networks needs this many quiet ones, whose blocks' sums span at least rest_fit_span
    # (largest over smallest): with fewer, or closer, the slope is noise.
    min_rest_networks: int = 5
    rest_fit_span: float = 1.2
    # Plan networks count in the fit where the anchor ran within plan_network_margin of its quiet level beside
    # them (a loaded state raises a deep plan's speed-up by some 0.6 of the original's slowdown, and these few
    # networks weigh most in the fit's slope); those that did not are timed again, up to plan_network_tries
    # times in all.
    plan_network_margin: float = 1.05
    plan_network_tries: int = 3
    # The anchor is one more session of the model: models with more weights go without it (1 GiB: vgg19_bn's
    # 548 MB take the anchor, and so one calibration, as every shipped table does).
    anchor_max_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if self.rest_fit not in REST_FIT_WORDS:
            raise ValueError(f"rest_fit must be one of {', '.join(REST_FIT_WORDS)} (got {self.rest_fit!r})")


DEFAULT_CALIBRATION = CalibrationSettings()


def fit_rest(networks: Sequence[Tuple[float, float]], min_networks: int = DEFAULT_CALIBRATION.min_rest_networks,
             interpolating: bool = False, span: float = DEFAULT_CALIBRATION.rest_fit_span
             ) -> Optional[Tuple[float, float]]:
    """The rest as a fixed part plus a share of the blocks: least squares of each network's rest (its wall less
    its blocks) on its blocks' sum, from ``(blocks_ms, rest_ms)`` pairs. Returns ``(fixed_ms, per_block)``, or
    None where there are fewer than ``min_networks`` networks, their sums span less than ``span``, or the rest
    shrinks as the network grows (noise, not a cost). A fixed part fitted below 0 is none: the share is then
    fitted alone. Unless ``interpolating``, where the networks are the smallest and largest plans the line will
    price (the deepest plan and the original): it holds their walls between them whatever its value at 0, and
    a rest that shrinks as the network grows is then measured, not noise (on ONNX Runtime a merged block costs
    more in a plan than in the network its row was read in), as long as rows still cost something
    (``per_block`` above -1)."""
    if len(networks) < min_networks:
        return None
    sums = [blocks for blocks, _ in networks]
    if min(sums) <= 0 or max(sums) < span * min(sums):
        return None
    mean_x = math.fsum(sums) / len(sums)
    mean_y = math.fsum(rest for _, rest in networks) / len(networks)
    spread = math.fsum((x - mean_x) ** 2 for x in sums)
    per_block = math.fsum((x - mean_x) * (y - mean_y) for x, y in networks) / spread
    fixed_ms = mean_y - per_block * mean_x
    if fixed_ms < 0 and not interpolating:
        fixed_ms, per_block = 0.0, math.fsum(x * y for x, y in networks) / math.fsum(x * x for x in sums)
    if per_block <= -1 or (per_block < 0 and not interpolating):
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


def near_plan_networks(plan_networks: Sequence[Sequence[float]], level_ms: Optional[float],
                       settings: CalibrationSettings = DEFAULT_CALIBRATION) -> List[Sequence[float]]:
    """The plan networks timed within ``plan_network_margin`` of the quiet level ``level_ms`` (None: all)."""
    return [entry for entry in plan_networks if level_ms is None or entry[2] <= settings.plan_network_margin * level_ms]


def whole_networks_fit(plan_networks: Sequence[Sequence[float]], level_ms: Optional[float],
                       singles_rest_ms: Optional[float], settings: CalibrationSettings = DEFAULT_CALIBRATION
                       ) -> Tuple[Optional[RestFit], str]:
    """The rest fitted over whole networks (the plan networks near the level, and the network of single convs:
    its rows' sum and ``singles_rest_ms``, from the wall each plan was scaled to); else None and why not."""
    near_entries = near_plan_networks(plan_networks, level_ms, settings)
    if not plan_networks:
        return None, "no plan network was timed"
    if not near_entries:
        return None, f"no plan network ran within {settings.plan_network_margin:g}x of the quiet level"
    if singles_rest_ms is None:
        return None, "the network of single convs has no rest"
    near = [(rows_ms, rest) for rows_ms, rest, _ in plan_network_rests(near_entries)]
    singles = sorted({(singles_wall_ms - singles_rest_ms, singles_rest_ms) for *_, singles_wall_ms in near_entries})
    # Read only between its networks, the line holds their walls however close they are: no span asked.
    whole = fit_rest([*near, *singles], min_networks=2, interpolating=True, span=1.0)
    if whole is None:
        return None, "whole networks give no line (rows would cost nothing in a plan)"
    return RestFit(*whole, WHOLE_NETWORKS), ""


def all_networks_fit(network_rests: Sequence[Sequence[Optional[float]]], plan_networks: Sequence[Sequence[float]],
                     level_ms: Optional[float], settings: CalibrationSettings = DEFAULT_CALIBRATION
                     ) -> Optional[RestFit]:
    """The rest fitted over every network that stayed quiet by ``level_ms`` (None: everything counts): the
    packed networks, and the plan networks near the level."""
    quiet = [(blocks_ms, rest) for blocks_ms, rest, anchor_ms in network_rests
             if anchor_ms is None or level_ms is None or quiet_rounds([anchor_ms], level_ms)[0]]
    near = [(rows_ms, rest) for rows_ms, rest, _ in plan_network_rests(near_plan_networks(plan_networks, level_ms,
                                                                                          settings))]
    fitted = fit_rest([*quiet, *near], min_networks=settings.min_rest_networks,  # type: ignore[list-item]
                      span=settings.rest_fit_span)
    return RestFit(*fitted, ALL_NETWORKS) if fitted is not None else None


def profile_rest_fit(network_rests: Sequence[Sequence[Optional[float]]],
                     plan_networks: Sequence[Sequence[float]],
                     level_ms: Optional[float], singles_rest_ms: Optional[float] = None,
                     settings: CalibrationSettings = DEFAULT_CALIBRATION, cover_merges: bool = True
                     ) -> Optional[RestFit]:
    """The rest fitted over a profile's evidence (meta ``network_rests`` and ``plan_networks``) as the
    profile fits it, judged by its quiet level ``level_ms`` (None: everything counts): over whole networks
    where they give a fit (and ``settings.rest_fit`` intends it), else over all quiet networks. Where the cheapest
    cover of the chain by the rows merges nothing (``cover_merges`` False: meta ``cheapest_cover_merges``), the
    original is the cheapest whole network the rows can price, and the line over whole networks is its rest."""
    return rest_fit_and_note(network_rests, plan_networks, level_ms, singles_rest_ms, settings, cover_merges)[0]


def rest_fit_and_note(network_rests: Sequence[Sequence[Optional[float]]], plan_networks: Sequence[Sequence[float]],
                      level_ms: Optional[float], singles_rest_ms: Optional[float],
                      settings: CalibrationSettings = DEFAULT_CALIBRATION, cover_merges: bool = True
                      ) -> Tuple[Optional[RestFit], str]:
    """:func:`profile_rest_fit`, and a line saying so where the intended method could not be applied."""
    why = ""
    if settings.rest_fit == WHOLE_NETWORKS:
        if not cover_merges and singles_rest_ms is not None:  # the original is the only whole network to price
            return RestFit(singles_rest_ms, 0.0, WHOLE_NETWORKS), ""
        whole, why = whole_networks_fit(plan_networks, level_ms, singles_rest_ms, settings)
        if whole is not None:
            return whole, ""
    fitted = all_networks_fit(network_rests, plan_networks, level_ms, settings)
    if not why:
        return fitted, "" if fitted is not None else f"the rest was not fitted (too few quiet networks): {_UNFITTED}"
    if fitted is None:
        return None, f"the rest was not fitted over {WHOLE_NETWORKS} as intended ({why}), nor over {ALL_NETWORKS} " \
                     f"(too few, or too alike): {_UNFITTED}"
    return fitted, f"the rest was fitted over {ALL_NETWORKS}, not over {WHOLE_NETWORKS} as intended: {why}"


_UNFITTED = "rest_ms is the network of single convs' own, the same for every plan"


def cover_blocks(num_positions: int, merged: Sequence[Option]) -> List[Option]:
    """Every block of the plan that merges (or prunes) ``merged`` (disjoint blocks, each with the convs it
    prunes) and keeps every other conv single."""
    inside = {p for start, end, _ in merged for p in range(start + 1, end + 1)}
    return [*merged, *((p - 1, p, ()) for p in range(1, num_positions + 1) if p not in inside)]


def plan_covers(num_positions: int, latency_ms: Dict[Option, float]) -> List[List[Option]]:
    """The blocks of the plan networks a profile times to check its rows as whole plans pay them: the
    cheapest cover of positions 0..``num_positions`` by the rows of ``latency_ms`` (blocks with the convs each
    prunes: with pruning options, a pruned plan, as the solver picks at its smallest budgets), less its
    single unpruned convs, and every other block of that (a plan half as deep). Empty where the cheapest
    cover changes nothing."""
    best: Dict[int, Tuple[float, Optional[Option]]] = {0: (0.0, None)}  # position -> cheapest cost, its block
    for option in sorted(latency_ms, key=lambda block: block[1]):
        start, end = option[0], option[1]
        if start in best:
            cost = best[start][0] + latency_ms[option]
            if end not in best or cost < best[end][0]:
                best[end] = (cost, option)
    if num_positions not in best:
        return []
    merged: List[Option] = []
    end = num_positions
    while end > 0:
        option = best[end][1]
        assert option is not None
        if end - option[0] > 1 or option[2]:
            merged.append(option)
        end = option[0]
    merged.reverse()
    if not merged:
        return []
    return [merged, merged[::2]] if len(merged) > 1 else [merged]


# Meta fields a run that timed no network keeps from the run that did.
KEPT_FIELDS = ("quiet_margin", "anchor_quiet_ms", "loaded_networks", "retimed_shapes", "cheapest_cover_merges")
Timings = List[Optional["NetworkTiming"]]


class NoCalibration:
    """A profile that trusts every round: no anchor, nothing timed again, no plan networks, the rest the
    network of single convs' own. The interface the profile calls; :class:`QuietCalibration` fills it in."""

    method = NO_CALIBRATION
    anchor: Optional["Anchor"] = None

    def __init__(self, found: Dict[str, Any]) -> None:
        self.found = found  # the meta of the rows resumed, if any
        self.rest_ms: Optional[float] = found.get("singles_rest_ms", found.get("rest_ms"))  # the singles' network's
        # Each quiet network's blocks' sum, rest and anchor level (None without an anchor), for ``fit_rest``.
        self.network_rests: List[List[Optional[float]]] = [list(entry) for entry in found.get("network_rests") or []]
        # Each plan network's quiet try: its blocks' sum by the table's rows, wall, anchor level and the network of
        # single convs' wall it is scaled to (``plan_network_rests``).
        self.plan_networks: List[List[Optional[float]]] = [list(entry) for entry in found.get("plan_networks") or []]
        self.notes: List[str] = []  # what the profile should say about the calibration

    def begin(self, meta: Dict[str, Any]) -> None:
        """Into the meta before timing: the kind, and the rest found."""
        meta["calibration"] = self.method
        if self.rest_ms is not None:
            meta["rest_ms"] = self.rest_ms

    def start(self, make_anchor: Callable[[], "Anchor"], model_bytes: int, timing_left: bool) -> None:
        """Before the first round of networks (``timing_left``: rows or plan networks are to be timed)."""

    def round_timed(self, results: Timings, meta: Dict[str, Any]) -> None:
        """After a round of networks, before their rows are read."""

    def kept(self, shape: Any, latency: float, std: float, anchor_ms: Optional[float]) -> Tuple[float, float]:
        """The figures to write for a shape timed now."""
        return latency, std

    def round_read(self, results: Timings, singles: Optional["NetworkTiming"], meta: Dict[str, Any]) -> None:
        """After a round's rows were read: its quiet networks' rests, and the singles' rest where it ran."""
        self.network_rests.extend([result.blocks_ms, result.rest_ms, result.anchor_ms] for result in results
                                  if result is not None and result.quiet)
        meta["network_rests"] = self.network_rests
        if singles is not None:
            self.rest_ms = self._singles_rest(singles)
            meta["rest_ms"] = self.rest_ms

    def _singles_rest(self, singles: "NetworkTiming") -> float:
        return singles.rest_ms

    def time_again(self, order: Sequence[Any], first_row: Callable[[Any], Dict[str, Any]],
                   meta: Dict[str, Any]) -> List[Any]:
        """Once every shape is timed: the shapes to time again (their rows to be dropped), once."""
        return []

    def time_plan_networks(self, time_plans: Callable[[List[List[Option]]], Timings], num_positions: int,
                           row_ms: Dict[Option, float], meta: Dict[str, Any]) -> bool:
        """Once the rows are done: time whole plans against ``row_ms`` (the timed rows, by block and the convs
        it prunes). True where the meta changed."""
        return False

    def finish(self, meta: Dict[str, Any]) -> None:
        """Into the finished table's meta: the evidence kept, and the rest as fitted."""
        if self.network_rests:  # kept by a run that timed nothing, as the fit is
            meta["network_rests"] = self.network_rests
        for key in KEPT_FIELDS:
            if key not in meta and key in self.found:  # set by the run that timed the networks; this one timed none
                meta[key] = self.found[key]
        if "plan_networks" in self.found:
            meta["plan_networks"] = self.plan_networks


class QuietCalibration(NoCalibration):
    """A shared machine's state handled (module doc): the anchor between rounds, shapes timed again against the
    whole profile's quiet level, plan networks, and the rest fitted by ``settings.rest_fit``."""

    method = QUIET_ANCHOR

    def __init__(self, found: Dict[str, Any], settings: CalibrationSettings = DEFAULT_CALIBRATION,
                 plans_wanted: bool = True) -> None:
        super().__init__(found)
        self.settings = settings
        # Plan networks are timed once the rows are done: by a run that timed rows, or resumes one cut short.
        self.time_plans = plans_wanted and "plan_networks" not in found
        self.loaded = int(found.get("loaded_networks") or 0)
        self.shape_anchor: Dict[Any, float] = {}  # the anchor's level while each shape's network ran
        self.rest_anchor_ms: Optional[float] = None
        self.judged_again = False
        self.stale: Dict[Any, Tuple[float, float, float]] = {}  # timed again: latency, std, anchor before
        self.stale_rest: Optional[Tuple[float, float]] = None
        self.cover_merges = bool(found.get("cheapest_cover_merges", True))  # meta from before it: plans were timed

    def start(self, make_anchor: Callable[[], "Anchor"], model_bytes: int, timing_left: bool) -> None:
        if (timing_left or self.time_plans) and model_bytes <= self.settings.anchor_max_bytes:
            self.anchor = make_anchor()

    def round_timed(self, results: Timings, meta: Dict[str, Any]) -> None:
        self.loaded += sum(1 for result in results if result is not None and not result.quiet)
        if self.anchor is not None:
            meta.update(quiet_margin=QUIET_MARGIN, anchor_quiet_ms=quiet_level(self.anchor.history),
                        loaded_networks=self.loaded)

    def kept(self, shape: Any, latency: float, std: float, anchor_ms: Optional[float]) -> Tuple[float, float]:
        if shape in self.stale and (anchor_ms is None or anchor_ms >= self.stale[shape][2]):
            latency, std, anchor_ms = self.stale[shape]  # timed again no nearer quiet: kept
        if anchor_ms is not None:
            self.shape_anchor[shape] = anchor_ms
        return latency, std

    def _singles_rest(self, singles: "NetworkTiming") -> float:
        rest_ms, self.rest_anchor_ms = singles.rest_ms, singles.anchor_ms
        if self.stale_rest is not None and (self.rest_anchor_ms is None or self.rest_anchor_ms >= self.stale_rest[1]):
            rest_ms, self.rest_anchor_ms = self.stale_rest
        return rest_ms

    def time_again(self, order: Sequence[Any], first_row: Callable[[Any], Dict[str, Any]],
                   meta: Dict[str, Any]) -> List[Any]:
        """Judged against the whole profile's quiet level now: networks timed in a state taken for quiet before
        a quieter one showed (a profile that starts loaded) are timed again, once."""
        anchor = self.anchor
        if anchor is None or self.judged_again:
            return []
        self.judged_again = True
        again = [shape for shape in order if shape in self.shape_anchor and not anchor.is_quiet(self.shape_anchor[shape])]
        for shape in again:
            first = first_row(shape)
            self.stale[shape] = (first["latency_ms"], first["std_ms"], self.shape_anchor.pop(shape))
        if self.rest_ms is not None and self.rest_anchor_ms is not None and not anchor.is_quiet(self.rest_anchor_ms):
            self.stale_rest = (self.rest_ms, self.rest_anchor_ms)
            self.rest_ms = None
        meta["retimed_shapes"] = len(again)
        return again

    def time_plan_networks(self, time_plans: Callable[[List[List[Option]]], Timings], num_positions: int,
                           row_ms: Dict[Option, float], meta: Dict[str, Any]) -> bool:
        """A node's time depends on the network around it (OpenVINO's run faster in a light network): whole
        plans' walls against their rows' sums tell how a plan pays its rows."""
        anchor = self.anchor
        if not self.time_plans or self.rest_ms is None:
            return False
        covers = plan_covers(num_positions, row_ms)
        meta["cheapest_cover_merges"] = self.cover_merges = bool(covers)
        if not covers or anchor is None:  # nothing to time, or no level to judge plan networks by
            return True
        singles_wall_ms = math.fsum([*(row_ms[(p - 1, p, ())] for p in range(1, num_positions + 1)), self.rest_ms])
        for _ in range(self.settings.plan_network_tries):  # a loaded state can outlast one try's extra rounds
            results = time_plans(covers)
            level_ms = quiet_level(anchor.history)
            near = [result is not None and result.quiet and result.anchor_ms is not None
                    and result.anchor_ms <= self.settings.plan_network_margin * level_ms for result in results]
            for cover, result in zip(covers, results):
                if result is not None and result.quiet:
                    table_ms = math.fsum(row_ms[block] for block in cover_blocks(num_positions, cover))
                    self.plan_networks.append([table_ms, result.wall_ms, result.anchor_ms, singles_wall_ms])
            covers = [cover for cover, result, ok in zip(covers, results, near) if result is not None and not ok]
            if not covers:
                break
        # The level as the fit judges by it: a profile run again on the table judges by the meta's.
        meta.update(plan_networks=self.plan_networks, anchor_quiet_ms=quiet_level(anchor.history))
        return True

    def finish(self, meta: Dict[str, Any]) -> None:
        super().finish(meta)
        if self.time_plans:
            meta["plan_networks"] = self.plan_networks
        if meta.get("rest_ms") is None:
            return
        # A network's rest grows with the network (OpenVINO: a deep plan's is smaller than the original's):
        # fitted over the networks that stayed quiet by the whole profile's level, where the fit holds.
        if self.anchor is not None and self.anchor.history:
            level_ms: Optional[float] = quiet_level(self.anchor.history)
        else:  # nothing timed now: the level the networks were judged by when they were
            level_ms = self.found.get("anchor_quiet_ms")
        fitted, note = rest_fit_and_note(self.network_rests, self.plan_networks,  # type: ignore[arg-type]
                                         level_ms, meta["rest_ms"], self.settings, self.cover_merges)
        if note:
            self.notes.append(note)
        if fitted is not None:
            meta.update(singles_rest_ms=meta["rest_ms"], rest_ms=fitted.fixed_ms, rest_per_block=fitted.per_block,
                        rest_fit=fitted.over)


def calibration_for(settings: Optional[CalibrationSettings], found: Dict[str, Any],
                    plans_wanted: bool = True) -> NoCalibration:
    """The calibration a profile runs with: quiet-state handling with ``settings``, none where None."""
    return NoCalibration(found) if settings is None else QuietCalibration(found, settings, plans_wanted)
