"""Every benchmark under benchmarks/ runs its --quick mode to its end and writes its record (issue 29).

Each quick mode runs the benchmark's own code path at the smallest size (a tiny model, a small input, one
repeat); the record is the JSON that benchmarks/common.py writes: the arguments, the machine and its load,
and one result per run with the fields the benchmark's table is made from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "benchmarks"

# Each benchmark and the fields every result of its quick run has (bench_importance and bench_profile
# record one summary, the others a list of results).
RESULT_FIELDS = {
    "bench_aa": ("model", "size", "backend", "benches", "holds_one", "median", "min", "max"),
    "bench_closed_loop": ("model", "ratio", "kept_original", "met_budget", "steps", "candidates", "measured_speedup",
                          "measured_speedup_interval", "within"),
    "bench_compress_digits": ("method", "ratio", "kept_original", "accuracy_of", "test_before", "test_merged",
                              "delta_points", "predicted_speedup", "measured_speedup", "target_met"),
    "bench_importance": ("model", "segments", "proxy_seconds", "finetune_seconds", "spearman_all",
                         "spearman_removing"),
    "bench_prediction": ("model", "budget", "blocks", "predicted", "measured", "measured_median", "error"),
    "bench_profile": ("model", "blocks", "unique_shapes", "timed_shapes", "profile_s"),
    "bench_pruning_digits": ("model", "space", "ratio"),
    "bench_runtimes": ("ratio", "made_for", "blocks", "onnxruntime", "openvino"),
    "bench_solver": ("instance", "L", "solve_s"),
    "sweep_zoo": ("spec", "status", "convs", "predicted_speedup", "measured_speedup", "max_rel_error"),
}
MACHINE_FIELDS = ("cpu", "cores", "load_average", "date", "commit")


def test_every_benchmark_has_a_quick_run_here():
    """A benchmark added without a quick run here fails (make bench-quick runs every one of them)."""
    scripts = {p.stem for p in BENCHMARKS.glob("*.py") if p.stem.startswith(("bench_", "sweep_"))}
    assert scripts == set(RESULT_FIELDS)


@pytest.mark.slow
@pytest.mark.bench
@pytest.mark.parametrize("name", sorted(RESULT_FIELDS))
def test_quick_mode_runs_to_its_end(name, tmp_path):
    out = tmp_path / "record.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(BENCHMARKS / f"{name}.py"), "--quick", "--out-dir", str(tmp_path),
                          "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["benchmark"] == name and record["args"]["quick"] is True
    assert all(record["machine"][field] not in (None, "") for field in MACHINE_FIELDS)
    assert record["machine"]["cores"] == os.cpu_count()
    results = record["results"]
    results = [results] if isinstance(results, dict) else results
    assert results, "the quick run recorded no result"
    for result in results:
        missing = [field for field in RESULT_FIELDS[name] if field not in result]
        assert not missing, f"{name}: a result lacks {missing}: {result}"
    if name == "sweep_zoo":
        assert [r["status"] for r in results] == ["ok"]
    if name == "bench_solver":  # the synthetic instances, the shipped table's, the scaling pair and the CLI
        assert len(results) == 8


def _report(kept_original: bool) -> dict:
    """The fields of compress's report that a bench_compress_digits row reads."""
    accuracy = {"test_before": 0.95, "test_merged": 0.95 if kept_original else 0.9}
    if not kept_original:
        accuracy["test_after"] = 0.91
    return {"accuracy": accuracy, "kept_original": kept_original,
            "plan": {"activations": [1, 2], "boundaries": [0, 1, 3], "original_latency_ms": 2.0},
            "predicted_latency_ms": 1.0, "predicted_speedup": 2.0, "bench": {}, "measured_speedup": 1.0,
            "export": {"verification": {"max_rel_error": 1e-7}}, "latency_table": "t.csv"}


@pytest.fixture
def compress_digits():
    """benchmarks/bench_compress_digits.py as a module (its folder on the path, as when it runs), then gone."""
    before = set(sys.modules)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_compress_digits

        yield bench_compress_digits
    finally:
        sys.path.remove(str(BENCHMARKS))
        for name in set(sys.modules) - before:  # common, digits_model: names too plain to leave behind
            if name in ("bench_compress_digits", "common", "digits_model"):
                del sys.modules[name]


def test_a_run_that_kept_the_original_reports_the_original_accuracy(compress_digits):
    """The closed loop kept the original network: nothing was fine-tuned, so there is no test_after (it was a
    KeyError); the row's accuracy is the original network's and says so."""
    row = compress_digits.result_row("finetune", 0.7, 1.0, _report(kept_original=True))
    assert row["kept_original"] and "original" in row["accuracy_of"]
    assert row["test_after_reference"] is None
    assert row["test_merged"] == pytest.approx(95.0) and row["delta_points"] == pytest.approx(0.0)

    fine_tuned = compress_digits.result_row("finetune", 0.7, 1.0, _report(kept_original=False))
    assert fine_tuned["test_after_reference"] == pytest.approx(91.0)
    assert fine_tuned["delta_points"] == pytest.approx(-5.0) and "compressed" in fine_tuned["accuracy_of"]
