"""The README's Python example runs as written and prints figures that agree with what it returned, and
its quick-start commands are Makefile targets."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

PLAN_LINE = re.compile(r"^(\d+) convs -> (\d+) blocks; predicted ([\d.]+) ms \(budget ([\d.]+), "
                       r"original ([\d.]+)\): ([\d.]+)x$", re.M)
MEASURED_LINE = re.compile(r"^measured ([\d.]+) -> ([\d.]+) ms: ([\d.]+)x, 95% interval ([\d.]+)-([\d.]+)x "
                           r"\(predicted ([\d.]+)x\)$", re.M)


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def api_example() -> str:
    return re.search(r"```python\n(.*?)```", section("Python API"), re.S).group(1)


def close(printed: str, value: float) -> bool:
    """Whether ``printed`` is ``value`` as the example formats it (to its last decimal)."""
    decimals = len(printed.split(".")[1])
    return abs(float(printed) - value) <= 0.5 * 10 ** -decimals + 1e-12


@pytest.mark.slow
def test_readme_api_example_prints_consistent_figures(tmp_path, capsys):
    import torch.nn as nn

    here = os.getcwd()
    os.chdir(tmp_path)
    namespace = {"__name__": "readme"}
    try:
        exec(compile(api_example(), "README.md", "exec"), namespace)
    finally:
        os.chdir(here)
    printed = capsys.readouterr().out

    convs, blocks, predicted_ms, budget_ms, original_ms, speedup = PLAN_LINE.search(printed).groups()
    plan, chain, merged = namespace["plan"], namespace["chain"], namespace["merged"]
    assert int(convs) == chain.num_positions == 10
    assert int(blocks) == len(plan.blocks) < int(convs)
    # One Conv2d per block in the merged network, but for blocks whose every conv is pruned (identities).
    emptied = [(i, j) for i, j in plan.blocks if len(plan.pruned_in(i, j)) == j - i]
    assert sum(isinstance(m, nn.Conv2d) for m in merged.modules()) == len(plan.blocks) - len(emptied)
    assert close(budget_ms, 0.8 * plan.original_latency_ms) and close(original_ms, plan.original_latency_ms)
    assert close(predicted_ms, plan.latency_ms) and plan.latency_ms <= plan.budget_ms
    assert close(speedup, plan.original_latency_ms / plan.latency_ms) and float(speedup) >= 1.0

    measured_original, measured_compressed, measured, low, high, predicted = MEASURED_LINE.search(printed).groups()
    report = json.loads((tmp_path / "api_out" / "report.json").read_text())
    assert report["measured_speedup"] == pytest.approx(namespace["result"].report["measured_speedup"])
    assert report["measured_speedup"] == report["bench"]["measured_speedup"]
    assert report["measured_speedup_interval"] == report["bench"]["measured_speedup_interval"]
    assert close(measured_original, report["measured_original_ms"])
    assert close(measured_compressed, report["measured_compressed_ms"])
    assert close(measured, report["measured_speedup"]) and float(low) <= float(measured) <= float(high)
    assert close(low, report["measured_speedup_interval"][0]) and close(high, report["measured_speedup_interval"][1])
    kept = report["plan"]
    assert close(predicted, kept["original_latency_ms"] / kept["latency_ms"])
    # The table made by profile was the one compress used, so its plans are priced alike.
    assert Path(tmp_path, report["latency_table"]).resolve() == (tmp_path / "tables" / "tiny.csv").resolve()
    assert kept["original_latency_ms"] == pytest.approx(plan.original_latency_ms, rel=1e-9)


def test_readme_quick_start_commands_are_makefile_targets():
    commands = re.findall(r"^make ([\w-]+)", section("Quick start"), re.M)
    mentioned = set(re.findall(r"`make ([\w-]+)`", section("Quick start")))
    assert commands == ["demo", "test"]  # the two commands of a fresh machine
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    missing = sorted({*commands, *mentioned} - targets)
    assert not missing, f"README's quick start names make targets the Makefile lacks: {missing}"


def test_readme_results_are_figures_of_docs_results():
    """Each row of the README's results table has its predicted and measured speed-ups (and accuracy change)
    on one line of docs/results.md, where the figures are kept with the commands that reproduce them."""
    lines = (ROOT / "docs" / "results.md").read_text().splitlines()
    rows = [row for row in section("Results").splitlines() if re.match(r"\| \w", row) and "predicted" not in row]
    assert len(rows) >= 5
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        figures = [cells[4], cells[5], *([] if cells[6] == "-" else [cells[6]])]
        assert all(re.fullmatch(r"\d\.\d\dx|[+-]\d\.\d\d", figure) for figure in figures), row
        assert any(all(figure in line for figure in figures) for line in lines), f"not in docs/results.md: {row}"
