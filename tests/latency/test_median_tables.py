"""Tables made in several processes: the row-by-row median, and `profile --processes` end to end."""

from __future__ import annotations

import json

import pytest

from dpcompress.errors import UserError
from dpcompress.latency.processes import median_of_tables
from dpcompress.latency.profile import profile_table
from dpcompress.latency.table_file import read_rows
from dpcompress.tables import meta_path_for
from tests.cli_helpers import run_cli
from tests.latency.helpers import FlopBackend, mixed_chain


def test_each_row_is_its_median_over_the_tables(tmp_path):
    """Three tables of one chain made at three speeds: the median table is the middle one, row by row."""
    chain = mixed_chain()
    paths = []
    for rate in (1e4, 4e4, 2e4):
        path = tmp_path / f"rate{int(rate)}.csv"
        profile_table(chain, FlopBackend(flops_per_ms=rate), path, warmup=0, iters=1, prune_margin=None)
        paths.append(path)
    meta = median_of_tables(paths, tmp_path / "median.csv")
    middle, median = read_rows(paths[2]), read_rows(tmp_path / "median.csv")
    assert set(median) == set(middle)
    for option, row in median.items():
        assert row["latency_ms"] == pytest.approx(middle[option]["latency_ms"], rel=1e-5)
    assert meta["processes"] == 3 and json.loads(meta_path_for(tmp_path / "median.csv").read_text()) == meta
    first, fast, _ = meta["process_original_ms"]
    assert first == pytest.approx(4 * fast, rel=1e-4)  # the slowest table's network of single convs
    assert "anchor_quiet_ms" not in meta  # standalone tables have no anchor
    for path, (level, loaded) in zip(paths, [(2.5, 0), (3.3, 2), (2.6, 1)]):  # as in-network tables' metas
        made = json.loads(meta_path_for(path).read_text())
        meta_path_for(path).write_text(json.dumps(dict(made, anchor_quiet_ms=level, loaded_networks=loaded,
                                                       retimed_shapes=2 * loaded)))
    meta = median_of_tables(paths, tmp_path / "median.csv")
    assert meta["anchor_quiet_ms"] == 2.6 and meta["loaded_networks"] == 3 and meta["retimed_shapes"] == 6
    # Rests fitted in every table: the medians of the fixed part, the share and the singles' rest.
    fits = ["whole networks", "all quiet networks", "whole networks"]
    for path, (fixed, share, singles), fit in zip(paths, [(0.05, 0.04, 0.12), (0.07, 0.02, 0.15), (0.06, 0.06, 0.1)],
                                                  fits):
        made = json.loads(meta_path_for(path).read_text())
        meta_path_for(path).write_text(json.dumps(dict(made, rest_ms=fixed, rest_per_block=share, rest_fit=fit,
                                                       singles_rest_ms=singles, network_rests=[[1.0, 0.1, None]])))
    meta = median_of_tables(paths, tmp_path / "median.csv")
    assert (meta["rest_ms"], meta["rest_per_block"], meta["singles_rest_ms"]) == (0.06, 0.04, 0.12)
    assert "network_rests" not in meta  # each table's own evidence
    assert "rest_fit" not in meta  # medians of fits over different networks: neither kind
    for path in paths[1:2]:
        made = json.loads(meta_path_for(path).read_text())
        meta_path_for(path).write_text(json.dumps(dict(made, rest_fit="whole networks")))
    assert median_of_tables(paths, tmp_path / "median.csv")["rest_fit"] == "whole networks"
    # One table without a fit: the median of the singles' rests, and no share.
    made = json.loads(meta_path_for(paths[0]).read_text())
    meta_path_for(paths[0]).write_text(json.dumps({k: v for k, v in made.items()
                                                   if k not in ("rest_per_block", "singles_rest_ms")}))
    meta = median_of_tables(paths, tmp_path / "median.csv")
    assert meta["rest_ms"] == 0.1 and "rest_per_block" not in meta  # of 0.05 (no fit), 0.15 and 0.1


def test_tables_made_with_other_settings_are_not_mixed(tmp_path):
    chain = mixed_chain()
    profile_table(chain, FlopBackend(), tmp_path / "a.csv", warmup=0, iters=1, prune_margin=None)
    profile_table(chain, FlopBackend(), tmp_path / "b.csv", warmup=0, iters=3, prune_margin=None)
    with pytest.raises(UserError, match="iters"):
        median_of_tables([tmp_path / "a.csv", tmp_path / "b.csv"], tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists()


@pytest.mark.slow
def test_profile_in_two_processes_writes_the_median_and_removes_their_tables(workdir):  # noqa: F811
    args = ["profile", "--model", "nets.py:small", "--input-shape", "1,3,16,16", "--backend", "onnxruntime",
            "--threads", "1", "--warmup", "1", "--iters", "3", "--out", "t.csv"]
    result = run_cli("--quiet", *args, "--processes", "2", cwd=workdir)
    assert result.returncode == 0, result.stderr
    meta = json.loads((workdir / "t.meta.json").read_text())
    assert meta["processes"] == 2 and len(meta["process_original_ms"]) == 2
    assert len(read_rows(workdir / "t.csv")) > 0
    assert sorted(p.name for p in workdir.glob("t*")) == ["t.csv", "t.meta.json"]
    again = run_cli("--quiet", *args, "--processes", "2", cwd=workdir)
    assert again.returncode == 2 and "--overwrite" in again.stderr.strip().splitlines()[-1]
    zero = run_cli(*args, "--out", "z.csv", "--processes", "0", cwd=workdir)
    assert zero.returncode == 2 and "--processes must be at least 1" in zero.stderr


def test_a_row_timed_anywhere_takes_its_timed_median_and_a_row_bounded_everywhere_its_largest_bound(tmp_path):
    """Bounds are lower bounds of dominated blocks: mixed into a median they would price a huge merge
    below the convs it replaces (an OpenVINO table did: 0.28 ms for a block timed at 0.82 ms)."""
    from dpcompress.latency.table_file import TABLE_COLUMNS, table_text

    chain = mixed_chain()
    base = tmp_path / "base.csv"
    profile_table(chain, FlopBackend(), base, warmup=0, iters=1, prune_margin=None)
    meta = meta_path_for(base).read_text()
    rows = read_rows(base)
    first, second = sorted(rows)[:2]
    # (latency, timed) of the two rows in three tables.
    values = {first: [(5.0, 1), (1.0, 0), (9.0, 1)], second: [(2.0, 0), (3.0, 0), (1.0, 0)]}
    # Table 1 capped the first row (timed elsewhere), table 0 the second (bounded everywhere).
    capped = [[list(second[:2])], [list(first[:2])], []]
    paths = []
    for index in range(3):
        table = dict(rows)
        for option, column in values.items():
            latency, timed = column[index]
            table[option] = dict(rows[option], latency_ms=latency, timed=timed)
        path = tmp_path / f"t{index}.csv"
        path.write_text(table_text(table.values(), TABLE_COLUMNS))
        meta_path_for(path).write_text(json.dumps(dict(json.loads(meta), capped_blocks=capped[index])))
        paths.append(path)
    merged_meta = median_of_tables(paths, tmp_path / "m.csv")
    median = read_rows(tmp_path / "m.csv")
    assert (median[first]["latency_ms"], median[first]["timed"]) == (7.0, 1)  # the median of 5 and 9
    assert (median[second]["latency_ms"], median[second]["timed"]) == (3.0, 0)
    assert merged_meta["capped_blocks"] == [list(second[:2])]
    assert merged_meta["bounded_blocks"] == sum(1 for row in median.values() if not row["timed"]) - 1
