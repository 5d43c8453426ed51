"""Reading, validating and writing latency and importance tables."""

from __future__ import annotations

import json

import pytest

from dpcompress.errors import UserError
from dpcompress.graph.chain import Chain, ConvUnit
from dpcompress.tables import (
    LatencyTable,
    check_table_against_chain,
    format_pruned,
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


def test_a_rest_that_grows_with_the_blocks_prices_every_row_that_much_larger(tmp_path):
    path = tmp_path / "net.csv"
    rows = [{"start": 0, "end": 1, "latency_ms": 1.0}, {"start": 1, "end": 2, "latency_ms": 2.0},
            {"start": 0, "end": 2, "latency_ms": 2.5}, {"start": 0, "end": 2, "latency_ms": 1.5, "pruned": "1"}]
    write_latency_table(path, rows, extra_columns=["pruned"], meta={"rest_ms": 0.25, "rest_per_block": 0.1})
    table = read_latency_table(path)
    assert table.latency_ms == pytest.approx({(0, 1): 1.1, (1, 2): 2.2, (0, 2): 2.75})
    assert table.pruned_latency_ms == pytest.approx({(0, 2, (1,)): 1.65})
    assert table.original_latency_ms() == pytest.approx(1.1 * 3.0 + 0.25)
    for odd in (-0.1, "0.1", float("nan"), True):  # not a share: read as none
        meta_path_for(path).write_text(json.dumps({"rest_ms": 0.25, "rest_per_block": odd}))
        assert read_latency_table(path).latency_ms[(0, 1)] == 1.0


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


def test_pruned_column_round_trip(tmp_path):
    path = tmp_path / "net.csv"
    rows = [{"start": 0, "end": 1, "latency_ms": 1.0, "pruned": ""},
            {"start": 0, "end": 3, "latency_ms": 2.5, "pruned": format_pruned([3, 2])},
            {"start": 0, "end": 3, "latency_ms": 2.0, "pruned": "2"},
            {"start": 1, "end": 3, "latency_ms": 0.0, "pruned": format_pruned((2, 3))},
            {"start": 1, "end": 2, "latency_ms": 1.0},
            {"start": 2, "end": 3, "latency_ms": 1.0}]
    write_latency_table(path, rows, extra_columns=["pruned"])
    assert "0,3,2.5,2 3" in path.read_text()
    table = read_latency_table(path)
    assert table.num_positions == 3
    assert table.latency_ms == {(0, 1): 1.0, (1, 2): 1.0, (2, 3): 1.0}
    assert table.pruned_latency_ms == {(0, 3, (2, 3)): 2.5, (0, 3, (2,)): 2.0, (1, 3, (2, 3)): 0.0}
    assert table.block_latency(0, 3, (2,)) == 2.0 and table.block_latency(1, 2) == 1.0
    assert table.block_latency(0, 3) is None and table.block_latency(0, 1, (1,)) is None
    imp = tmp_path / "imp.csv"
    write_importance_table(imp, [{"start": 0, "end": 3, "importance": -1.0, "pruned": "3"},
                                 {"start": 0, "end": 3, "importance": 0.5, "pruned": ""}], extra_columns=["pruned"])
    read = read_importance_table(imp)
    assert read.importance == {(0, 3): 0.5} and read.pruned_importance == {(0, 3, (3,)): -1.0}


def test_tables_without_pruned_column_have_no_options(tmp_path):
    table = read_latency_table(write(tmp_path, "start,end,latency_ms\n0,1,1\n1,2,1\n0,2,1.5\n"))
    assert table.pruned_latency_ms == {} and table.latency_ms == {(0, 1): 1.0, (1, 2): 1.0, (0, 2): 1.5}
    assert read_importance_table(write(tmp_path, "start,end,importance\n0,2,1\n", "i.csv")).pruned_importance == {}


@pytest.mark.parametrize("pruned, message", [
    ("1", r"pruned position 1 is not a conv of \(1, 3\); it must lie in 2..3"),
    ("4", r"pruned position 4 is not a conv of \(1, 3\)"),
    ("2 x", "not a list of space-separated integer positions"),
    ("2,3", "not a list of space-separated integer positions"),
    ("3 3", "names a position twice"),
])
def test_bad_pruned_cells(tmp_path, pruned, message):
    path = write(tmp_path, f'start,end,latency_ms,pruned\n0,1,1,\n1,3,1,"{pruned}"\n')
    with pytest.raises(UserError, match=r"t\.csv, line 3: .*" + message):
        read_latency_table(path)
    path = write(tmp_path, f'start,end,importance,pruned\n1,3,1,"{pruned}"\n', "i.csv")
    with pytest.raises(UserError, match=message):
        read_importance_table(path)


def test_duplicate_pruned_rows(tmp_path):
    path = write(tmp_path, "start,end,latency_ms,pruned\n0,2,1,2\n0,2,1,\n0,2,1,2 \n")
    with pytest.raises(UserError, match=r"line 4: duplicate row for \(0, 2\) pruned '2'"):
        read_latency_table(path)
    path = write(tmp_path, "start,end,latency_ms,pruned\n0,2,1,1 2\n0,2,1,2 1\n")
    with pytest.raises(UserError, match="duplicate row"):
        read_latency_table(path)


def test_table_against_chain_checks_pruned_convs():
    # conv 1 widens 4 -> 8 channels (irreducible); conv 2 keeps 8x8x8 (reducible); conv 3 has stride 2.
    units = [chain_unit(1, 4, 8), chain_unit(2, 8, 8), chain_unit(3, 8, 8, stride=2)]
    chain = Chain(model=None, input_shape=(1, 4, 8, 8), units=units)
    table = LatencyTable(3, {(0, 1): 1.0, (1, 2): 1.0, (2, 3): 1.0}, pruned_latency_ms={(0, 2, (2,)): 1.0})
    check_table_against_chain(table, chain)
    table.pruned_latency_ms[(1, 3, (3,))] = 0.5
    with pytest.raises(UserError, match=r"block \(1, 3\) prunes conv 3, which this model cannot replace"):
        check_table_against_chain(table, chain)
    table = LatencyTable(3, {(0, 1): 1.0}, pruned_latency_ms={(1, 4, (2,)): 1.0})
    with pytest.raises(UserError, match=r"block \(1, 4\) is not a valid block"):
        check_table_against_chain(table, chain)


def chain_unit(position, in_channels, out_channels, stride=1):
    size = 8 // stride
    return ConvUnit(position=position, name=f"c{position}", in_channels=in_channels, out_channels=out_channels,
                    kernel=(3, 3), stride=(stride, stride), padding=(1, 1), dilation=(1, 1), groups=1, bias=False,
                    in_shape=(1, in_channels, 8, 8), out_shape=(1, out_channels, size, size), activation="ReLU",
                    linked=True)


@pytest.mark.parametrize("version", ["dpcompress-latency-table/1", "dpcompress-latency-table/3"])
def test_a_table_of_another_format_is_refused_in_one_line(tmp_path, version):
    from click.testing import CliRunner

    from dpcompress.cli import main
    from dpcompress.tables import TABLE_FORMAT

    assert TABLE_FORMAT == "dpcompress-latency-table/2"
    path = tmp_path / "net.csv"
    rows = [{"start": 0, "end": 1, "latency_ms": 1.0}, {"start": 1, "end": 2, "latency_ms": 2.0},
            {"start": 0, "end": 2, "latency_ms": 2.5}]
    write_latency_table(path, rows, meta={"format": version, "rest_ms": 0.25})
    with pytest.raises(UserError) as refused:
        read_latency_table(path)
    message = str(refused.value)
    assert "\n" not in message and str(meta_path_for(path)) in message
    assert repr(version) in message and repr(TABLE_FORMAT) in message
    result = CliRunner().invoke(main, ["solve", "--latency-table", str(path), "--budget-ratio", "0.9",
                                       "--out", str(tmp_path / "plan.json")])
    assert result.exit_code == 2 and message in result.output and not (tmp_path / "plan.json").exists()
    # The version this dpcompress writes is read, and so is a meta that claims none (written by hand).
    for meta in ({"format": TABLE_FORMAT, "rest_ms": 0.25}, {"rest_ms": 0.25}):
        meta_path_for(path).write_text(json.dumps(meta))
        assert read_latency_table(path).original_latency_ms() == pytest.approx(3.25)


def test_every_shipped_table_is_of_the_format_read():
    from pathlib import Path

    from dpcompress.tables import TABLE_FORMAT

    metas = sorted((Path(__file__).resolve().parents[2] / "latency_tables").rglob("*.meta.json"))
    assert metas and {json.loads(m.read_text())["format"] for m in metas} == {TABLE_FORMAT}
