"""Latency and importance tables: CSV files read, validated and written (numpy-free, torch-free).

Latency table: one row per valid block, ``start,end,latency_ms`` required; any further
columns (``std_ms``, ``in_channels``, ...) are kept in the file but ignored here. A block
with no row is not allowed. Beside ``<name>.csv`` may sit ``<name>.meta.json`` (model spec,
backend, chain fingerprint, ...). Its ``format`` is :data:`TABLE_FORMAT`: a table of another version is
refused, since its rows may be priced differently (a meta without ``format``, written by hand, and a
table without a meta are read as they are). Its ``rest_ms``, where present, is added to every plan's
latency (what the network spends outside its trunk convs), and its ``rest_per_block``, where present,
is the share of a plan's blocks that the rest grows by: the table's rows are read as that much
larger (``latency_ms`` and ``pruned_latency_ms`` hold the rows so priced, the file the blocks' own).

Importance table: one row per allowed segment between two kept activations,
``start,end,importance`` required; extra columns (raw measurements) are ignored.

Both tables may carry the optional ``pruned`` column (LayerMerge's search space): the
space-separated positions of the convs inside the row's block or segment that are replaced by
identity; empty or absent means none. A latency row with ``pruned`` is one pruning option of its
block; an importance row with ``pruned`` is the segment with exactly those convs pruned. Rows
without pruning are kept apart from the others (``latency_ms`` / ``importance``, keyed by
(start, end) as before), so a table without the column reads exactly as it always did.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from dpcompress.graph.chain import Chain
from dpcompress.errors import UserError
from dpcompress.fileio import PathLike, write_json_atomic, write_text_atomic

Block = Tuple[int, int]
Pruned = Tuple[int, ...]  # positions of pruned convs, ascending; () for none
PrunedBlock = Tuple[int, int, Pruned]  # (start, end, pruned), pruned not empty

# The latency table's version, written by ``profile`` into the meta and checked by every reader.
# /2: rows priced with ``rest_per_block`` (a /1 reader would misprice them without a word).
TABLE_FORMAT = "dpcompress-latency-table/2"
LATENCY_COLUMNS = ("start", "end", "latency_ms")
IMPORTANCE_COLUMNS = ("start", "end", "importance")
PRUNED_COLUMN = "pruned"


@dataclass
class LatencyTable:
    """Measured latency (ms) of every allowed block (i, j) of a chain with ``num_positions`` convs."""

    num_positions: int
    latency_ms: Dict[Block, float]  # blocks with nothing pruned
    meta: Dict[str, Any] = field(default_factory=dict)  # contents of <name>.meta.json, if any
    source: str = "<memory>"
    pruned_latency_ms: Dict[PrunedBlock, float] = field(default_factory=dict)  # the pruning options

    def block_latency(self, start: int, end: int, pruned: Pruned = ()) -> Optional[float]:
        """Latency of block (start, end) with the convs at ``pruned`` replaced by identity; None: no row."""
        if pruned:
            return self.pruned_latency_ms.get((start, end, pruned))
        return self.latency_ms.get((start, end))

    @property
    def rest_ms(self) -> float:
        """What the network spends outside the table's blocks (head, pooling, layout conversions, the
        call), paid by every plan alike: meta ``rest_ms``, written by in-network timing; 0 without it."""
        value = _meta_number(self.meta, "rest_ms")
        return 0.0 if value is None else value

    def original_latency_ms(self) -> float:
        """Latency of the uncompressed network: the sum of the single-conv blocks (p-1, p) plus the rest."""
        missing = [p for p in range(1, self.num_positions + 1) if (p - 1, p) not in self.latency_ms]
        if missing:
            raise UserError(
                f"{self.source}: no row for the single-conv block ({missing[0] - 1}, {missing[0]}), "
                "so the original latency is unknown; profile every single conv or use --budget-ms")
        return math.fsum([*(self.latency_ms[(p - 1, p)] for p in range(1, self.num_positions + 1)), self.rest_ms])


@dataclass
class ImportanceTable:
    """Importance of every allowed segment (i, j) between two kept activations."""

    importance: Dict[Block, float]  # segments with nothing pruned
    source: str = "<memory>"
    pruned_importance: Dict[PrunedBlock, float] = field(default_factory=dict)  # segments with pruned convs


def check_table_against_chain(table: LatencyTable, chain: Chain) -> None:
    """Raise UserError unless every row of the table is a valid block of the chain."""
    fingerprint = table.meta.get("chain_fingerprint")
    if fingerprint is not None and fingerprint != chain.fingerprint():
        raise UserError(f"{table.source} was measured for another model (chain fingerprint {fingerprint}, "
                        f"the given chain has {chain.fingerprint()}); profile this model")
    if table.num_positions > chain.num_positions:
        raise UserError(f"{table.source} has blocks up to position {table.num_positions} but the model has "
                        f"only {chain.num_positions} convs; profile this model")
    for start, end in sorted({*table.latency_ms, *((s, e) for s, e, _ in table.pruned_latency_ms)}):
        if not chain.is_valid_block(start, end):
            raise UserError(f"{table.source}: block ({start}, {end}) is not a valid block of the model; "
                            "the table is for another model")
    reducible = set(chain.reducible_positions())
    for start, end, pruned in sorted(table.pruned_latency_ms):
        irreducible = [p for p in pruned if p not in reducible]
        if irreducible:
            raise UserError(f"{table.source}: block ({start}, {end}) prunes conv {irreducible[0]}, which this model "
                            "cannot replace by identity (that needs stride 1 and the same input and output shape); "
                            "the table is for another model")


def meta_path_for(table_path: PathLike) -> Path:
    """``dir/<name>.csv`` -> ``dir/<name>.meta.json``."""
    path = Path(table_path)
    return path.with_name(path.stem + ".meta.json")


def read_latency_table(path: PathLike) -> LatencyTable:
    """Read and validate a latency table (and its meta file when present)."""
    rows = _read_rows(path, LATENCY_COLUMNS)
    latency, pruned_latency = _parse_values(path, rows, "latency_ms", allow_negative=False)
    num_positions = max(end for _, end, *_ in [*latency, *pruned_latency])
    meta = read_table_meta(path)
    growth = 1.0 + rest_per_block(meta)
    return LatencyTable(num_positions=num_positions, latency_ms={b: growth * ms for b, ms in latency.items()},
                        meta=meta, source=str(path),
                        pruned_latency_ms={b: growth * ms for b, ms in pruned_latency.items()})


def read_table_meta(table_path: PathLike) -> Dict[str, Any]:
    """The meta file beside a latency table ({} where there is none), checked to be of :data:`TABLE_FORMAT`."""
    meta_file = meta_path_for(table_path)
    if not meta_file.exists():
        return {}
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{meta_file}: not readable JSON ({err}); fix or delete it") from err
    if not isinstance(meta, dict):
        raise UserError(f"{meta_file}: expected a JSON object; fix or delete it")
    check_table_format(meta, meta_file)
    return meta


def check_table_format(meta: Mapping[str, Any], source: PathLike) -> None:
    """Refuse a meta of a latency table format other than :data:`TABLE_FORMAT` (one without ``format``
    passes: written by hand, it claims none)."""
    found = meta.get("format", TABLE_FORMAT)
    if found != TABLE_FORMAT:
        raise UserError(f"{source}: latency table format {found!r}, but this dpcompress reads {TABLE_FORMAT!r}; "
                        "profile the table again")


def rest_per_block(meta: Mapping[str, Any]) -> float:
    """The meta's ``rest_per_block``: how much a network's rest grows per ms of its blocks (in-network
    tables fit it over their networks); 0 where absent or not a finite, non-negative number."""
    value = _meta_number(meta, "rest_per_block")
    return 0.0 if value is None or value < 0 else value


def _meta_number(meta: Mapping[str, Any], key: str) -> Optional[float]:
    """``meta[key]`` where it is a finite number (not a bool), else None."""
    value = meta.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def read_importance_table(path: PathLike) -> ImportanceTable:
    """Read and validate an importance table (importances may be negative)."""
    rows = _read_rows(path, IMPORTANCE_COLUMNS)
    importance, pruned_importance = _parse_values(path, rows, "importance", allow_negative=True)
    return ImportanceTable(importance=importance, source=str(path), pruned_importance=pruned_importance)


def write_csv_table(path: PathLike, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """Write rows (dicts; missing keys left empty) as CSV with ``columns``, atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="raise", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _format_cell(value) for key, value in row.items()})
    write_text_atomic(path, buffer.getvalue())


