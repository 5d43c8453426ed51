"""Each table's predicted speed-up of fixed plans, and that of the row-by-row median of the tables (issue 11).

Tables made in separate processes can disagree as a whole (benchmarks/process_states.py: a process
may run a network's depthwise convs some 20% slower than the next one does); this shows what a median
over several such tables predicts, to set beside benches run in several processes.

    for i in 1 2 3 4; do dpcompress profile --model torchvision:mobilenet_v2 --backend onnxruntime --no-prune \\
        --overwrite --out out/today/t$i.csv; done
    .venv/bin/python benchmarks/median_of_tables.py out/today/t*.csv --plans out/today/plan_0.7.json,out/today/plan_0.5.json
"""

from __future__ import annotations

import argparse
import math
import statistics
from typing import Dict, List, Tuple

from dpcompress.graph.plan import Plan, load_plan
from dpcompress.tables import LatencyTable, read_latency_table


def plan_latency(latency_ms: Dict[Tuple[int, int], float], rest_ms: float, plan: Plan) -> float:
    return math.fsum([*(latency_ms[block] for block in plan.blocks), rest_ms])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("tables", nargs="+", help="Latency tables of one model, backend and settings.")
    parser.add_argument("--plans", required=True, help="Plan files, comma-separated.")
    args = parser.parse_args()
    tables: List[LatencyTable] = [read_latency_table(path) for path in args.tables]
    plans = {path: load_plan(path) for path in args.plans.split(",")}
    singles = Plan(activations=[], boundaries=list(range(tables[0].num_positions + 1)),
                   num_positions=tables[0].num_positions)
    print("| table | original ms | " + " | ".join(plans) + " |")
    print("|---|---|" + "---|" * len(plans))
    for path, table in zip(args.tables, tables):
        original = plan_latency(table.latency_ms, table.rest_ms, singles)
        print(f"| {path} | {original:.3f} | " + " | ".join(
            f"{original / plan_latency(table.latency_ms, table.rest_ms, plan):.3f}x" for plan in plans.values()) + " |")
    rows = {block: statistics.median(t.latency_ms[block] for t in tables) for block in tables[0].latency_ms}
    rest = statistics.median(t.rest_ms for t in tables)
    original = plan_latency(rows, rest, singles)
    print(f"| row-by-row median of {len(tables)} | {original:.3f} | " + " | ".join(
        f"{original / plan_latency(rows, rest, plan):.3f}x" for plan in plans.values()) + " |")


if __name__ == "__main__":
    main()
