"""The calibration of in-network profiles: the rest's fit over its evidence, the method it records and says
it could not apply, the plan networks' covers, and a profile without calibration."""

from __future__ import annotations

import json
import math

import pytest

from dpcompress.backends import get_backend
from dpcompress.latency.calibration import (ALL_NETWORKS, DEFAULT_CALIBRATION, NO_CALIBRATION, QUIET_ANCHOR,
                                            WHOLE_NETWORKS, CalibrationSettings, fit_rest, plan_covers,
                                            plan_network_rests, profile_rest_fit, rest_fit_and_note)
from dpcompress.latency.profile import default_calibration, profile_table
from dpcompress.tables import meta_path_for, read_latency_table
from tests.latency.helpers import RecordingBackend


def test_rest_fit_recovers_a_rest_that_grows_with_the_blocks_and_refuses_noise():

    networks = [(blocks, 0.08 + 0.05 * blocks) for blocks in (0.8, 1.0, 1.3, 1.6, 1.9, 2.2)]
    fixed_ms, per_block = fit_rest(networks)
    assert fixed_ms == pytest.approx(0.08) and per_block == pytest.approx(0.05)
    assert fit_rest(networks[:DEFAULT_CALIBRATION.min_rest_networks - 1]) is None  # too few networks to fit a slope
    assert fit_rest([(1.0 + 0.01 * k, 0.1 + 0.05 * k) for k in range(6)]) is None  # sums too close together
    assert fit_rest([(blocks, 0.3 - 0.1 * blocks) for blocks, _ in networks]) is None  # shrinks as it grows
    # A fixed part that fits below 0 is none: the share alone is fitted (here the true one, less a hair).
    assert fit_rest([(blocks, 0.05 * blocks - 0.001) for blocks, _ in networks]) == (0.0, pytest.approx(0.05, rel=0.02))


def test_a_plan_network_is_read_against_the_anchor_beside_it():

    # A plan whose rows add up to 0.7 ms ran at 0.8 ms beside the anchor's 1.6 ms: half the original, whose
    # network of single convs ran at 1.5 ms; in a state 1.25x slower for both, the same point.
    quiet, slow = plan_network_rests([[0.7, 0.8, 1.6, 1.5], [0.7, 1.0, 2.0, 1.5]])
    assert quiet == pytest.approx([0.7, 0.05, 1.6]) and slow[:2] == pytest.approx(quiet[:2])


def test_the_profiles_fit_takes_quiet_networks_and_plans_timed_near_the_level():

    level = 1.0
    quiet = [[blocks, 0.05 + 0.04 * blocks, 1.1] for blocks in (1.0, 1.2, 1.4, 1.6)]
    loaded = [[1.3, 0.9, 1.5]]  # its anchor over QUIET_MARGIN x the level: left out
    near = [[0.7, 0.5, 1.04, 1.5]]  # plans as plan_network_rests reads them; anchors at 1.04 and 1.1 x the level
    far = [[0.7, 0.8, 1.1, 1.5]]  # its rest (0.39 ms) would turn the slope negative: no fit
    points = [(b, r) for b, r, _ in quiet] + [(0.7, 0.5 / 1.04 * 1.5 - 0.7)]
    assert profile_rest_fit(quiet + loaded, near + far, level) == (*fit_rest(points), ALL_NETWORKS)
    everything = [(b, r) for b, r, _ in quiet + loaded]
    assert profile_rest_fit(quiet + loaded, [], None) == (*fit_rest(everything), ALL_NETWORKS)  # no level: all count


