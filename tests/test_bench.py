"""End-to-end bench: alternating timing, statistics, speed-ups, the CLI lines."""

from __future__ import annotations

import json
import re
from typing import List

import numpy as np
import pytest
from click.testing import CliRunner
from torch import nn

from dpcompress.backends import get_backend
from dpcompress.latency.bench import bench_modules, predicted_speedup
from dpcompress.cli import main
from dpcompress.search.plan import Plan
from dpcompress.latency.timing import alternate, summarize


class LoggingRunner:
    def __init__(self, name: str, log: List[str]) -> None:
        self.name, self.log = name, log

    def time(self, warmup: int, iters: int) -> List[float]:
        self.log.append(f"{self.name}:{warmup}+{iters}")
        return [float(len(self.log))] * iters


def test_alternate_interleaves_rounds_after_warmup():
    log: List[str] = []
    samples = alternate([LoggingRunner("A", log), LoggingRunner("B", log)], warmup=5, rounds=3, iters_per_round=2)
    assert log == ["A:5+0", "B:5+0"] + ["A:1+2", "B:1+2"] * 3
    assert [len(s) for s in samples] == [6, 6]
    assert samples[0] == [3.0, 3.0, 5.0, 5.0, 7.0, 7.0]


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
                           warmup=2, rounds=3, iters_per_round=3, plan=plan)
    assert result.original.count == result.compressed.count == 9
    assert result.measured_speedup == result.original.median_ms / result.compressed.median_ms
    assert result.measured_speedup > 1
    lines = result.summary_lines()
    assert re.fullmatch(r"measured speed-up: \d+\.\d\dx", lines[-3])
    assert lines[-2] == "predicted speed-up: 1.50x"
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
    assert record["compressed"]["count"] == 4 and record["predicted_speedup"] == 2.0
