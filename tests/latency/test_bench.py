"""End-to-end bench: alternating timing, statistics, speed-ups, the CLI lines."""

from __future__ import annotations

import json
import re
from typing import List, Optional

import numpy as np
import pytest
from click.testing import CliRunner
from torch import nn

from dpcompress.backends import Runner, get_backend
from dpcompress.latency.bench import (bench_modules, predicted_speedup, quiet_set_speedups, speedup_over_sets,
                                      time_in_session_sets)
from dpcompress.cli import main
from dpcompress.graph.plan import Plan
from dpcompress.latency.timing import in_rounds, quiet_level, quiet_rounds, round_medians, summarize


class LoggingRunner(Runner):
    def __init__(self, name: str, log: List[str]) -> None:
        self.name, self.log = name, log

    def another(self) -> "LoggingRunner":
        self.log.append(f"build {self.name}'")
        return type(self)(self.name + "'", self.log)

    def time(self, warmup: int, iters: int) -> List[float]:
        self.log.append(f"{self.name}:{warmup}+{iters}")
        return [float(len(self.log))] * iters


def test_session_sets_build_and_run_each_network_twice_in_mirrored_order():
    log: List[str] = []
    samples, set_of_round = time_in_session_sets([LoggingRunner("A", log), LoggingRunner("B", log)], warmup=5,
                                                 rounds=3, per_set=2, iters_per_round=3, enough=None, max_rounds=100)
    first_set = ["build B'", "build A'", "A:5+0", "B:5+0", "B':5+0", "A':5+0"] + ["A:1+2", "B:1+2", "B':1+1",
                                                                                  "A':1+1"] * 2
    # The second set goes the other way: B A A' B'.
    second_set = ["build B'", "build A'", "build A''", "build B''", "B':5+0", "A':5+0", "A'':5+0", "B'':5+0"] + [
        "B':1+2", "A':1+2", "A'':1+1", "B'':1+1"] * 2
    assert log == first_set + second_set
    assert set_of_round == [0, 0, 1, 1]  # whole sets: 4 rounds for the 3 asked
    assert [len(s) for s in samples] == [12, 12]
    assert samples[0][:3] == [7.0, 7.0, 10.0]  # a round's runs of A: its first session's, then its second's


def test_a_set_counts_where_it_kept_two_quiet_rounds_if_two_sets_did():
    # Three sets of two rounds, one run a round: the original 2.0 ms throughout, the compressed 1.0, 1.25, 1.0.
    samples = [[2.0] * 6, [1.0, 1.0, 1.25, 1.25, 1.0, 1.0]]
    sets = [0, 0, 1, 1, 2, 2]
    assert quiet_set_speedups(samples, 1, [True, True, True, False, True, True], sets) == [2.0, 2.0]
    # Only one set kept two: every set with a quiet round counts.
    assert quiet_set_speedups(samples, 1, [True, True, True, False, False, True], sets) == [2.0, 1.6, 2.0]


def test_speedup_over_sets_is_their_geometric_mean_with_a_t_interval():
    by_set = [2.0, 2.2, 1.9, 2.1]
    logs = np.log(by_set)
    half = 3.182 * logs.std(ddof=1) / 2  # Student's t, 3 degrees of freedom, over sqrt(4)
    speedup, (low, high) = speedup_over_sets(by_set)
    assert speedup == pytest.approx(np.exp(logs.mean()))
    assert (low, high) == (pytest.approx(np.exp(logs.mean() - half)), pytest.approx(np.exp(logs.mean() + half)))
    # One set: the interval is the range the two medians' intervals allow.
    original, compressed = summarize([2.0, 2.1, 2.2]), summarize([1.0, 1.05, 1.1])
    assert speedup_over_sets([2.0], original, compressed) == (2.0, [2.0 / 1.1, 2.2 / 1.0])


def test_summarize_matches_numpy():
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    stats = summarize(values)
    assert stats.median_ms == np.median(values) and stats.std_ms == pytest.approx(np.std(values))
    assert (stats.min_ms, stats.max_ms, stats.count) == (1.0, 9.0, 8)


