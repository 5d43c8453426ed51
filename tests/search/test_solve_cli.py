"""`dpcompress solve` end to end: outputs, errors (exit 2, one line, no plan), and no torch import."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dpcompress.graph.chain import Chain, ConvUnit
from dpcompress.cli import main
from dpcompress.tables import meta_path_for

LATENCY = "start,end,latency_ms,std_ms\n0,1,2.0,0.1\n1,2,2.0,0.1\n0,2,1.0,0.1\n2,3,1.5,0\n1,3,1.0,0\n"


def unit(position, activation="ReLU", linked=True):
    return ConvUnit(position=position, name=f"c{position}", in_channels=4, out_channels=4, kernel=(3, 3),
                    stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, bias=False,
                    in_shape=(1, 4, 8, 8), out_shape=(1, 4, 8, 8), activation=activation, linked=linked)


def run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


@pytest.fixture
def tables(tmp_path):
    lat = tmp_path / "lat.csv"
    lat.write_text(LATENCY)
    imp = tmp_path / "imp.csv"
    imp.write_text("start,end,importance,raw\n0,1,1.0,x\n1,2,0.5,x\n2,3,0.5,x\n0,2,0.75,x\n1,3,1.25,x\n0,3,0.1,x\n")
    return lat, imp


def test_solve_writes_plan_frontier_and_plot(tables, tmp_path):
    lat, imp = tables
    out, front, plot = tmp_path / "plan.json", tmp_path / "front.csv", tmp_path / "front.png"
    result = run(["solve", "--latency-table", str(lat), "--importance", str(imp), "--budget-ms", "3.0",
                  "--out", str(out), "--frontier", str(front), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    plan = json.loads(out.read_text())
    # Plans: {} 2.5 ms / 0.1, {1} 3.0 / 2.25, {2} 2.5 / 1.25, {1,2} 5.5 / 2.0: best within 3 ms keeps 1.
    assert plan["activations"] == [1] and plan["boundaries"] == [0, 1, 3]
    assert plan["latency_ms"] == 3.0 and plan["importance"] == 2.25
    assert plan["budget_ms"] == 3.0 and plan["original_latency_ms"] == 5.5
    rows = list(csv.DictReader(front.open()))
    assert [(float(r["latency_ms"]), float(r["importance"])) for r in rows] == [(2.5, 1.25), (3.0, 2.25)]
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert "kept activations: 1 (1)" in result.output


def test_budget_ratio_and_uniform(tables, tmp_path):
    lat, _ = tables
    out = tmp_path / "plan.json"
    result = run(["solve", "--latency-table", str(lat), "--budget-ratio", "1.0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["activations"] == [1, 2]  # the original net fits its own latency


def chain_json(tmp_path, activation_at_1=True):
    chain = Chain(model="test:net", input_shape=(1, 4, 8, 8),
                  units=[unit(1, "ReLU" if activation_at_1 else None), unit(2), unit(3)])
    path = tmp_path / "chain.json"
    path.write_text(json.dumps(chain.to_json()))
    return chain, path


def test_chain_restricts_segments_and_tags_the_plan(tables, tmp_path):
    lat, _ = tables
    chain, chain_path = chain_json(tmp_path, activation_at_1=False)
    out = tmp_path / "plan.json"
    result = run(["solve", "--latency-table", str(lat), "--budget-ms", "100", "--out", str(out),
                  "--chain", str(chain_path)])
    assert result.exit_code == 0, result.output
    plan = json.loads(out.read_text())
    assert plan["activations"] == [2]  # position 1 holds no activation in this chain
    assert plan["chain_fingerprint"] == chain.fingerprint() and plan["model"] == "test:net"


def test_meta_fingerprint_must_match_the_chain(tables, tmp_path):
    lat, _ = tables
    _, chain_path = chain_json(tmp_path)
    meta_path_for(lat).write_text(json.dumps({"chain_fingerprint": "0123456789abcdef", "model": "x"}))
    out = tmp_path / "plan.json"
    result = run(["solve", "--latency-table", str(lat), "--budget-ms", "100", "--out", str(out),
                  "--chain", str(chain_path)])
    assert result.exit_code == 2 and "another model" in result.output and not out.exists()


@pytest.mark.parametrize("latency, importance, budget, message", [
    (LATENCY, None, ["--budget-ms", "1.0"], "smallest achievable latency 2.5 ms"),
    ("start,end,latency_ms\n0,1,1\n2,3,1\n", None, ["--budget-ms", "9"], "no chain of blocks"),
    ("start,end,latency_ms\n0,1,1\n0,1,2\n", None, ["--budget-ms", "9"], "duplicate row"),
    ("start,end,latency_ms\n0,1,-1\n", None, ["--budget-ms", "9"], "negative"),
    ("start,end,latency_ms\n0,1,abc\n", None, ["--budget-ms", "9"], "not a number"),
    ("start,end,latency_ms\n0,1,1\n1,2,1\n", "start,end,importance\n0,2,1\n0,3,1\n", ["--budget-ms", "9"],
     "ends past"),
    ("start,end,latency_ms\n0,1,1\n0,2,1\n", "start,end,importance\n0,1,1\n1,2,1\n0,2,1\n", ["--budget-ms", "9"],
     "cannot be split"),
    (LATENCY, None, ["--budget-ms", "9", "--budget-ratio", "1"], "exactly one"),
    (LATENCY, None, [], "exactly one"),
    ("start,end,latency_ms\n0,2,1\n", None, ["--budget-ratio", "0.5"], "original latency is unknown"),
])
def test_bad_inputs_exit_2_with_one_line_and_no_plan(tmp_path, latency, importance, budget, message):
    lat = tmp_path / "lat.csv"
    lat.write_text(latency)
    args = ["solve", "--latency-table", str(lat), *budget, "--out", str(tmp_path / "plan.json")]
    if importance is not None:
        imp = tmp_path / "imp.csv"
        imp.write_text(importance)
        args += ["--importance", str(imp)]
    # A subprocess shows exactly what a user sees on stderr.
    result = subprocess.run([sys.executable, "-m", "dpcompress.cli", *args], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "plan.json").exists()


def test_solve_does_not_import_torch(tables, tmp_path):
    lat, imp = tables
    out = tmp_path / "plan.json"
    code = ("import sys\nfrom dpcompress.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'onnx', "
            "'onnxruntime', 'matplotlib'))\nassert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code, "solve", "--latency-table", str(lat), "--importance",
                             str(imp), "--budget-ratio", "0.6", "--out", str(out), "--frontier",
                             str(tmp_path / "f.csv")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert out.exists()


def test_a_table_alone_keeps_the_activations_its_meta_lists(tmp_path):
    """Profiled tables record the chain's activation positions, so a solve given only the table keeps to them."""
    import json

    from dpcompress.search.solver import solve_for_model
    from dpcompress.tables import read_latency_table

    shipped = Path(__file__).resolve().parents[2] / "latency_tables" / "cpu_onnxruntime" / "resnet18.csv"
    table = read_latency_table(shipped)
    allowed = set(json.loads(shipped.with_suffix(".meta.json").read_text())["activation_positions"])
    assert allowed and len(allowed) < table.num_positions - 1
    plan, frontier = solve_for_model(table, None, table.original_latency_ms(), with_frontier=True)
    assert all(set(p.activations) <= allowed for p in [plan, *frontier])
