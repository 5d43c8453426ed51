"""Pruning inside merged blocks (LayerMerge's search space) against today's search space, on digits.

For each digits model (``dpcompress.zoo:digits_mobilenet_v2``, ``dpcompress.zoo:digits_resnet``): train it
seeded (``digits_model.trained_digits_model``), measure finetune importance once with pruning options, then
run :func:`dpcompress.pipeline.compress_model` (fine-tuning with distillation, closed loop on, ONNX Runtime CPU,
batch 1) at every budget ratio, once without pruning and once with (``CompressSettings(prune=...)``).
Each result is benched ``--repeats`` more times, original and merged alternating in one process, and
the median speed-up recorded.

One importance measurement serves both search spaces: a finetune row is trained with its segment's
seed whatever it prunes, and the offset subtracted comes from the unpruned base segments only
(dpcompress/search/importance.py), so the unpruned rows of the pruned table are exactly the table a
run without pruning measures. Both spaces are therefore priced by the same numbers. One latency table
per model and search space is profiled by the first run that needs it and found again by the others
(``tables_dir``: the model's folder).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_pruning_digits.py
    .venv/bin/python benchmarks/bench_pruning_digits.py --quick   # the tiny model, budget 0.5, 1 epoch, 1 step

``--stage importance`` stops after the importance tables (run one process per model with ``--models`` to
measure them side by side; a later run resumes from them). Results go to ``--out-dir``/results.md and
results.json (default out/bench_pruning_digits, ignored by git; a run with the same folder goes on where one
stopped) and to the JSON record (``--out``).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import common
from digits_model import run_log, trained_digits_model

from dpcompress.errors import UserError
from dpcompress.graph.trace import trace_model
from dpcompress.models import build_model
from dpcompress.pipeline import CompressSettings, compress_model
from dpcompress.search.importance import ImportanceSettings, compute_importance
from dpcompress.tables import ImportanceTable, read_importance_table
from dpcompress.training.data import DataBundle, load_data
from dpcompress.training.train import evaluate

INPUT_SHAPE = (1, 3, 32, 32)
MODELS = {"mobilenet_v2": "dpcompress.zoo:digits_mobilenet_v2", "resnet": "dpcompress.zoo:digits_resnet",
          "tiny": "dpcompress.zoo:tiny_mobilenet_v2"}  # tiny: the quick mode's
TARGET_DROP_POINTS = 1.0
SPACES = {False: "today", True: "pruned"}  # CompressSettings.prune -> the search space's name in the tables
QUICK = {"models": "tiny", "train_epochs": 1, "ratios": "0.5", "epochs": 1, "importance_steps": 1, "repeats": 1}

Say = Callable[[str], None]


def trained(name: str, model_dir: Path, data: DataBundle, epochs: int, seed: int, say: Say) -> Any:
    """The seeded, trained model ``name`` (reloaded where its weights exist)."""
    weights = model_dir / f"{name}.pt"
    began = time.perf_counter()
    model, now = trained_digits_model(weights, data.train, epochs, functools.partial(build_model, MODELS[name]),
                                      seed=seed)
    say(f"{name}: trained {epochs} epochs in {time.perf_counter() - began:.0f} s" if now
        else f"{name}: reusing trained weights {weights}")
    say(f"{name}: original holdout {100 * evaluate(model, data.holdout):.2f}%, test {100 * evaluate(model, data.test):.2f}%")
    return model


def pruned_importance(name: str, model: Any, model_dir: Path, data: DataBundle, steps: int, say: Say) -> ImportanceTable:
    """Finetune importance with pruning options, measured once (resumed where a run was interrupted)."""
    path = model_dir / "importance_pruned.csv"
    traced = trace_model(model, INPUT_SHAPE, spec=MODELS[name])
    began = time.perf_counter()
    compute_importance(traced, ImportanceSettings(method="finetune", steps=steps, prune=True), path, data=data,
                       model_spec=MODELS[name], progress=say)
    say(f"{name}: importance table {path} ({time.perf_counter() - began:.0f} s this run)")
    return read_importance_table(path)


def without_pruning(table: ImportanceTable) -> ImportanceTable:
    """The rows with nothing pruned: today's search space, priced as the pruned one (module doc)."""
    return ImportanceTable(importance=dict(table.importance), source=f"{table.source} (unpruned rows)")


