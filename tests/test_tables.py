"""Reading, validating and writing latency and importance tables."""

from __future__ import annotations

import json

import pytest

from dpcompress.errors import UserError
from dpcompress.tables import (
    meta_path_for,
    read_importance_table,
    read_latency_table,
    write_importance_table,
    write_latency_table,
)


def write(tmp_path, text, name="t.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_latency_table_round_trip_with_extra_columns_and_meta(tmp_path):
    path = tmp_path / "tables" / "net.csv"
    rows = [{"start": 0, "end": 1, "latency_ms": 0.1 + 0.2, "std_ms": 0.01},
            {"start": 1, "end": 2, "latency_ms": 1.5, "std_ms": 0.02},
            {"start": 0, "end": 2, "latency_ms": 1.25}]
    write_latency_table(path, rows, extra_columns=["std_ms"], meta={"model": "m", "chain_fingerprint": "abc"})
    table = read_latency_table(path)
    assert table.num_positions == 2
    assert table.latency_ms == {(0, 1): 0.1 + 0.2, (1, 2): 1.5, (0, 2): 1.25}  # every digit survives
    assert table.meta == {"model": "m", "chain_fingerprint": "abc"}
    assert meta_path_for(path) == tmp_path / "tables" / "net.meta.json"
    assert table.original_latency_ms() == pytest.approx(1.8)


def test_importance_table_allows_negative_and_ignores_extra_columns(tmp_path):
    path = tmp_path / "imp.csv"
    write_importance_table(path, [{"start": 0, "end": 2, "importance": -0.5, "raw": "x"}], extra_columns=["raw"])
    assert read_importance_table(path).importance == {(0, 2): -0.5}


@pytest.mark.parametrize("text, message", [
    ("start,end\n0,1\n", "missing column"),
    ("start,end,latency_ms\n", "no rows"),
    ("start,end,latency_ms\n0,1,1.0\n0,1,2.0\n", "duplicate row"),
    ("start,end,latency_ms\n0,1,-1.0\n", "negative"),
    ("start,end,latency_ms\n0,1,fast\n", "not a number"),
    ("start,end,latency_ms\n0,1,nan\n", "not a finite number"),
    ("start,end,latency_ms\n0,x,1\n", "not an integer"),
    ("start,end,latency_ms\n2,1,1\n", "0 <= start < end"),
])
def test_bad_latency_tables(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        read_latency_table(write(tmp_path, text))


def test_bad_importance_tables(tmp_path):
    with pytest.raises(UserError, match="duplicate row"):
        read_importance_table(write(tmp_path, "start,end,importance\n0,2,1\n0,2,1\n"))
    with pytest.raises(UserError, match="missing column"):
        read_importance_table(write(tmp_path, "start,end,latency_ms\n0,2,1\n"))


def test_missing_file_and_bad_meta(tmp_path):
    with pytest.raises(UserError, match="cannot read table"):
        read_latency_table(tmp_path / "nope.csv")
    path = write(tmp_path, "start,end,latency_ms\n0,1,1\n")
    meta_path_for(path).write_text("{broken")
    with pytest.raises(UserError, match="meta.json"):
        read_latency_table(path)
    meta_path_for(path).write_text(json.dumps([1, 2]))
    with pytest.raises(UserError, match="JSON object"):
        read_latency_table(path)


def test_original_latency_needs_every_single_conv(tmp_path):
    table = read_latency_table(write(tmp_path, "start,end,latency_ms\n0,2,1\n0,1,1\n"))
    with pytest.raises(UserError, match=r"single-conv block \(1, 2\)"):
        table.original_latency_ms()
