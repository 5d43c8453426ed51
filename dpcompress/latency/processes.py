"""A table made several times, each in a fresh process, and the row-by-row median of them.

A shared machine's speed switches between states for seconds to minutes at a time, unevenly over kinds of
conv (docs/latency.md): tables made one after another meet different states, and a median over several
leans on none. A fresh process also starts with a fresh heap and fresh runtime sessions.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import statistics
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from dpcompress.errors import UserError
from dpcompress.fileio import write_json_atomic, write_text_atomic
from dpcompress.latency.table_file import (TABLE_COLUMNS, capped_option, check_resumable, option_entries, read_meta,
                                           read_rows, table_text)
from dpcompress.tables import meta_path_for, read_latency_table

def process_tables(out: "os.PathLike[str] | str", processes: int) -> List[Path]:
    """Where ``profile_in_processes`` keeps each process's table: ``TABLE.process<i>.csv``."""
    target = Path(out)
    return [target.with_name(f"{target.stem}.process{index}{target.suffix or '.csv'}")
            for index in range(1, processes + 1)]


def profile_in_processes(profile_one: Callable[[Path], Any], out: "os.PathLike[str] | str", processes: int, *,
                         overwrite: bool = False, say: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Make a table ``processes`` times, each by ``profile_one(path)`` in a fresh (spawned) process, then write
    their row-by-row median at ``out`` (:func:`median_of_tables`) and remove them; returns its meta.

    ``profile_one`` must pickle (a module-level function, or a ``functools.partial`` of one) and make the
    table resumably with the same settings each time: each process's table is kept until the median is
    written, so that the same call run again after an interruption resumes. A ``UserError`` in a process
    is raised here with its message; ``say`` hears which process runs."""
    if processes < 1:
        raise UserError(f"--processes must be at least 1 (got {processes})")
    if Path(out).exists() and not overwrite:
        raise UserError(f"{out} exists; use --overwrite to replace it, or a new --out")
    parts = process_tables(out, processes)
    spawn = multiprocessing.get_context("spawn")
    for index, part in enumerate(parts, 1):
        if say is not None:
            say(f"[process {index}/{processes}] {part}")
        receive, send = spawn.Pipe(duplex=False)
        child = spawn.Process(target=_profile_part, args=(profile_one, part, send))
        child.start()
        send.close()
        child.join()
        error = _received(receive)
        if error is not None:
            raise UserError(error)
        if child.exitcode != 0:
            raise UserError(f"profiling in process {index} of {processes} failed (exit status {child.exitcode}); "
                            f"the tables made so far stay beside {out}: run the same command again to resume")
    meta = median_of_tables(parts, out)
    for part in parts:
        part.unlink()
        meta_path_for(part).unlink()
    return meta


def _received(connection: Any) -> Optional[str]:
    """What a process sent before it ended: its error's message, or None (the pipe closed with nothing)."""
    try:
        return connection.recv() if connection.poll() else None
    except EOFError:
        return None
    finally:
        connection.close()


def _profile_part(profile_one: Callable[[Path], Any], part: Path, errors: Any) -> None:
    """One process's table; a user's error goes back to the parent as its message."""
    try:
        profile_one(part)
    except UserError as err:
        errors.send(str(err))
    finally:
        errors.close()


def median_of_tables(tables: Sequence["os.PathLike[str] | str"], out: "os.PathLike[str] | str") -> Dict[str, Any]:
    """Write at ``out`` the table whose every row is the median of that row over ``tables`` (made alike,
    each in a process of its own), with the median rest and call overheads; returns its meta.

    A row timed in any of the tables gets
    the median of its timed values; a row that every table bounded (as dominated, or over the per-block cap) gets the largest of its
    bounds: a median of bounds against medians of timed rows could make a dominated block look cheaper
    than the convs it stands for, and the DP would pick it."""
    if not tables:
        raise ValueError("median_of_tables needs at least one table")
    metas = [read_meta(meta_path_for(path), Path(path)) for path in tables]
    for path, meta in zip(tables[1:], metas[1:]):
        check_resumable(meta_path_for(path), meta, metas[0], Path(out))
    row_sets = [read_rows(Path(path)) for path in tables]
    if any(set(rows) != set(row_sets[0]) for rows in row_sets[1:]):
        raise UserError(f"the tables {', '.join(map(str, tables))} do not have the same blocks; make them alike")
    rows = {}
    for option, first in row_sets[0].items():
        timed = [r[option] for r in row_sets if r[option]["timed"]]
        if timed:
            rows[option] = dict(first, latency_ms=statistics.median(r["latency_ms"] for r in timed),
                                std_ms=statistics.median(r["std_ms"] for r in timed), timed=1)
        else:
            rows[option] = dict(first, latency_ms=max(r[option]["latency_ms"] for r in row_sets),
                                std_ms=float("nan"), timed=0)
    # Capped where some table capped it and no table timed it; the other bounds are dominance bounds.
    capped = {option for m in metas for option in map(capped_option, m.get("capped_blocks") or [])
              if not rows[option]["timed"]}
    meta = dict(metas[0], processes=len(tables),
                process_original_ms=[read_latency_table(path).original_latency_ms() for path in tables],
                capped_blocks=option_entries(capped),
                bounded_blocks=sum(1 for option, row in rows.items() if not row["timed"] and option not in capped),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    for key in ("network_rests", "plan_networks", "rest_per_block", "singles_rest_ms", "rest_fit"):
        meta.pop(key, None)  # the first table's own fit
    singles_rests = [m.get("singles_rest_ms", m.get("rest_ms")) for m in metas]
    if all(m.get("rest_per_block") is not None for m in metas):  # every table fitted its rest: the medians
        meta.update(rest_ms=statistics.median(m["rest_ms"] for m in metas),
                    rest_per_block=statistics.median(m["rest_per_block"] for m in metas),
                    singles_rest_ms=statistics.median(singles_rests))
        fits = {m.get("rest_fit") for m in metas}
        if len(fits) == 1 and None not in fits:  # each over the same kind of networks
            meta["rest_fit"] = fits.pop()
    elif all(rest is not None for rest in singles_rests):
        meta["rest_ms"] = statistics.median(singles_rests)
    if all(m.get("anchor_quiet_ms") is not None for m in metas):
        meta["anchor_quiet_ms"] = statistics.median(m["anchor_quiet_ms"] for m in metas)
        meta["loaded_networks"] = sum(m.get("loaded_networks") or 0 for m in metas)
        meta["retimed_shapes"] = sum(m.get("retimed_shapes") or 0 for m in metas)
    overheads = [m.get("call_overhead_ms") or {} for m in metas]
    meta["call_overhead_ms"] = {shape: statistics.median(o[shape] for o in overheads if shape in o)
                                for shape in overheads[0]}
    write_json_atomic(meta_path_for(out), meta)
    write_text_atomic(out, table_text(rows.values(), metas[0].get("columns") or TABLE_COLUMNS))
    return meta
