"""Recorded benches priced again under each form of the rest's fit (issue 15).

Reads the records of ``quiet_fidelity.py`` (JSON lines) and ``bench_prediction.py`` (JSON): each names
its in-network table, the plan's blocks and the measured speed-up. For every form of fit over the
table's recorded networks (meta ``network_rests``, ``plan_networks``, ``singles_rest_ms``), prices the
plan from the table's rows as written (before the table's own ``rest_per_block``) and prints each
record's error (predicted / measured - 1), then per form how many are within 5%, the mean, the mean of
the absolute errors and the largest. Records without their plan's blocks (from before the scripts
wrote them) are left out, as are benches that never met their table's state.

    .venv/bin/python benchmarks/rest_fit_forms.py out/qf_*/openvino.jsonl out/bench_prediction/prediction_openvino_*.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from dpcompress.latency.profile import PLAN_NETWORK_MARGIN, fit_rest, plan_network_rests, profile_rest_fit
from dpcompress.tables import LatencyTable, read_latency_table, rest_per_block

Fit = Optional[Tuple[float, float]]


def file_rows(table: LatencyTable) -> Dict[Tuple[int, int], float]:
    """The table's rows as written: the table reads them priced by its own ``rest_per_block``."""
    growth = 1 + rest_per_block(table.meta)
    return {block: ms / growth for block, ms in table.latency_ms.items()}


def priced_speedup(table: LatencyTable, blocks: Sequence[Tuple[int, int]], fit: Fit) -> float:
    """A plan's predicted speed-up from the table's rows with the rest ``fit`` (fixed ms, share of the blocks);
    None: the network of single convs' rest alone."""
    rows = file_rows(table)
    fixed, share = fit or (table.meta.get("singles_rest_ms", table.meta.get("rest_ms")), 0.0)

    def latency(plan_blocks: Sequence[Tuple[int, int]]) -> float:
        return fixed + (1 + share) * math.fsum(rows[b] for b in plan_blocks)

    return latency([(p - 1, p) for p in range(1, table.num_positions + 1)]) / latency(blocks)


def forms(table: LatencyTable) -> Dict[str, Fit]:
    """Each form of the rest's fit over the table's recorded networks."""
    meta = table.meta
    rests, level = meta.get("network_rests") or [], meta.get("anchor_quiet_ms")
    singles_rest = meta.get("singles_rest_ms", meta.get("rest_ms"))
    rows = file_rows(table)
    singles_wall = math.fsum(rows[(p - 1, p)] for p in range(1, table.num_positions + 1)) + singles_rest
    # An entry from before plan networks kept the single convs' wall has it from the rows and the singles' rest.
    plans = [entry if len(entry) == 4 else [*entry, singles_wall] for entry in meta.get("plan_networks") or []]
    near = [entry for entry in plans if level is None or entry[2] <= PLAN_NETWORK_MARGIN * level]
    whole = ([(rows_ms, rest) for rows_ms, rest, _ in plan_network_rests(near)]
             + sorted({(wall - singles_rest, singles_rest) for *_, wall in near}))
    packed, every = profile_rest_fit(rests, [], level), profile_rest_fit(rests, plans, level)
    built = profile_rest_fit(rests, plans, level, singles_rest)
    fallback = every[:2] if every else None
    return {
        "packed networks only": packed[:2] if packed else None,
        "all quiet networks": fallback,
        "whole networks, no negative fixed part": (fit_rest(whole, min_networks=2) or fallback) if near else fallback,
        "whole networks (built)": built[:2] if built else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("records", nargs="+", help="quiet_fidelity.py's .jsonl and bench_prediction.py's .json files")
    args = parser.parse_args()
    records = []
    for path in args.records:
        text = Path(path).read_text()
        rows = ([json.loads(line) for line in text.splitlines()] if path.endswith(".jsonl") else json.loads(text))
        for row in rows:
            # quiet_fidelity's one bench per plan must have met the state; bench_prediction's median is its figure
            if isinstance(row.get("blocks"), list) and row.get("met_table_state", True) is not False:
                records.append((row["table"], [tuple(b) for b in row["blocks"]],
                                row.get("measured_median", row["measured"])))
    errors: Dict[str, List[float]] = {}
    for table_path, blocks, measured in records:
        table = read_latency_table(table_path)
        line = [f"{table_path} {len(blocks)} blocks, measured {measured:.3f}x"]
        for name, fit in forms(table).items():
            error = priced_speedup(table, blocks, fit) / measured - 1
            errors.setdefault(name, []).append(error)
            line.append(f"{name} {error:+.1%}")
        print(" | ".join(line))
    for name, values in errors.items():
        print(f"{name}: {sum(abs(x) <= 0.05 for x in values)} of {len(values)} within 5%, mean "
              f"{statistics.mean(values):+.1%}, mean abs {statistics.mean(abs(x) for x in values):.1%}, "
              f"largest {max(values, key=abs):+.1%}")


if __name__ == "__main__":
    main()
