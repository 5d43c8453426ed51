"""How prediction errors follow the state a table and its bench ran in (issue 15).

Reads the JSON lines ``quiet_fidelity.py`` writes (one per plan: predicted and measured speed-up,
the table's original latency and the bench's) and, per runtime and per kind of plan (budget 0.7,
and the deeper ones), fits the log error, log(predicted / measured), on the log of the table's
original over the bench's original. The slope says how much of a state difference between the
table and its bench turns into error; the intercept is the error where both saw the same state.

    .venv/bin/python benchmarks/fidelity_states.py out/qf_*/*.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Dict, List

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("records", nargs="+", help="quiet_fidelity.py's JSON lines files")
    args = parser.parse_args()
    groups: Dict[tuple, List[dict]] = {}
    for path in args.records:
        for line in Path(path).read_text().splitlines():
            row = json.loads(line)
            if not row.get("table_original_ms") or row.get("met_table_state") is False:
                continue  # a bench that never met the table's state says nothing about the table
            runtime = "openvino" if "openvino" in row["table"] else "onnxruntime"
            groups.setdefault((runtime, "0.7" if row["ratio"] >= 0.6 else "deeper"), []).append(row)
    print("| runtime | plans | count | slope | error at the same state | residual spread | within 5% |")
    print("|---|---|---|---|---|---|---|")
    for (runtime, kind), rows in sorted(groups.items()):
        error = np.array([math.log(r["predicted"] / r["measured"]) for r in rows])
        state = np.array([math.log(r["table_original_ms"] / r["bench_original_ms"]) for r in rows])
        slope, intercept = np.polyfit(state, error, 1)
        residual = error - (slope * state + intercept)
        within = int(np.sum(np.abs(error) <= math.log(1.05)))
        print(f"| {runtime} | {kind} | {len(rows)} | {slope:.2f} | {100 * math.expm1(intercept):+.1f}% | "
              f"{100 * residual.std():.1f}% | {within} of {len(rows)} |")


if __name__ == "__main__":
    main()
