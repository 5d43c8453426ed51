"""compress end to end on a tiny digits model: profile, importance, solve, fine-tune, verified export, report."""

import json
import subprocess
import sys

import pytest
import torch

from dpcompress.backends import get_backend
from dpcompress.pipeline import CompressSettings, compress_from_spec as compress, find_table
from dpcompress.latency.profile import profile_table
from dpcompress.search.solver import frontier
from dpcompress.tables import read_latency_table
from dpcompress.graph.trace import trace_model
from tests.digits_helpers import INPUT_SHAPE, TINY_SPEC, trained_tiny


@pytest.mark.slow
def test_compress_with_data_produces_verified_export_and_report(tmp_path):
    weights = tmp_path / "tiny.pt"
    torch.save(trained_tiny().state_dict(), weights)
    # The table is made first, so that the budget can lie between its smallest latency and the original's
    # whatever the timings; compress finds and reuses it. The closed loop is off here (its choice depends on
    # timing noise; tests/search/test_closed_loop.py covers it).
    tables = tmp_path / "tables"
    traced = trace_model(trained_tiny(), INPUT_SHAPE, spec=TINY_SPEC)
    profile_table(traced.chain, get_backend("onnxruntime", threads=1), tables / "latency.csv", model_spec=TINY_SPEC,
                  traced=traced, warmup=2, iters=5)
    table = read_latency_table(tables / "latency.csv")
    budget = (frontier(table, None, traced.chain.activation_positions)[0][0] + table.original_latency_ms()) / 2
    settings = CompressSettings(budget_ms=budget, budget_ratio=None, importance="proxy", warmup=2, iters=5, epochs=1,
                                threads=1, tables_dir=str(tables), measure=False, prune=False)
    report = compress(TINY_SPEC, str(weights), INPUT_SHAPE, str(tmp_path / "out"), settings, data_spec="digits",
                      say=lambda line: None)
    out = tmp_path / "out"
    assert report["latency_table"] == str(tables / "latency.csv")
    for name in ["importance.csv", "plan.json", "frontier.csv",
                 "frontier.png", "finetuned.pt", "compressed.onnx", "report.json", "report.md"]:
        assert (out / name).is_file(), name
    assert report["export"]["verification"]["passed"]
    assert report["predicted_latency_ms"] <= report["budget_ms"]
    assert report["closed_loop"] is None and "Closed loop: off" in (out / "report.md").read_text()
    assert {"test_before", "test_merged", "test_after"} <= set(report["accuracy"])
    # The merged export is the fine-tuned network: its accuracy is the fine-tuned one.
    assert abs(report["accuracy"]["test_merged"] - report["accuracy"]["test_after"]) < 0.01
    assert json.loads((out / "report.json").read_text())["measured_speedup"] > 0
    assert "accuracy: " in (out / "report.md").read_text()

    # The table is found again for the same chain, backend, precision and batch size.
    out = tables
    assert find_table(out, report["plan"]["chain_fingerprint"], "onnxruntime", "fp32", 1) == out / "latency.csv"
    assert find_table(out, report["plan"]["chain_fingerprint"], "onnxruntime", "fp16", 1) is None
    # ... and, where threads are asked for, only with the threads it was made with.
    assert find_table(out, report["plan"]["chain_fingerprint"], "onnxruntime", "fp32", 1, threads=1) is not None
    assert find_table(out, report["plan"]["chain_fingerprint"], "onnxruntime", "fp32", 1, threads=2) is None
    # ... and only when its rows were timed the way asked for (tables from before count as standalone).
    assert find_table(out, report["plan"]["chain_fingerprint"], "onnxruntime", "fp32", 1, timing="in-network")
    assert find_table(out, report["plan"]["chain_fingerprint"], "onnxruntime", "fp32", 1, timing="standalone") is None
    # ... and only with the pruning setting it was made with.
    assert find_table(out, report["plan"]["chain_fingerprint"], "onnxruntime", "fp32", 1, prune=True) is None
    assert report["bench"]["backend"]["threads"] == 1
    assert report["prune"] is False and "pruning: off" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.slow
def test_compress_cli_without_data_says_accuracy_not_measured(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dpcompress.cli", "compress", "--model", TINY_SPEC, "--input-shape", "1,3,16,16",
         "--importance", "uniform", "--threads", "1", "--out-dir", str(tmp_path / "out"),
         "--tables-dir", str(tmp_path), "--budget-ratio", "1.0"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "accuracy: not measured" in result.stdout and "measured speed-up:" in result.stdout
    assert "not measured" in (tmp_path / "out" / "report.md").read_text()
    # The closed loop benched its candidates and says which one it kept (or that it kept the original) and why.
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    loop = report["closed_loop"]
    assert loop["candidates"] and sum(c["chosen"] for c in loop["candidates"]) == (0 if report["kept_original"] else 1)
    assert report["plan"]["boundaries"] == next(
        (c["boundaries"] for c in loop["candidates"] if c["chosen"]), list(range(report["plan"]["num_positions"] + 1)))
    assert loop["reason"] in (tmp_path / "out" / "report.md").read_text()
    meta = json.loads((tmp_path / "out" / "latency.meta.json").read_text())
    assert meta["threads"] == 1 and report["table_anchor_quiet_ms"] == meta["anchor_quiet_ms"] > 0
    # Reusing a table made in a state the bench never meets: compress says the figures come from two states.
    tables = tmp_path / "tables"
    tables.mkdir()
    (tables / "tiny.csv").write_text((tmp_path / "out" / "latency.csv").read_text())
    (tables / "tiny.meta.json").write_text(json.dumps(dict(meta, anchor_quiet_ms=1000.0)))
    again = subprocess.run(
        [sys.executable, "-m", "dpcompress.cli", "compress", "--model", TINY_SPEC, "--input-shape", "1,3,16,16",
         "--importance", "uniform", "--threads", "1", "--out-dir", str(tmp_path / "again"),
         "--tables-dir", str(tables), "--budget-ratio", "1.0", "--no-measure"],
        capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "reusing" in again.stderr and "never met the state the table was made in" in again.stderr


def test_compress_finetune_importance_without_data_is_a_user_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dpcompress.cli", "compress", "--model", TINY_SPEC, "--input-shape", "1,3,16,16",
         "--importance", "finetune", "--out-dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "needs --data" in result.stderr
    assert not (tmp_path / "out").exists()


def test_compress_bad_threads_or_model_exit_2_and_create_nothing(tmp_path):
    for bad in (["--model", TINY_SPEC, "--threads", "0"], ["--model", "dpcompress.zoo:no_such_model"]):
        result = subprocess.run(
            [sys.executable, "-m", "dpcompress.cli", "compress", *bad, "--input-shape", "1,3,16,16",
             "--out-dir", str(tmp_path / "out")],
            capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error:"), result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "out").exists()


def test_a_table_without_a_timing_counts_as_standalone(tmp_path):
    (tmp_path / "old.csv").write_text("start,end,latency_ms\n0,1,1.0\n")
    meta = {"chain_fingerprint": "f", "backend": "onnxruntime", "precision": "fp32", "batch_size": 1}
    (tmp_path / "old.meta.json").write_text(json.dumps(meta))
    assert find_table(tmp_path, "f", "onnxruntime", "fp32", 1, timing="in-network") is None
    assert find_table(tmp_path, "f", "onnxruntime", "fp32", 1, timing="standalone") == tmp_path / "old.csv"
    # ... and as made without pruning options.
    assert find_table(tmp_path, "f", "onnxruntime", "fp32", 1, prune=True) is None