def test_bench_measures_the_cheaper_model_as_faster():
    expensive = nn.Sequential(nn.Conv2d(16, 16, 7, padding=3), nn.ReLU())
    cheap = nn.Sequential(nn.Conv2d(16, 16, 1), nn.ReLU())
    plan = Plan(activations=[], boundaries=[0, 2], num_positions=2, latency_ms=0.01, original_latency_ms=0.015)
    result = bench_modules(get_backend("onnxruntime", threads=1), expensive, cheap, input_shape=(1, 16, 32, 32),
                           warmup=2, rounds=3, iters_per_round=3, plan=plan, max_rounds=3)
    assert result.rounds == 3 and result.original.count == result.compressed.count == 3 * result.quiet_rounds
    # Sets of one round each, to reach the 3 rounds asked; a set counts where its round was quiet.
    assert 1 <= len(result.session_speedups) <= 3
    assert result.measured_speedup == pytest.approx(np.exp(np.mean(np.log(result.session_speedups))))
    low, high = result.measured_speedup_interval
    assert low <= result.measured_speedup <= high and result.measured_speedup > 1
    lines = result.summary_lines()
    assert any(re.fullmatch(r"measured speed-up: \d+\.\d\dx", line) for line in lines)
    assert "predicted speed-up: 1.50x" in lines
    # The plan saves 0.005 ms of table time; taken off the measured original median:
    expected = result.original.median_ms / (result.original.median_ms - 0.005)
    assert result.predicted_speedup_measured_rest == pytest.approx(expected)
    assert lines[-1] == f"predicted speed-up with the measured rest: {expected:.2f}x"
    record = json.loads(json.dumps(result.to_json()))
    assert record["predicted_speedup"] == 1.5 and record["backend"]["name"] == "onnxruntime"


def test_predicted_speedup_needs_both_latencies():
    assert predicted_speedup(Plan(activations=[], boundaries=[0, 1], num_positions=1)) is None
    assert predicted_speedup(Plan(activations=[], boundaries=[0, 1], num_positions=1, latency_ms=2.0,
                                  original_latency_ms=3.0)) == 1.5


MODEL_PY = """
from torch import nn

def tiny():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
"""


