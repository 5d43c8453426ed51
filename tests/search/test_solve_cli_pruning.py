"""`dpcompress solve` with pruning options in the tables: the plan and the frontier carry the pruned
convs; bad pruning rows are one line and exit 2."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from dpcompress.cli import main
from dpcompress.graph.chain import Chain, ConvUnit

# Two convs; merged they are slower than apart, and pruning conv 2 (in its own block or merged) is fastest.
LATENCY = ("start,end,latency_ms,pruned\n0,1,1.0,\n1,2,1.0,\n0,2,2.5,\n"
           "1,2,0.0,2\n0,2,1.0,2\n")
IMPORTANCE = "start,end,importance,pruned\n0,1,0.5,\n1,2,0.5,\n0,2,0.25,\n1,2,0.25,2\n0,2,0.125,2\n"


def unit(position, in_channels=4, stride=1):
    return ConvUnit(position=position, name=f"c{position}", in_channels=in_channels, out_channels=4,
                    kernel=(3, 3), stride=(stride, stride), padding=(1, 1), dilation=(1, 1), groups=1, bias=False,
                    in_shape=(1, in_channels, 8, 8), out_shape=(1, 4, 8 // stride, 8 // stride), activation="ReLU",
                    linked=True)


def write_tables(tmp_path, latency=LATENCY, importance=IMPORTANCE):
    lat, imp = tmp_path / "lat.csv", tmp_path / "imp.csv"
    lat.write_text(latency)
    imp.write_text(importance)
    return lat, imp


def test_plan_and_frontier_carry_the_pruned_convs(tmp_path):
    lat, imp = write_tables(tmp_path)
    out, front = tmp_path / "plan.json", tmp_path / "front.csv"
    result = CliRunner().invoke(main, ["solve", "--latency-table", str(lat), "--importance", str(imp),
                                       "--budget-ms", "1.5", "--out", str(out), "--frontier", str(front)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    plan = json.loads(out.read_text())
    assert plan["activations"] == [1] and plan["boundaries"] == [0, 1, 2] and plan["pruned"] == [2]
    assert plan["latency_ms"] == 1.0 and plan["importance"] == 0.75 and plan["original_latency_ms"] == 2.0
    rows = list(csv.DictReader(front.open()))
    assert [(r["latency_ms"], r["importance"], r["pruned"]) for r in rows] == [("1.0", "0.75", "2"), ("2.0", "1.0", "")]


def test_a_chain_whose_conv_cannot_be_pruned(tmp_path):
    lat, imp = write_tables(tmp_path)
    chain = Chain(model="test:net", input_shape=(1, 4, 8, 8), units=[unit(1), unit(2, stride=2)])
    chain_path = tmp_path / "chain.json"
    chain_path.write_text(json.dumps(chain.to_json()))
    out = tmp_path / "plan.json"
    result = subprocess.run([sys.executable, "-m", "dpcompress.cli", "solve", "--latency-table", str(lat),
                             "--importance", str(imp), "--budget-ms", "9", "--out", str(out), "--chain",
                             str(chain_path)], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "block (0, 2) prunes conv 2, which this model cannot replace by identity" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("latency, importance, message", [
    (LATENCY + "0,1,0.5,2\n", IMPORTANCE, "pruned position 2 is not a conv of (0, 1)"),
    (LATENCY + "0,2,0.5,2 two\n", IMPORTANCE, "not a list of space-separated integer positions"),
    (LATENCY, IMPORTANCE + "0,2,0.1,1\n", "segment (0, 2) pruned '1' cannot be split into blocks"),
])
def test_bad_pruning_rows_exit_2_with_one_line(tmp_path, latency, importance, message):
    lat, imp = write_tables(tmp_path, latency, importance)
    out = tmp_path / "plan.json"
    result = subprocess.run([sys.executable, "-m", "dpcompress.cli", "solve", "--latency-table", str(lat),
                             "--importance", str(imp), "--budget-ms", "9", "--out", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert message in result.stderr and not out.exists()


def test_plan_summary_counts_blocks_left_with_no_conv():
    from dpcompress.cli import plan_summary
    from dpcompress.graph.plan import Plan

    plan = Plan(activations=[2], boundaries=[0, 1, 2, 4], num_positions=4, pruned=[2, 3], budget_ms=2.0,
                latency_ms=1.5, importance=1.0)
    summary = plan_summary(plan)
    assert "blocks: 3 merged convs for 4 original convs (1 of them with every conv pruned)" in summary
    assert "pruned convs: 2 replaced by identity (2 3)" in summary
