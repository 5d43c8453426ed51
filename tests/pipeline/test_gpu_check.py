"""benchmarks/gpu_check.py: its dry run goes through every step on the CPU, and its record agrees with the
files it was made from (the table, the plans), so that the check a GPU machine runs cannot rot unseen."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
STEPS = ["environment", "gpu_tests", "profile", "plans", "bench"]
# The dry run took about 70 s on a shared two-core machine (over a minute: marked slow).
slow = pytest.mark.slow


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def run_script(*args, timeout):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("gpu_check_out"), tmp_path_factory.mktemp("gpu_check_work")
    result = run_script("--dry-run", "--out", str(out), "--work", str(work), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result, out, json.loads((out / "gpu_check.json").read_text())


def table_rows(out):
    """(start, end, pruned) -> latency_ms, from the table the check copied to its folder."""
    with open(out / "latency_table.csv", newline="") as f:
        return {(int(r["start"]), int(r["end"]), tuple(int(p) for p in (r.get("pruned") or "").split())):
                float(r["latency_ms"]) for r in csv.DictReader(f)}


def test_the_dry_run_is_the_real_check_on_a_small_model():
    script = load_script()
    real, dry = asdict(script.REAL), asdict(script.DRY_RUN)
    assert {key for key in real if real[key] != dry[key]} == {"model", "input_shape", "device", "precision", "threads"}
    assert real["input_shape"] == (128, 3, 224, 224) and real["precision"] == "fp16" and real["device"] == "cuda"
    assert real["model"] == "torchvision:mobilenet_v2" and real["cuda_graphs"] and real["backend"] == "torch"
    assert real["budgets"] == (0.71, 0.61)  # 1/1.41 and 1/1.63: the papers' speed-ups


@slow
def test_every_step_finishes_and_the_folder_holds_four_files(dry_run):
    result, out, record = dry_run
    assert record["format"] == "dpcompress-gpu-check/1" and record["mode"] == "dry-run"
    assert [name for name, step in record["steps"].items() if step["status"] == "ok"] == STEPS, record["steps"]
    assert record["status"] == "ok" and record["seconds"] > 0
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "latency_table.csv",
                                                     "latency_table.meta.json"]
    assert "$ dpcompress profile" in (out / "gpu_check.log").read_text()
    for plan in record["plans"]:
        assert plan["name"] in result.stdout
    assert "1.41x at 72.83% (TensorRT)" in result.stdout and "1.63x at 72.99% (PyTorch)" in result.stdout


@slow
def test_environment_and_gpu_tests(dry_run):
    _, _, record = dry_run
    env = record["environment"]
    assert env["python"] == platform.python_version() and env["missing"] == []
    assert env["modules"]["torch"]["version"] == torch.__version__
    assert env["cuda_available"] == torch.cuda.is_available()
    assert "convs" in record["model"]["trace_summary"]
    tests = record["steps"]["gpu_tests"]
    assert "tests/backends/test_backends.py" in tests["files"]
    assert tests["failed"] == tests["errors"] == 0 and tests["passed"] + tests["skipped"] >= 1
    if not torch.cuda.is_available():
        assert env["gpu"] is None and tests["passed"] == 0


@slow
def test_the_table_summary_is_what_the_files_say(dry_run):
    _, out, record = dry_run
    table, rows = record["table"], table_rows(out)
    meta = json.loads((out / "latency_table.meta.json").read_text())
    assert table["rows"] == len(rows) and table["pruned_rows"] == sum(bool(p) for _, _, p in rows) > 0
    singles = [rows[(p - 1, p, ())] for p in range(1, meta["num_positions"] + 1)]
    assert table["single_convs_ms"] == pytest.approx(math.fsum(singles))
    assert (meta["backend"], meta["device"], meta["precision"], meta["batch_size"], meta["prune"]) == \
           ("torch", "cpu", "fp32", 1, True)
    assert table["seconds"] > 0 and table["timing"] == meta["timing"]


@slow
def test_plans_keep_their_budgets_and_are_priced_by_the_table(dry_run):
    _, out, record = dry_run
    rows, meta = table_rows(out), json.loads((out / "latency_table.meta.json").read_text())
    growth, rest = 1 + max(0.0, meta.get("rest_per_block") or 0.0), meta.get("rest_ms") or 0.0
    original = growth * math.fsum(rows[(p - 1, p, ())] for p in range(1, meta["num_positions"] + 1)) + rest
    plans = record["plans"]
    assert [(p["budget_ratio"], p["prune"]) for p in plans] == [(0.71, False), (0.71, True), (0.61, False), (0.61, True)]
    for plan in plans:
        b, pruned = plan["boundaries"], plan["pruned"]
        assert plan["solved"] and b[0] == 0 and b[-1] == plan["num_positions"] == meta["num_positions"]
        assert all(x < y for x, y in zip(b, b[1:])) and set(plan["activations"]) <= set(b)
        assert plan["blocks"] == len(b) - 1
        blocks = list(zip(b, b[1:]))
        priced = math.fsum(rows[(i, j, tuple(p for p in pruned if i < p <= j))] for i, j in blocks)
        assert plan["latency_ms"] == pytest.approx(growth * priced + rest, rel=1e-6)
        assert plan["original_latency_ms"] == pytest.approx(original, rel=1e-6)
        assert plan["budget_ms"] == pytest.approx(plan["budget_ratio"] * original, rel=1e-6)
        assert plan["latency_ms"] <= plan["budget_ms"] * (1 + 1e-9)
        assert plan["predicted_speedup"] == pytest.approx(original / plan["latency_ms"], rel=1e-6)
        assert plan["predicted_speedup"] >= 1 / plan["budget_ratio"] - 1e-6
        # Uniform importance: each segment between kept activations counts 1, less 1 per pruned conv in it.
        assert plan["importance"] == pytest.approx(len(plan["activations"]) + 1 - len(pruned))
        if not plan["prune"]:
            assert pruned == []
    for merge, prune in zip(plans[::2], plans[1::2]):  # pruning widens the search: never less important
        assert prune["importance"] >= merge["importance"] - 1e-9


@slow
def test_each_plan_is_benched_and_its_export_verified(dry_run):
    _, _, record = dry_run
    for plan in record["plans"]:
        bench, export = plan["bench"], plan["export"]
        assert bench["exit"] == 0 and bench["original_ms"] > 0 and bench["compressed_ms"] > 0
        low, high = bench["interval"]  # the bench's speed-up over its session sets, and its 95% interval
        assert low <= bench["measured_speedup"] <= high
        assert bench["predicted_speedup"] == pytest.approx(plan["predicted_speedup"])
        assert bench["original_images_per_s"] == pytest.approx(1e3 / bench["original_ms"])  # batch 1
        assert bench["backend"]["name"] == "torch" and bench["backend"]["options"]["channels_last"]
        assert export["exit"] == 0 and export["verified"] and export["max_relative_error"] <= 1e-3
    plans = {plan["name"]: plan for plan in record["plans"]}
    compared = {c["paper"]: c for c in record["comparisons"]}
    assert (compared["kim2023"]["our_plan"], compared["layermerge2024"]["our_plan"]) == ("r0.71_merge", "r0.61_prune")
    for c in compared.values():
        assert c["our_measured_speedup"] == plans[c["our_plan"]]["bench"]["measured_speedup"]


FAKE_WORKER = """
import json, os, signal, sys, time
for command in json.load(open(sys.argv[1])):
    if command["name"] == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if command["name"] == "hang":
        time.sleep(60)
    with open(sys.argv[2], "a") as results:
        results.write(json.dumps({"name": command["name"], "exit": 0, "seconds": 0.0}) + "\\n")