def test_with_plans_near_the_level_the_rest_is_fitted_over_whole_networks_alone():

    # Whole networks pay 1.08 x their rows less 0.03 ms (a deep plan's convs run faster than its rows say);
    # packed networks' own rests follow another line.
    def wall(rows_ms):
        return -0.03 + 1.08 * rows_ms

    singles_rows, level = 1.4, 1.5
    singles_rest = wall(singles_rows) - singles_rows
    packed = [[blocks, 0.1 + 0.01 * blocks, level] for blocks in (1.0, 1.2, 1.4, 1.6, 1.8)]
    # Two plans timed in a state 1.03x slower than the single convs' (the anchor beside them too): it cancels.
    plans = [[rows, 1.03 * wall(rows), 1.03 * wall(singles_rows), wall(singles_rows)] for rows in (0.7, 0.85)]
    fitted = profile_rest_fit(packed, plans, level, singles_rest)
    assert fitted.over == WHOLE_NETWORKS
    # Read only between the deepest plan and the original, the line keeps its negative fixed part.
    assert (fitted.fixed_ms, fitted.per_block) == (pytest.approx(-0.03), pytest.approx(0.08))
    # No singles' rest given, or every plan far from the level: every quiet network, as before.
    every = profile_rest_fit(packed, plans, level)
    assert every.over == ALL_NETWORKS and every[:2] == pytest.approx(
        fit_rest([(b, r) for b, r, _ in packed] + [(rows, wall(rows) - rows) for rows in (0.7, 0.85)]))
    assert profile_rest_fit(packed, plans, 0.9 * level, singles_rest).over == ALL_NETWORKS
    # Whole networks whose rest shrinks as the network grows (a deep plan paying more outside its rows than
    # the original, as merged blocks do in a plan on ONNX Runtime): measured at both ends, so still the line
    # through them, with a negative share; it prices the plans' walls as they were timed.
    shrinking = profile_rest_fit(packed, plans, level, singles_rest_ms=0.0)
    assert shrinking.over == WHOLE_NETWORKS and -1 < shrinking.per_block < 0
    for rows in (0.7, 0.85):
        assert shrinking.fixed_ms + (1 + shrinking.per_block) * rows == pytest.approx(wall(rows), rel=0.03)
    # Rows that would cost nothing in a plan (walls falling as the rows grow): no line over whole networks.
    falling = [[rows, 1.03 * (wall(singles_rows) + 1.5 * (singles_rows - rows)), 1.03 * wall(singles_rows),
                wall(singles_rows)] for rows in (0.7, 0.85)]
    fitted, note = rest_fit_and_note(packed, falling, level, singles_rest)
    assert fitted is None and "whole networks give no line" in note  # and every network falls too


def test_plan_covers_are_the_cheapest_cover_and_every_other_merged_block_of_it():
    """Brute force over every partition, and every option of each block (pruning options included)."""
    import itertools
    import random

    def partitions(num_positions):
        for cuts in itertools.product((False, True), repeat=num_positions - 1):
            bounds = [0, *(p for p, cut in enumerate(cuts, start=1) if cut), num_positions]
            yield list(zip(bounds, bounds[1:]))

    rng = random.Random(0)
    for trial in range(30):
        num_positions = rng.randint(2, 7)
        # Single convs always; merged blocks of up to four convs, some of them missing (untimed); some blocks
        # with a pruning option (its last conv replaced by identity), single convs among them.
        latency = {(p - 1, p, ()): rng.uniform(0.5, 1.5) for p in range(1, num_positions + 1)}
        latency.update({(s, e, ()): rng.uniform(0.3, 2.5) for s in range(num_positions)
                        for e in range(s + 2, min(num_positions, s + 4) + 1) if rng.random() < 0.7})
        latency.update({(s, e, (e,)): rng.uniform(0.0, 1.5) for s, e, _ in list(latency) if rng.random() < 0.3})
        options = {}
        for s, e, pruned in latency:
            options.setdefault((s, e), []).append((s, e, pruned))
        cost = {}
        for partition in partitions(num_positions):
            if all(b in options for b in partition):
                for cover in itertools.product(*(options[b] for b in partition)):
                    cost[cover] = math.fsum(latency[o] for o in cover)
        best = min(cost.values())
        covers = plan_covers(num_positions, latency)
        merged_in_best = [[o for o in cover if o[1] - o[0] > 1 or o[2]] for cover, c in cost.items() if c == best]
        if covers:
            assert covers[0] in merged_in_best, trial
            assert covers[1:] == ([covers[0][::2]] if len(covers[0]) > 1 else [])
        else:
            assert [] in merged_in_best, trial  # the singles are the cheapest: nothing merged to check


def test_where_whole_networks_cannot_be_fitted_the_profile_says_so_and_the_numbers_are_the_fallbacks():
    """The intended method is whole networks; where it cannot apply, the fit over all quiet networks is the
    one profile_rest_fit gives (the same numbers as before), with a line saying why."""
    packed = [[blocks, 0.1 + 0.01 * blocks, 1.0] for blocks in (1.0, 1.2, 1.4, 1.6, 1.8)]
    far = [[0.7, 0.8, 1.2, 1.5]]  # anchor 1.2x the level: not near
    fitted, note = rest_fit_and_note(packed, far, 1.0, 0.1)
    assert fitted == profile_rest_fit(packed, far, 1.0, 0.1) and fitted.over == ALL_NETWORKS
    assert f"not over {WHOLE_NETWORKS} as intended" in note and "1.05x of the quiet level" in note
    fitted, note = rest_fit_and_note(packed, [], 1.0, 0.1)
    assert fitted.over == ALL_NETWORKS and "no plan network was timed" in note
    # Too little evidence for either: not fitted, and said.
    fitted, note = rest_fit_and_note(packed[:2], [], 1.0, 0.1)
    assert fitted is None and "was not fitted" in note


