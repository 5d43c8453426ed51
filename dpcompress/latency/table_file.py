"""The profile's last phase, and its resume: a table's rows and meta on disk.

Rows are appended to ``<out>.partial`` as they finish (flushed and fsynced) beside ``<name>.meta.json.partial``,
so an interrupted run resumes where it stopped; the finished table is written sorted and atomically, with
``<name>.meta.json`` beside it.

Table columns: ``start,end,latency_ms,std_ms,in_channels,out_channels,kernel,stride,groups,in_h,in_w,timed``,
and ``pruned`` where the table has pruning options. ``kernel`` and ``stride`` are one integer when square
(``3``) and ``HxW`` otherwise (``3x5``); ``in_h``/``in_w`` are the block's input size.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence, TextIO, Tuple

from dpcompress.backends.base import MEDIAN_OF_RUNS
from dpcompress.errors import UserError
from dpcompress.fileio import write_json_atomic, write_text_atomic
from dpcompress.graph.geometry import BlockGeometry
from dpcompress.latency.blocks import Option
from dpcompress.tables import PRUNED_COLUMN, Pruned, format_pruned, meta_path_for

TABLE_COLUMNS = ("start", "end", "latency_ms", "std_ms", "in_channels", "out_channels",
                 "kernel", "stride", "groups", "in_h", "in_w", "timed")
PRUNED_TABLE_COLUMNS = (*TABLE_COLUMNS, PRUNED_COLUMN)  # a table with pruning options
# Meta fields that must agree for a run to resume (or reuse) an existing table.
RESUME_KEYS = ("format", "timing", "model", "input_shape", "batch_size", "backend", "backend_version", "backend_options",
               "device", "device_name", "threads", "precision", "warmup", "iters", "prune_margin", "call_overhead",
               "prune", "chain_fingerprint", "dpcompress_version", "statistic")
# What a meta from before a key existed meant by it.
RESUME_DEFAULTS = {"prune": False, "statistic": MEDIAN_OF_RUNS}
# The meta's networks a profile refits its rest over, and each entry's fields (``calibration.fit_rest``).
EVIDENCE_FIELDS = {"network_rests": ("blocks_ms", "rest_ms", "anchor_ms"),
                   "plan_networks": ("rows_ms", "wall_ms", "anchor_ms", "singles_wall_ms")}

Row = Dict[str, Any]


def partial_paths(table_path: "os.PathLike[str] | str") -> Tuple[Path, Path]:
    """Where an unfinished run keeps its rows and meta."""
    path = Path(table_path)
    return path.with_name(path.name + ".partial"), path.with_name(meta_path_for(path).name + ".partial")


def format_pair(pair: Sequence[int]) -> str:
    """``(3, 3)`` -> ``"3"``; ``(3, 5)`` -> ``"3x5"``."""
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}x{pair[1]}"


def table_row(geometry: BlockGeometry, pruned: Pruned, latency_ms: float, std_ms: float,
              timed: bool = True) -> Row:
    g = geometry
    return {"start": g.start, "end": g.end, "latency_ms": latency_ms, "std_ms": std_ms,
            "in_channels": g.in_channels, "out_channels": g.out_channels,
            "kernel": format_pair(g.kernel), "stride": format_pair(g.stride), "groups": g.groups,
            "in_h": g.in_shape[2], "in_w": g.in_shape[3], "timed": int(timed), PRUNED_COLUMN: format_pruned(pruned)}


def row_option(row: Row) -> Option:
    return (row["start"], row["end"], tuple(int(p) for p in row[PRUNED_COLUMN].split()))


def csv_line(row: Row, columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    values = dict(row, latency_ms=f"{row['latency_ms']:.6f}", std_ms=f"{row['std_ms']:.6f}")
    # A table without pruning options has no pruned column (its rows' cells are all empty).
    csv.DictWriter(buffer, columns, lineterminator="\n", extrasaction="ignore").writerow(values)
    return buffer.getvalue()


def table_text(rows: Iterable[Row], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """The CSV text of ``rows``, header first, sorted by (start, end, pruned convs)."""
    ordered = sorted(rows, key=row_option)
    return ",".join(columns) + "\n" + "".join(csv_line(r, columns) for r in ordered)


def read_rows(path: Path) -> Dict[Option, Row]:
    """Rows of a (possibly partial) table by block and pruned convs (none where the table has no pruned
    column). A line cut short by an interruption is dropped."""
    rows: Dict[Option, Row] = {}
    with open(path, newline="") as f:
        for record in csv.DictReader(f):
            try:
                row: Row = dict(record, start=int(record["start"]), end=int(record["end"]),
                                latency_ms=float(record["latency_ms"]), std_ms=float(record["std_ms"]),
                                timed=int(record["timed"]), pruned=record.get(PRUNED_COLUMN) or "")
                option = row_option(row)
            except (KeyError, TypeError, ValueError, AttributeError):
                continue
            if any(row.get(c) in (None, "") for c in TABLE_COLUMNS):
                continue
            rows[option] = row
    return rows


def option_entries(options: Iterable[Option]) -> List[List[Any]]:
    """Blocks listed in the meta (capped_blocks, unbuildable_blocks): ``[start, end]``, with the pruned
    convs third where there are any."""
    return [[s, e, list(pruned)] if pruned else [s, e] for s, e, pruned in sorted(options)]


def capped_option(entry: Sequence[Any]) -> Option:
    """A block as the meta lists it (:func:`option_entries`)."""
    return (int(entry[0]), int(entry[1]), tuple(int(p) for p in entry[2]) if len(entry) > 2 else ())


def check_resumable(path: Path, found: Dict[str, Any], wanted: Dict[str, Any], table_path: Path) -> None:
    """Refuse a meta ``found`` at ``path`` made with other settings than ``wanted`` (RESUME_KEYS)."""
    def value(meta: Dict[str, Any], key: str) -> Any:
        return meta.get(key, RESUME_DEFAULTS.get(key))

    differing = [k for k in RESUME_KEYS if value(found, k) != value(wanted, k)]
    if differing:
        details = ", ".join(f"{k}: {value(found, k)!r} there, {value(wanted, k)!r} now" for k in differing)
        raise UserError(f"{path} was made with other settings ({details}); "
                        f"use a new --out or --overwrite to replace {table_path}")


def read_meta(path: Path, table_path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{table_path} exists without its meta file {path}; "
                        "use a new --out or --overwrite to replace it") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); use a new --out or --overwrite") from None


def check_evidence(path: Path, found: Dict[str, Any], table_path: Path) -> None:
    """A resumed meta's networks are what its rest is fitted over again: entries of the wrong form
    (a hand-edited meta) are refused here, in one line, rather than failing the fit."""
    for key, fields in EVIDENCE_FIELDS.items():
        entries = found.get(key) or []
        optional = {"anchor_ms"} if key == "network_rests" else set()  # no anchor: models over its limit
        well_formed = isinstance(entries, list) and all(
            isinstance(entry, list) and len(entry) == len(fields)
            and all((isinstance(v, (int, float)) and not isinstance(v, bool)) or (v is None and f in optional)
                    for f, v in zip(fields, entry))
            for entry in entries)
        if not well_formed:
            raise UserError(f"{path}: {key} must be a list of [{', '.join(fields)}] entries; "
                            f"use a new --out or --overwrite to replace {table_path}")


def existing_rows(table_path: Path, meta: Dict[str, Any], overwrite: bool) -> Tuple[Dict[Option, Row], Dict[str, Any]]:
    """Rows already measured with the same settings (from an interrupted run, else from the finished
    table) and the meta they were written with (the call overheads subtracted from them, the rest of
    in-network timing, the capped blocks)."""
    partial_table, partial_meta = partial_paths(table_path)
    if overwrite:
        for path in (partial_table, partial_meta):
            path.unlink(missing_ok=True)
        return {}, {}
    for rows_path, found_path in ((partial_table, partial_meta), (table_path, meta_path_for(table_path))):
        if rows_path.exists():
            found = read_meta(found_path, table_path)
            check_resumable(found_path, found, meta, table_path)
            check_evidence(found_path, found, table_path)
            return read_rows(rows_path), found
    return {}, {}


class PartialTable:
    """A table being written: its rows so far, appended to the partial file as they come (``add``, then
    ``flush``), the partial meta saved beside (``save_meta``), and the finished table put in place (``finish``)."""

    def __init__(self, table_path: Path, columns: Sequence[str], rows: Dict[Option, Row]) -> None:
        self.path, self.columns, self.rows = table_path, columns, rows
        self.partial_table, self.partial_meta = partial_paths(table_path)
        self._sink: "TextIO | None" = None

    def open(self, meta: Dict[str, Any]) -> None:
        """Write the partial files afresh from the rows so far (dropping a line cut short last time)."""
        write_json_atomic(self.partial_meta, meta)
        write_text_atomic(self.partial_table, table_text(self.rows.values(), self.columns))
        self._sink = open(self.partial_table, "a")

    def add(self, option: Option, row: Row) -> None:
        assert self._sink is not None
        self.rows[option] = row
        self._sink.write(csv_line(row, self.columns))

    def flush(self) -> None:
        assert self._sink is not None
        self._sink.flush()
        os.fsync(self._sink.fileno())

    def save_meta(self, meta: Dict[str, Any]) -> None:
        write_json_atomic(self.partial_meta, meta)

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    def finish(self, meta: Dict[str, Any]) -> None:
        """The finished table and meta in place; the partial files gone."""
        self.close()
        write_json_atomic(meta_path_for(self.path), meta)
        write_text_atomic(self.path, table_text(self.rows.values(), self.columns))
        self.partial_table.unlink()
        self.partial_meta.unlink()