"""


def test_a_worker_that_dies_or_runs_past_its_limit_leaves_what_finished(tmp_path, monkeypatch):
    script = load_script()
    fake = tmp_path / "worker.py"
    fake.write_text(FAKE_WORKER)
    monkeypatch.setattr(script, "WORKER", fake)
    with open(tmp_path / "log", "w") as log:
        check = script.Check(script.DRY_RUN, tmp_path, tmp_path, script.Record(tmp_path / "r.json", {"steps": {}}),
                             log, deadline=float("inf"))
        died = check.dpcompress("died", [{"name": "first"}, {"name": "crash"}, {"name": "never"}], 60)
        assert died == {"first": {"name": "first", "exit": 0, "seconds": 0.0},
                        "crash": {"name": "crash", "exit": -9, "seconds": None, "crashed": True}}
        stopped = check.dpcompress("stopped", [{"name": "first"}, {"name": "hang"}, {"name": "never"}], 3)
        assert list(stopped) == ["first"]
    assert "the worker died (signal 9) in crash" in (tmp_path / "log").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_the_real_check_stops_in_one_line_and_keeps_its_record(tmp_path):
    result = run_script("--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), timeout=300)
    assert result.returncode == 2
    record = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert record["mode"] == "gpu" and record["environment"]["cuda_available"] is False
    assert record["steps"]["environment"]["status"] == "failed"
    assert "no CUDA device" in record["steps"]["environment"]["error"]
    assert list(record["steps"]) == ["environment"] and record["status"] == "not ok: environment"
    assert sum("error: torch sees no CUDA device" in line for line in result.stdout.splitlines()) == 1