def write_latency_table(path: PathLike, rows: Iterable[Mapping[str, Any]],
                        extra_columns: Sequence[str] = (), meta: Optional[Mapping[str, Any]] = None) -> None:
    """Write a latency table (rows need start, end, latency_ms) and, if given, its meta file."""
    write_csv_table(path, [*LATENCY_COLUMNS, *extra_columns], rows)
    if meta is not None:
        write_json_atomic(meta_path_for(path), dict(meta))


def write_importance_table(path: PathLike, rows: Iterable[Mapping[str, Any]],
                           extra_columns: Sequence[str] = ()) -> None:
    """Write an importance table (rows need start, end, importance)."""
    write_csv_table(path, [*IMPORTANCE_COLUMNS, *extra_columns], rows)


def format_pruned(pruned: Iterable[int]) -> str:
    """The ``pruned`` cell of a table row: positions space-separated ('' for none)."""
    return " ".join(str(p) for p in sorted(pruned))


def _format_cell(value: Any) -> Any:
    # repr keeps every digit of a float, so a table read back gives the same numbers.
    return repr(value) if isinstance(value, float) else value


def _read_rows(path: PathLike, required: Sequence[str]) -> List[Dict[str, str]]:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise UserError(f"cannot read table {path}: {err.strerror or err}") from err
    reader = csv.DictReader(io.StringIO(text))
    header = [name.strip() for name in (reader.fieldnames or [])]
    missing = [name for name in required if name not in header]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}; "
                        f"the header must include {','.join(required)}")
    reader.fieldnames = header
    rows = [row for row in reader if any((v or "").strip() for v in row.values() if isinstance(v, str))]
    if not rows:
        raise UserError(f"{path}: the table has no rows")
    return rows


