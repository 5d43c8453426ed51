"""End-to-end `compress` on the digits MobileNetV2: accuracy and measured CPU speed-up per budget.

Trains ``dpcompress.zoo:digits_mobilenet_v2`` (or ``--model``) on the digits data (seeded), then runs the
library's :func:`dpcompress.compress` for every importance method x budget ratio (table latency, ONNX
Runtime CPU, batch 1), closed loop on. Each result is then benched ``--repeats`` times (alternating with
the original) and the median speed-up recorded. One latency table is profiled by the first run
and reused by the others (``tables_dir``); each method's importance table is measured once and
copied into the later runs' folders, where ``compute_importance`` resumes from it (it checks
model, weights, data and settings, and re-measures if anything differs). Prints and writes a
markdown table (``--out-dir``/results.md) and the JSON record (``--out``). Optionally benches
every compressed model again at a larger batch (``--extra-batch N``).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_compress_digits.py
    .venv/bin/python benchmarks/bench_compress_digits.py --quick   # the tiny model, proxy at 0.7, 1+1 epochs

Model files and run folders go to ``--out-dir`` (default out/bench_compress_digits, ignored by git). Where the
closed loop keeps the original network (no candidate measured within the budget), nothing is fine-tuned: the
row's accuracy is the original network's, and its ``accuracy_of`` says so.
"""

from __future__ import annotations

import functools
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List

import common
from digits_model import SPEC, run_log, trained_digits_model

import dpcompress
from dpcompress.backends import choose_backend
from dpcompress.latency.bench import bench_modules
from dpcompress.models import build_model
from dpcompress.training.data import DataBundle, load_data
from dpcompress.training.train import evaluate

INPUT_SHAPE = (1, 3, 32, 32)
TARGET_SPEEDUP = 1.3
TARGET_DROP_POINTS = 1.0
QUICK = {"model": "dpcompress.zoo:tiny_mobilenet_v2", "methods": "proxy", "ratios": "0.7", "train_epochs": 1,
         "epochs": 1, "importance_steps": 2, "repeats": 1}


def train_model(spec: str, out: Path, data: DataBundle, epochs: int, seed: int, say: Any) -> Any:
    """The digits model ``spec`` names, trained (or reloaded from ``out``) and in eval mode."""
    weights = out / f"{spec.split(':')[-1]}.pt"
    began = time.perf_counter()
    model, trained = trained_digits_model(weights, data.train, epochs, functools.partial(build_model, spec), seed=seed)
    say(f"trained {epochs} epochs in {time.perf_counter() - began:.0f} s -> {weights}" if trained
        else f"reusing trained weights {weights}")
    say(f"original: holdout {100 * evaluate(model, data.holdout):.2f}%, test {100 * evaluate(model, data.test):.2f}%")
    return model