def median_bench(original: Any, merged: Any, plan: Any, threads: int, repeats: int) -> Dict[str, Any]:
    """``repeats`` alternating benches of original and merged at batch 1: the median one, and every speed-up."""
    from dpcompress.backends import choose_backend
    from dpcompress.latency.bench import bench_modules

    backend, _ = choose_backend(None, threads=threads)
    original = common.rebuilt_original(original, INPUT_SHAPE)
    results = [bench_modules(backend, original, merged, input_shape=INPUT_SHAPE, plan=plan) for _ in range(repeats)]
    middle = sorted(results, key=lambda r: r.measured_speedup)[len(results) // 2]
    return {"speedup": middle.measured_speedup, "speedups": [r.measured_speedup for r in results],
            "original_ms": middle.original.median_ms, "compressed_ms": middle.compressed.median_ms}


def run_one(name: str, model: Any, data: DataBundle, table: ImportanceTable, prune: bool, ratio: float,
            model_dir: Path, args: argparse.Namespace, say: Say) -> Dict[str, Any]:
    """compress at one budget in one search space; the row of the results."""
    space = SPACES[prune]
    run_dir = model_dir / f"{space}_{ratio:.2f}"
    settings = CompressSettings(budget_ratio=ratio, epochs=args.epochs, distill=args.distill, threads=args.threads,
                                tables_dir=str(model_dir), prune=prune)
    row: Dict[str, Any] = {"model": name, "space": space, "ratio": ratio}
    say(f"=== {name}, {space} search space @ {ratio} -> {run_dir}")
    began = time.perf_counter()
    try:
        result = compress_model(model, INPUT_SHAPE, run_dir, settings, data=data, importance_table=table,
                                model_spec=MODELS[name], say=say)
    except UserError as err:  # an infeasible budget: the space reaches no plan this fast
        say(f"--- {name}, {space} @ {ratio}: {err}")
        return {**row, "error": str(err)}
    report, plan = result.report, result.plan
    acc = report["accuracy"]
    delta = 100 * (acc["test_merged"] - acc["test_before"])
    bench = median_bench(model, result.model, plan, args.threads, args.repeats)
    row.update({
        "seconds": round(time.perf_counter() - began, 1),
        "kept_activations": len(plan.activations),
        "blocks": len(plan.boundaries) - 1, "pruned": list(plan.pruned),
        "budget_ms": report["budget_ms"], "predicted_latency_ms": report["predicted_latency_ms"],
        "table_original_ms": plan.original_latency_ms, "predicted_speedup": report["predicted_speedup"],
        "report_measured_speedup": report["measured_speedup"], "kept_original": report["kept_original"],
        "measured_speedup": bench["speedup"], "measured_speedups": bench["speedups"],
        "measured_original_ms": bench["original_ms"], "measured_compressed_ms": bench["compressed_ms"],
        "test_before": 100 * acc["test_before"], "test_merged": 100 * acc["test_merged"], "delta_points": delta,
        "within_target": bool(delta >= -TARGET_DROP_POINTS),
        "max_rel_error": report["export"]["verification"]["max_rel_error"],
        "latency_table": report["latency_table"],
    })
    say(f"--- {name}, {space} @ {ratio}: {row['kept_activations']} activations, {row['blocks']} blocks, pruned "
        f"{row['pruned']}, predicted {row['predicted_speedup']:.2f}x, measured {row['measured_speedup']:.2f}x, test "
        f"{row['test_before']:.2f}% -> {row['test_merged']:.2f}% ({row['seconds']:.0f} s)")
    return row


def markdown(rows: List[Dict[str, Any]], activations: Dict[str, int]) -> str:
    """One side-by-side table per model (both search spaces at each budget), then the verdict per model."""
    head = ["budget ratio", "search space", "kept act.", "blocks", "pruned convs", "predicted",
            "measured b=1 (median; each bench)", "original → merged ms", "test acc before → after", "Δ points",
            "within 1 point"]
    out: List[str] = []
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = sorted((r for r in rows if r["model"] == name), key=lambda r: (-r["ratio"], r["space"] == "pruned"))
        table = common.Table(head, show=False)
        for r in mine:
            if "error" in r:
                table.row([f"{r['ratio']:.2f}", r["space"], *["-"] * 3, f"infeasible: {r['error'][:80]}", *["-"] * 5])
                continue
            cells = [f"{r['ratio']:.2f}", r["space"], str(r["kept_activations"]), str(r["blocks"]),
                     f"{len(r['pruned'])}" + (f" ({' '.join(map(str, r['pruned']))})" if r["pruned"] else ""),
                     f"{r['predicted_speedup']:.2f}x",
                     f"{r['measured_speedup']:.2f}x ({', '.join(f'{m:.2f}' for m in r['measured_speedups'])})",
                     f"{r['measured_original_ms']:.3f} → {r['measured_compressed_ms']:.3f}",
                     f"{r['test_before']:.2f}% → {r['test_merged']:.2f}%", f"{r['delta_points']:+.2f}",
                     "yes" if r["within_target"] else "no"]
            table.row(cells)
        out += [f"### {MODELS[name]} ({activations[name]} removable activations)", "", table.text()]
        for space in SPACES.values():
            within = [r for r in mine if r["space"] == space and r.get("within_target")]
            best = max(within, key=lambda r: r["measured_speedup"], default=None)
            out.append(f"- {space}: " + (f"highest measured speed-up within {TARGET_DROP_POINTS:g} point: "
                                         f"{best['measured_speedup']:.2f}x at budget {best['ratio']:.2f} "
                                         f"({best['delta_points']:+.2f} points)" if best else
                                         f"no run within {TARGET_DROP_POINTS:g} point"))
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = common.parser(__doc__, "bench_pruning_digits", threads=1)
    parser.add_argument("--models", default="mobilenet_v2,resnet", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--train-epochs", type=int, default=8, help="epochs of each original digits model")
    parser.add_argument("--ratios", default="0.9,0.7,0.5,0.4,0.3")
    parser.add_argument("--epochs", type=int, default=8, help="fine-tuning epochs of each compressed model")
    parser.add_argument("--distill", type=float, default=0.3)
    parser.add_argument("--importance-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3,
                        help="benches of each result at batch 1 after compress; the median is recorded")
    parser.add_argument("--stage", choices=("importance", "all"), default="all",
                        help="importance: stop once the importance tables are measured")
    # --threads defaults to 1 here: a 32x32 model's convs take microseconds, and waking a second thread per op
    # costs as much
    args = common.parse(parser, QUICK)
    out = Path(args.out_dir)
    record = common.Record(args)
    say = run_log(out)

    say(f"args {vars(args)}")
    data = load_data("digits", INPUT_SHAPE[2:])
    ratios = [float(r) for r in args.ratios.split(",")]
    results_path = out / "results.json"
    rows: List[Dict[str, Any]] = json.loads(results_path.read_text()) if results_path.exists() else []
    activations: Dict[str, int] = {}
    for name in args.models.split(","):
        model_dir = out / name
        model_dir.mkdir(exist_ok=True)
        model = trained(name, model_dir, data, args.train_epochs, args.seed, say)
        activations[name] = len(trace_model(model, INPUT_SHAPE, spec=MODELS[name]).chain.activation_positions)
        table = pruned_importance(name, model, model_dir, data, args.importance_steps, say)
        if args.stage == "importance":
            continue
        for ratio in ratios:
            for prune in SPACES:
                done: Optional[Dict[str, Any]] = next((r for r in rows if (r["model"], r["space"], r["ratio"])
                                                       == (name, SPACES[prune], ratio)), None)
                if done is not None:  # a re-run after an interruption goes on where it stopped
                    continue
                row = run_one(name, model, data, table if prune else without_pruning(table), prune, ratio,
                              model_dir, args, say)
                row["load_average"] = common.load_average()
                rows.append(row)
                results_path.write_text(json.dumps(rows, indent=1))
                record.write(rows)
    if args.stage == "importance":
        say(f"record: {record.write(rows)}")
        return
    text = (f"ONNX Runtime CPU, {args.threads} thread(s), batch 1, OMP_NUM_THREADS="
            f"{record.machine['omp_num_threads']}\n\n" + markdown(rows, activations))
    (out / "results.md").write_text(text)
    say("\n" + text)
    say(f"record: {record.write(rows)}")


if __name__ == "__main__":
    main()