def _parse_values(path: PathLike, rows: List[Dict[str, str]], column: str,
                  allow_negative: bool) -> Tuple[Dict[Block, float], Dict[PrunedBlock, float]]:
    """The rows' values: those with nothing pruned by (start, end), the others by (start, end, pruned)."""
    values: Dict[Block, float] = {}
    pruned_values: Dict[PrunedBlock, float] = {}
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{path}, line {line}"
        start = _parse_int(row.get("start"), "start", where)
        end = _parse_int(row.get("end"), "end", where)
        if not 0 <= start < end:
            raise UserError(f"{where}: need 0 <= start < end, got start={start} end={end}")
        raw = (row.get(column) or "").strip()
        try:
            value = float(raw)
        except ValueError:
            raise UserError(f"{where}: {column} {raw!r} is not a number") from None
        if not math.isfinite(value):
            raise UserError(f"{where}: {column} {raw!r} is not a finite number")
        if value < 0 and not allow_negative:
            raise UserError(f"{where}: {column} {raw!r} is negative; latencies must be >= 0")
        pruned = _parse_pruned(row.get(PRUNED_COLUMN), start, end, where)
        if not pruned:
            if (start, end) in values:
                raise UserError(f"{where}: duplicate row for ({start}, {end}); keep one row per pair")
            values[(start, end)] = value
            continue
        if (start, end, pruned) in pruned_values:
            raise UserError(f"{where}: duplicate row for ({start}, {end}) pruned {format_pruned(pruned)!r}; "
                            "keep one row per pair and pruned set")
        pruned_values[(start, end, pruned)] = value
    return values, pruned_values


def _parse_pruned(raw: Optional[str], start: int, end: int, where: str) -> Pruned:
    """The ``pruned`` cell: distinct positions of convs start+1..end, in any order."""
    positions = []
    for token in (raw or "").split():
        try:
            positions.append(int(token))
        except ValueError:
            raise UserError(f"{where}: pruned {raw!r} is not a list of space-separated integer positions") from None
    outside = [p for p in positions if not start < p <= end]
    if outside:
        raise UserError(f"{where}: pruned position {outside[0]} is not a conv of ({start}, {end}); "
                        f"it must lie in {start + 1}..{end}")
    if len(set(positions)) != len(positions):
        raise UserError(f"{where}: pruned {raw!r} names a position twice")
    return tuple(sorted(positions))


def _parse_int(raw: Optional[str], name: str, where: str) -> int:
    text = (raw or "").strip()
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{where}: {name} {text!r} is not an integer position") from None
