"""Rank correlation between proxy and finetune importance on the digits MobileNetV2.

Trains ``dpcompress.zoo:digits_mobilenet_v2`` (or ``--model``) on the built-in digits data (seeded), then
measures importance with ``--method proxy`` and ``--method finetune`` on every allowed
segment and reports Spearman's rank correlation between the two (over all segments, and over
the segments that remove at least one activation, since the base segments are ~0 in both).
Outputs (resumable) go to ``--out-dir``; the summary is printed last and is the record's result.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_importance.py --steps 20
    .venv/bin/python benchmarks/bench_importance.py --quick   # the tiny model, 1 epoch, 1 step per segment
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import common
import numpy as np
from digits_model import SPEC, trained_digits_model

from dpcompress.models import build_model
from dpcompress.training.data import load_data
from dpcompress.search.importance import ImportanceSettings, allowed_segments, base_segments, compute_importance
from dpcompress.graph.trace import trace_model
from dpcompress.training.train import evaluate

QUICK = {"model": "dpcompress.zoo:tiny_mobilenet_v2", "epochs": 1, "steps": 1}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho: Pearson correlation of the ranks (ties get their mean rank)."""
    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for value in np.unique(x):  # average the ranks of ties
            tied = x == value
            r[tied] = r[tied].mean()
        return r

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def main() -> None:
    parser = common.parser(__doc__, "bench_importance")
    parser.add_argument("--model", default=SPEC, help="a digits model's spec (10 classes, 32x32 input)")
    parser.add_argument("--epochs", type=int, default=8, help="Training epochs of the digits model.")
    parser.add_argument("--steps", type=int, default=20, help="Fine-tuning steps per segment.")
    parser.add_argument("--lr", type=float, default=0.01)
    args = common.parse(parser, QUICK)
    out = Path(args.out_dir)
    record = common.Record(args)
    data = load_data("digits", (32, 32))
    weights = out / f"{args.model.split(':')[-1]}.pt"
    model, _ = trained_digits_model(weights, data.train, args.epochs, functools.partial(build_model, args.model),
                                    seed=args.seed)
    traced = trace_model(model, (1, 3, 32, 32), spec=args.model)
    summary = {"model": args.model, "num_positions": traced.chain.num_positions,
               "segments": len(allowed_segments(traced.chain)),
               "holdout_acc": evaluate(model, data.holdout), "test_acc": evaluate(model, data.test)}
    tables = {}
    for method in ("proxy", "finetune"):
        began = time.perf_counter()
        settings = ImportanceSettings(method=method, steps=args.steps, lr=args.lr)
        rows = compute_importance(traced, settings, out / f"{method}.csv", data=data, model_spec=args.model)
        summary[f"{method}_seconds"] = round(time.perf_counter() - began, 1)
        tables[method] = {(r["start"], r["end"]): r["importance"] for r in rows}
    segments = sorted(tables["proxy"])
    removing = sorted(set(segments) - set(base_segments(traced.chain, segments)))
    for name, subset in (("all", segments), ("removing", removing)):
        proxy = np.array([tables["proxy"][s] for s in subset])
        finetune = np.array([tables["finetune"][s] for s in subset])
        summary[f"spearman_{name}"] = round(spearman(proxy, finetune), 4)
        summary[f"n_{name}"] = len(subset)
    print(json.dumps(summary, indent=2))
    print(f"record: {record.write(summary)}")


if __name__ == "__main__":
    main()
