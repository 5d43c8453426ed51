"""profile_in_processes: each table made in a fresh process, then their row-by-row median (library and API)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import dpcompress
from dpcompress.errors import UserError
from dpcompress.latency.processes import median_of_tables, process_tables, profile_in_processes
from dpcompress.latency.profile import profile_table
from dpcompress.latency.table_file import read_rows
from dpcompress.tables import meta_path_for
from tests.latency.helpers import FlopBackend, mixed_chain

RATES = {"process1": 1e4, "process2": 4e4, "process3": 2e4}


def flop_table(path: Path) -> None:
    """A process's table: the chain timed at the FLOP rate of its part (the processes run at three speeds)."""
    rate = next(r for name, r in RATES.items() if name in path.name)
    profile_table(mixed_chain(), FlopBackend(flops_per_ms=rate), path, warmup=0, iters=1, prune_margin=None)


def refused(path: Path) -> None:
    raise UserError(f"nothing to profile at {path.name}")


@pytest.mark.slow
def test_each_process_makes_its_table_and_the_median_is_written_and_they_are_removed(tmp_path):
    out = tmp_path / "t.csv"
    said = []
    meta = profile_in_processes(flop_table, out, 3, say=said.append)
    assert said == [f"[process {i}/3] {part}" for i, part in enumerate(process_tables(out, 3), 1)]
    assert meta["processes"] == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["t.csv", "t.meta.json"]
    # The same tables made here, one after another: the median is the middle speed's, row by row.
    alone = tmp_path / "alone"
    alone.mkdir()
    paths = process_tables(alone / "t.csv", 3)
    for path in paths:
        flop_table(path)
    middle, median = read_rows(paths[2]), read_rows(out)
    assert set(median) == set(middle)
    assert all(row["latency_ms"] == pytest.approx(middle[option]["latency_ms"], rel=1e-5)
               for option, row in median.items())
    assert median_of_tables(paths, alone / "m.csv")["process_original_ms"] == pytest.approx(meta["process_original_ms"])
    with pytest.raises(UserError, match="--overwrite"):
        profile_in_processes(flop_table, out, 3)


def test_a_users_error_in_a_process_is_raised_with_its_message_and_processes_must_be_positive(tmp_path):
    with pytest.raises(UserError, match="nothing to profile at t.process1.csv"):
        profile_in_processes(refused, tmp_path / "t.csv", 2)
    with pytest.raises(UserError, match="at least 1"):
        profile_in_processes(refused, tmp_path / "t.csv", 0)


@pytest.mark.slow
def test_the_python_api_profiles_in_processes(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()).eval()
    table = dpcompress.profile(model, (1, 3, 16, 16), backend="onnxruntime", threads=1, warmup=1, iters=3,
                               timing="standalone", progress=False, processes=2, out=tmp_path / "t.csv")
    meta = meta_path_for(tmp_path / "t.csv")
    assert table.num_positions == 2 and '"processes": 2' in meta.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv", "t.meta.json"]
    with pytest.raises(ValueError, match="by name"):
        dpcompress.profile(model, (1, 3, 16, 16), backend=FlopBackend(), processes=2)