def median_bench(model: Any, merged: Any, plan: Any, batch: int, threads: int, repeats: int = 1) -> Dict[str, Any]:
    """Measured ONNX Runtime speed-up of ``merged`` over ``model`` at batch ``batch``: the median of ``repeats``
    alternating benches, and each of them."""
    backend, _ = choose_backend(None, threads=threads)
    shape = (batch, *INPUT_SHAPE[1:])
    original = common.rebuilt_original(model, shape)
    results = [bench_modules(backend, original, merged, input_shape=shape, plan=plan) for _ in range(repeats)]
    middle = sorted(results, key=lambda r: r.measured_speedup)[len(results) // 2]
    return {"original_ms": middle.original.median_ms, "compressed_ms": middle.compressed.median_ms,
            "speedup": middle.measured_speedup, "speedups": [r.measured_speedup for r in results]}


def result_row(method: str, ratio: float, seconds: float, report: Dict[str, Any]) -> Dict[str, Any]:
    """The row of one run from compress's report. Where the closed loop kept the original network nothing was
    fine-tuned: the accuracy after is the original's (its merged form: the plan that merges nothing), said so in
    ``accuracy_of``, and there is no reference network's figure (``test_after_reference`` None)."""
    acc = report["accuracy"]
    kept = bool(report["kept_original"])
    delta = 100 * (acc["test_merged"] - acc["test_before"])
    return {
        "method": method, "ratio": ratio, "seconds": round(seconds, 1),
        "kept_activations": len(report["plan"]["activations"]),
        "blocks": len(report["plan"]["boundaries"]) - 1,
        "table_original_ms": report["plan"]["original_latency_ms"],
        "predicted_latency_ms": report["predicted_latency_ms"],
        "predicted_speedup": report["predicted_speedup"],
        "predicted_speedup_measured_rest": report["bench"].get("predicted_speedup_measured_rest"),
        "report_measured_speedup": report["measured_speedup"],
        "kept_original": kept,
        "accuracy_of": "the original network (the closed loop kept it; nothing fine-tuned)" if kept
        else "the compressed network (fine-tuned, merged)",
        "test_before": 100 * acc["test_before"],
        "test_after_reference": None if kept else 100 * acc["test_after"],
        "test_merged": 100 * acc["test_merged"], "delta_points": delta,
        "max_rel_error": report["export"]["verification"]["max_rel_error"],
        "latency_table": report["latency_table"],
    }


def copy_table(source: Path, target: Path) -> None:
    """Copy an importance table and its meta (``source``.csv/.meta.json), where they exist."""
    for suffix in (".csv", ".meta.json"):
        if source.with_name(source.name + suffix).exists():
            shutil.copyfile(source.with_name(source.name + suffix), target.with_name(target.name + suffix))


def markdown(rows: List[Dict[str, Any]], extra_batch: int) -> str:
    head = ["method", "budget ratio", "kept act.", "blocks", "predicted", "predicted, measured rest",
            "measured b=1 (median; each bench)", "original → merged ms (b=1)"]
    if extra_batch:
        head.append(f"measured b={extra_batch}")
    head += ["test acc before", "test acc after (merged)", "Δ points", "target"]
    table = common.Table(head, show=False)
    for r in rows:
        measured_rest = r["predicted_speedup_measured_rest"]
        cells = [r["method"], f"{r['ratio']:.1f}", str(r["kept_activations"]), str(r["blocks"]),
                 f"{r['predicted_speedup']:.2f}x", f"{measured_rest:.2f}x" if measured_rest is not None else "-",
                 f"{r['measured_speedup']:.2f}x ({', '.join(f'{m:.2f}' for m in r['measured_speedups'])})",
                 f"{r['measured_original_ms']:.3f} → {r['measured_compressed_ms']:.3f}"]
        if extra_batch:
            extra = r.get("extra_batch")
            cells.append(f"{extra['speedup']:.2f}x" if extra else "-")
        kept = " (the original, kept by the closed loop)" if r["kept_original"] else ""
        cells += [f"{r['test_before']:.2f}%", f"{r['test_merged']:.2f}%{kept}", f"{r['delta_points']:+.2f}",
                  "yes" if r["target_met"] else "no"]
        table.row(cells)
    return table.text()


def main() -> None:
    parser = common.parser(__doc__, "bench_compress_digits", threads=1)
    parser.add_argument("--model", default=SPEC, help="a digits model's spec (10 classes, 32x32 input)")
    parser.add_argument("--train-epochs", type=int, default=8, help="epochs of the original digits model")
    parser.add_argument("--methods", default="uniform,proxy,finetune")
    parser.add_argument("--ratios", default="0.9,0.7,0.5")
    parser.add_argument("--epochs", type=int, default=8, help="fine-tuning epochs of each compressed model")
    parser.add_argument("--distill", type=float, default=0.3)
    parser.add_argument("--importance-steps", type=int, default=20)
    parser.add_argument("--extra-batch", type=int, default=0, help="also bench each result at this batch size")
    parser.add_argument("--repeats", type=int, default=3,
                        help="benches of each result at batch 1 after compress; the median is recorded")
    parser.add_argument("--seed-importance", default=None,
                        help="folder with <method>.csv/.meta.json importance tables to start from "
                             "(used only where model, weights, data and settings match)")
    # --threads defaults to 1 here: a 32x32 model's convs take microseconds, and waking a second thread per op
    # costs as much
    args = common.parse(parser, QUICK)
    out = Path(args.out_dir)
    record = common.Record(args)
    say = run_log(out)

    data = load_data("digits", INPUT_SHAPE[2:])
    model = train_model(args.model, out, data, args.train_epochs, args.seed, say)
    methods = args.methods.split(",")
    ratios = [float(r) for r in args.ratios.split(",")]
    cache = out / "importance"
    cache.mkdir(exist_ok=True)
    if args.seed_importance:
        for method in methods:
            if not (cache / f"{method}.csv").exists():
                copy_table(Path(args.seed_importance) / method, cache / method)
    table_dir = None  # the folder of the first run, which profiles the latency table
    rows: List[Dict[str, Any]] = []
    for method in methods:
        for ratio in ratios:
            run_dir = out / f"{method}_{ratio:.1f}"
            run_dir.mkdir(exist_ok=True)
            if method != "uniform":
                copy_table(cache / method, run_dir / "importance")
            say(f"=== {method} @ {ratio} -> {run_dir}")
            began = time.perf_counter()
            result = dpcompress.compress(
                model, INPUT_SHAPE, budget_ratio=ratio, data=data, importance=method, out_dir=run_dir,
                importance_steps=args.importance_steps, epochs=args.epochs, distill=args.distill,
                threads=args.threads,
                # the first run finds no table in an empty folder and profiles one into its out_dir
                tables_dir=str(table_dir if table_dir is not None else out / "no_tables"))
            report = result.report
            if table_dir is None:
                table_dir = Path(report["latency_table"]).parent
            if method != "uniform":
                copy_table(run_dir / "importance", cache / method)
            row = result_row(method, ratio, time.perf_counter() - began, report)
            repeated = median_bench(model, result.model, result.plan, 1, args.threads, args.repeats)
            row.update(measured_speedup=repeated["speedup"], measured_speedups=repeated["speedups"],
                       measured_original_ms=repeated["original_ms"], measured_compressed_ms=repeated["compressed_ms"])
            row["target_met"] = bool(row["delta_points"] >= -TARGET_DROP_POINTS
                                     and row["measured_speedup"] >= TARGET_SPEEDUP)
            if args.extra_batch:
                row["extra_batch"] = median_bench(model, result.model, result.plan, args.extra_batch, args.threads)
            rows.append(row)
            say(f"--- {method} @ {ratio}: {row['kept_activations']} activations, predicted "
                f"{row['predicted_speedup']:.2f}x, measured {row['measured_speedup']:.2f}x, test "
                f"{row['test_before']:.2f}% -> {row['test_merged']:.2f}% ({row['seconds']:.0f} s)"
                + (" (the original network, kept by the closed loop)" if row["kept_original"] else ""))
            record.write(rows)
    table = markdown(rows, args.extra_batch)
    met = [r for r in rows if r["target_met"]]
    verdict = (f"target (test accuracy within {TARGET_DROP_POINTS:g} point of the original at measured CPU "
               f"speed-up >= {TARGET_SPEEDUP}x): "
               + (f"met by {len(met)} of {len(rows)} runs ("
                  + ", ".join(f"{r['method']}@{r['ratio']}" for r in met) + ")" if met else
                  f"not met by any of {len(rows)} runs"))
    (out / "results.md").write_text(f"ONNX Runtime CPU, {args.threads} thread(s)\n\n" + table + "\n" + verdict + "\n")
    say("\n" + table)
    say(verdict)
    say(f"record: {record.write(rows)}")


if __name__ == "__main__":
    main()