def test_bench_cli_with_a_plan(tmp_path):
    (tmp_path / "tiny.py").write_text(MODEL_PY)
    plan = {"activations": [], "boundaries": [0, 3], "num_positions": 3, "latency_ms": 1.0,
            "original_latency_ms": 2.0}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    args = ["bench", "--model", f"{tmp_path / 'tiny.py'}:tiny", "--input-shape", "1,3,16,16", "--threads", "1",
            "--plan", str(tmp_path / "plan.json"), "--warmup", "1", "--rounds", "2", "--iters", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert re.search(r"^measured speed-up: \d+\.\d\dx$", result.output, re.M)
    assert "predicted speed-up: 2.00x" in result.output
    as_json = CliRunner().invoke(main, args + ["--json"])
    assert as_json.exit_code == 0, as_json.output
    record = json.loads(as_json.output[as_json.output.index("{"):])
    assert record["compressed"]["count"] == 2 * record["quiet_rounds"] and record["predicted_speedup"] == 2.0
    for bad, what in ((["--min-seconds", "-1"], "--min-seconds"), (["--quiet-ms", "0"], "--quiet-ms")):
        refused = CliRunner().invoke(main, args + bad)
        assert refused.exit_code == 2 and what in refused.output and "Traceback" not in refused.output


def test_quiet_rounds_are_those_near_the_references_fastest_tenth():
    reference = [2.5, 2.6, 3.3, 2.55, 3.4, 2.7, 3.2, 2.45, 2.5, 2.6]
    assert quiet_level(reference) == 2.45  # the lower order statistic at the 10th percentile of ten
    assert quiet_rounds(reference) == [ms <= 1.15 * 2.45 for ms in reference]
    assert quiet_rounds(reference) == [True, True, False, True, False, True, False, True, True, True]
    assert quiet_rounds([3.3, 3.4], level=2.45) == [False, False]  # judged against an earlier level
    assert quiet_rounds([2.0, 2.5, 2.8, 3.0], level=2.5, both_sides=True) == [False, True, True, False]
    assert round_medians([1, 5, 2, 9, 9, 9, 4], 3) == [2, 9, 4]
    assert in_rounds([1, 2, 3, 4, 5, 6], 2, [True, False, True]) == [1, 2, 5, 6]


class PhasedRunner(Runner):
    """A runner whose latency depends on the machine's state in the current round (``clock``). The one that
    ``ticks`` starts a new round with the first of its two runs a round (its sessions share one count)."""

    def __init__(self, quiet_ms: float, loaded_ms: float, loaded: List[bool], clock: List[int],
                 ticks: bool = False, calls: Optional[List[int]] = None) -> None:
        self.quiet_ms, self.loaded_ms, self.loaded, self.clock, self.ticks = quiet_ms, loaded_ms, loaded, clock, ticks
        self.calls = [0] if calls is None else calls

    def another(self) -> "PhasedRunner":
        return PhasedRunner(self.quiet_ms, self.loaded_ms, self.loaded, self.clock, self.ticks, self.calls)

    def time(self, warmup: int, iters: int) -> List[float]:
        if self.ticks and iters:
            self.calls[0] += 1
            self.clock[0] += self.calls[0] % 2
        return [self.loaded_ms if self.loaded[max(self.clock[0], 0)] else self.quiet_ms] * iters


class PreparedBackend:
    def __init__(self, runners) -> None:
        self.runners = runners
        self.name, self.version, self.device, self.device_name, self.threads = "phased", "1", "cpu", "test", 1

    def prepare_all(self, modules, input_shape, precision):
        return self.runners[:len(modules)]

    def options(self):
        return {}


def test_bench_takes_its_figures_from_the_quiet_rounds():
    """Rounds 0-9 and 32-39 quiet, 10-31 loaded: a loaded state slows the original by 32%, the compressed
    network by 4% (as mobilenet_v2 and its 0.5 plan on this machine)."""
    loaded = [10 <= k < 32 for k in range(40)]
    clock = [-1]
    original = PhasedRunner(2.5, 3.3, loaded, clock, ticks=True)  # each of its rounds is a new round
    compressed = PhasedRunner(1.25, 1.3, loaded, clock)
    result = bench_modules(PreparedBackend([original, compressed]), nn.Identity(), nn.Identity(), input_shape=(1,),
                           warmup=1, rounds=40, iters_per_round=3, max_rounds=40)
    assert result.rounds == 40 and result.quiet_rounds == 17  # round 9 is followed by a loaded one
    assert result.measured_speedup == 2.0 and result.original.count == 17 * 3
    assert result.all_rounds_speedup == pytest.approx(3.3 / 1.3)  # most rounds were loaded
    assert "quiet rounds: 17 of 40" in "\n".join(result.summary_lines())
    record = result.to_json()
    assert record["quiet_rounds"] == 17 and record["measured_speedup"] == 2.0
    # A state that slows the compressed network alone (rounds 0-3, by 40%) is no quiet round either.
    compressed_loaded = [k < 4 for k in range(40)]
    clock[0] = -1
    result = bench_modules(PreparedBackend([PhasedRunner(2.5, 2.5, loaded, clock, ticks=True),
                                            PhasedRunner(1.25, 1.75, compressed_loaded, clock)]),
                           nn.Identity(), nn.Identity(), input_shape=(1,), warmup=1, rounds=40, iters_per_round=3, max_rounds=40)
    assert result.quiet_rounds == 36 and result.measured_speedup == 2.0
    # With 12 rounds (10 asked, in 4 whole sets of 3), the compressed network is not judged by its own fastest
    # round: noise alone would set rounds apart (its fastest tenth is its fastest round).
    clock[0] = -1
    result = bench_modules(PreparedBackend([PhasedRunner(2.5, 2.5, loaded, clock, ticks=True),
                                            PhasedRunner(1.25, 1.75, compressed_loaded, clock)]),
                           nn.Identity(), nn.Identity(), input_shape=(1,), warmup=1, rounds=10, iters_per_round=3, max_rounds=12)
    assert result.rounds == result.quiet_rounds == 12


def test_bench_goes_on_for_min_seconds(monkeypatch):
    now = [0.0]
    monkeypatch.setattr("dpcompress.latency.bench.time.perf_counter", lambda: now[0])

    class Clocked(LoggingRunner):
        def time(self, warmup: int, iters: int) -> List[float]:
            now[0] += 0.5 * iters
            return [1.0] * iters

    log: List[str] = []
    backend = PreparedBackend([Clocked("A", log), Clocked("B", log)])
    result = bench_modules(backend, nn.Identity(), nn.Identity(), input_shape=(1,), warmup=0, rounds=2,
                           iters_per_round=2, min_seconds=20)
    assert result.rounds == 10  # 2 s a round: 20 s after the start
    # Without: the 2 rounds asked make 2 sets of one round, and sets go on until 4 kept a quiet round.
    assert bench_modules(backend, nn.Identity(), nn.Identity(), input_shape=(1,), warmup=0, rounds=2,
                         iters_per_round=2).rounds == 4


class SessionRunner(Runner):
    """A network whose sessions run at ``slow_ms`` in odd-numbered session sets (two sessions a set, the
    prepared one first), ``ms`` in the others."""

    def __init__(self, ms: float, slow_ms: float, built: List[int]) -> None:
        self.ms, self.slow_ms, self.built = ms, slow_ms, built
        self.value = slow_ms if (built[0] // 2) % 2 else ms
        built[0] += 1

    def another(self) -> "SessionRunner":
        return SessionRunner(self.ms, self.slow_ms, self.built)

    def time(self, warmup: int, iters: int) -> List[float]:
        return [self.value] * iters


def test_bench_goes_on_with_sets_until_the_speedups_interval_is_narrow():
    def bench(slow_ms, **settings):
        runners = [SessionRunner(2.0, 2.0, [0]), SessionRunner(1.0, slow_ms, [0])]
        return bench_modules(PreparedBackend(runners), nn.Identity(), nn.Identity(), input_shape=(1,), warmup=0,
                             iters_per_round=2, **settings)

    steady = bench(1.0)  # every set measures 2x: the 16 rounds asked are enough
    assert steady.rounds == 16 and steady.session_speedups == [2.0] * 4 and steady.measured_speedup_interval == [2.0, 2.0]
    # Sets measure 2x and 1.82x by turns (a session 10% slower: within the quiet margin, so no round is set
    # aside): asked for an interval within 2% of the mean, which they never give, sets go on up to 48 rounds.
    split = bench(1.1, until_ci=0.02)
    assert split.rounds == 48 and split.session_speedups == pytest.approx([2.0, 2.0 / 1.1] * 6)
    low, high = split.measured_speedup_interval
    assert split.measured_speedup == pytest.approx((2.0 * 2.0 / 1.1) ** 0.5)
    assert low < split.measured_speedup < high and (high - low) / 2 > 0.02 * split.measured_speedup
    assert bench(1.1).rounds == 16 and bench(1.1, until_ci=0.02, max_rounds=24).rounds == 24


def test_sets_go_on_until_four_met_a_quiet_machine():
    """The second set of four rounds is loaded throughout (rounds 4-7, the original 32% slower): it keeps no
    quiet round, so a fifth set is timed, and the speed-up comes from the four that met a quiet machine."""
    loaded = [4 <= k < 8 for k in range(48)]
    clock = [-1]
    runners = [PhasedRunner(2.5, 3.3, loaded, clock, ticks=True), PhasedRunner(1.25, 1.3, loaded, clock)]
    result = bench_modules(PreparedBackend(runners), nn.Identity(), nn.Identity(), input_shape=(1,), warmup=1,
                           rounds=16, iters_per_round=3)
    assert result.rounds == 20 and result.quiet_rounds == 15  # round 3 is followed by a loaded one
    assert result.session_speedups == [2.0] * 4 and result.measured_speedup == pytest.approx(2.0)


def test_bench_judges_rounds_against_a_given_quiet_level():
    """A bench that met mostly a loaded state (rounds 0-36; quiet 37-39): against its own fastest tenth,
    the loaded rounds count; against the table's level, only the quiet ones; a level never met is set aside."""
    loaded = [k < 37 for k in range(40)]
    clock = [-1]

    def bench(level):
        clock[0] = -1
        runners = [PhasedRunner(2.5, 3.3, loaded, clock, ticks=True), PhasedRunner(1.25, 1.3, loaded, clock)]
        return bench_modules(PreparedBackend(runners), nn.Identity(), nn.Identity(), input_shape=(1,), warmup=1,
                             rounds=40, iters_per_round=3, quiet_level_ms=level,
                             max_rounds=40)

    own = bench(None)
    assert own.quiet_level_ms == 3.3 and own.measured_speedup == pytest.approx(3.3 / 1.3)
    given = bench(2.5)
    assert given.quiet_level_ms == 2.5 and given.quiet_rounds == 3 and given.measured_speedup == 2.0
    unmet = bench(1.0)  # no round within 15% of 1 ms: the bench's own level judges
    assert unmet.quiet_level_ms == 3.3 and unmet.measured_speedup == pytest.approx(3.3 / 1.3)
    loaded_level = bench(3.3)  # a table made in the loaded state: the rounds in that state, not the faster ones
    assert loaded_level.quiet_rounds == 36 and loaded_level.measured_speedup == pytest.approx(3.3 / 1.3)