def test_the_intended_method_is_a_setting_and_the_settings_are_passed_not_patched():
    def wall(rows_ms):
        return -0.03 + 1.08 * rows_ms

    singles_rest = wall(1.4) - 1.4
    packed = [[blocks, 0.1 + 0.01 * blocks, 1.5] for blocks in (1.0, 1.2, 1.4, 1.6, 1.8)]
    plans = [[rows, wall(rows), wall(1.4), wall(1.4)] for rows in (0.7, 0.85)]
    assert rest_fit_and_note(packed, plans, 1.5, singles_rest) == (profile_rest_fit(packed, plans, 1.5, singles_rest), "")
    assert profile_rest_fit(packed, plans, 1.5, singles_rest).over == WHOLE_NETWORKS
    every = CalibrationSettings(rest_fit=ALL_NETWORKS)
    assert rest_fit_and_note(packed, plans, 1.5, singles_rest, every) == (profile_rest_fit(packed, plans, 1.5), "")
    # A wider plan margin takes plans a default profile leaves out; more networks needed: no fit over them all.
    assert profile_rest_fit(packed, plans, 1.38, singles_rest).over == ALL_NETWORKS
    assert profile_rest_fit(packed, plans, 1.38, singles_rest,
                            CalibrationSettings(plan_network_margin=1.1)).over == WHOLE_NETWORKS
    assert profile_rest_fit(packed, [], None, settings=CalibrationSettings(min_rest_networks=6)) is None
    with pytest.raises(ValueError, match="rest_fit"):
        CalibrationSettings(rest_fit="some networks")


def test_a_quiet_target_runs_without_calibration():
    class GpuRecording(RecordingBackend):
        device = "cuda"

    assert default_calibration(RecordingBackend()) == DEFAULT_CALIBRATION
    assert default_calibration(GpuRecording()) is None


@pytest.mark.slow
def test_an_in_network_profile_without_calibration_keeps_the_singles_rest_and_times_no_plan(tiny_traced, tmp_path):
    backend = get_backend("onnxruntime", threads=1)
    out = tmp_path / "plain.csv"
    result = profile_table(tiny_traced.chain, backend, out, traced=tiny_traced, warmup=1, iters=3, calibration=None)
    meta = json.loads(meta_path_for(out).read_text())
    assert meta["calibration"] == NO_CALIBRATION and result.notes == []
    for key in ("anchor_quiet_ms", "plan_networks", "rest_per_block", "rest_fit", "singles_rest_ms", "retimed_shapes"):
        assert key not in meta
    # Every network counts without an anchor: each packed network's rest is recorded, none judged.
    assert meta["network_rests"] and all(anchor_ms is None for *_, anchor_ms in meta["network_rests"])
    table = read_latency_table(out)
    singles = sum(table.latency_ms[(p - 1, p)] for p in range(1, table.num_positions + 1))
    assert table.original_latency_ms() == pytest.approx(singles + meta["rest_ms"])
    # With calibration (the CPU's default) the same profile records its kind and how its rest was fitted.
    calibrated = profile_table(tiny_traced.chain, backend, tmp_path / "q.csv", traced=tiny_traced, warmup=1, iters=3)
    assert calibrated.meta["calibration"] == QUIET_ANCHOR and "anchor_quiet_ms" in calibrated.meta
    assert calibrated.meta.get("rest_fit") in (WHOLE_NETWORKS, ALL_NETWORKS, None)
    assert (calibrated.meta.get("rest_fit") == WHOLE_NETWORKS) == (calibrated.notes == [])


def test_where_the_cheapest_cover_merges_nothing_the_whole_networks_line_is_the_originals_rest():
    """resnet18 on the CPU: no merged block is cheaper than its splits, so every plan the rows can
    price is at least the original, and the original's own rest is the line over whole networks."""
    packed = [[blocks, 0.1 + 0.05 * blocks, 1.0] for blocks in (1.0, 1.2, 1.4, 1.6, 1.8)]
    assert profile_rest_fit(packed, [], 1.0, 0.42, cover_merges=False) == (0.42, 0.0, WHOLE_NETWORKS)
    assert rest_fit_and_note(packed, [], 1.0, 0.42, cover_merges=False)[1] == ""
    # Intending the fit over every quiet network, or with plans timed: as before.
    every = CalibrationSettings(rest_fit=ALL_NETWORKS)
    assert profile_rest_fit(packed, [], 1.0, 0.42, every, cover_merges=False).over == ALL_NETWORKS
    assert profile_rest_fit(packed, [], 1.0, 0.42).over == ALL_NETWORKS
