"""`compress` with the closed loop, per model and budget: is the budget met as measured?

For each model and budget ratio, runs :func:`dpcompress.compress` (no data: uniform importance,
no fine-tuning; ONNX Runtime CPU, or ``--backend``) with the closed loop on, ``--repeats`` times, reusing
an in-network latency table found under ``--tables-dirs`` (else profiling one into the run's folder), in
LayerMerge's space where the model has reducible convs (compress's default). Records per run: the
candidates benched and in how many steps, which one was kept (or the original), and the final bench's
measured speed-up with its interval against the budget's (1 / ratio). Targets (issues 11 and 32): every
run within the budget with 2% allowance for noise, never a measured slowdown, never the original where a
plan measured faster.

Usage: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_closed_loop.py \
    --models mobilenet_v2,resnet18 [--ratios 0.9,0.7,0.5] [--batch-size 1] [--repeats 3]
       .venv/bin/python benchmarks/bench_closed_loop.py --quick   # tiny model at 32x32, one budget
"""

from __future__ import annotations

from pathlib import Path

import common

import dpcompress
from dpcompress.backends import get_backend
from dpcompress.latency.profile import default_timing
from dpcompress.pipeline import find_table

ALLOWANCE = 0.02
QUICK = {"models": common.QUICK_SPEC, "size": common.QUICK_SIZE, "ratios": "0.7"}


def main() -> None:
    parser = common.parser(__doc__, "bench_closed_loop", backend=True)
    parser.add_argument("--models", default="mobilenet_v2")
    parser.add_argument("--ratios", default="0.9,0.7,0.5")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="compress runs per model and budget")
    parser.add_argument("--tables-dirs", default="latency_tables,out/bench_prediction",
                        help="folders searched, in order, for a matching table")
    args = common.parse(parser, QUICK)

    out = Path(args.out_dir)
    record = common.Record(args)
    shape = (args.batch_size, 3, args.size, args.size)
    print(f"# input {shape}")
    rows = common.Table(["model", "budget ratio", "run", "candidates benched (steps)", "kept", "pruned", "predicted",
                         "measured (final bench, 95% interval)", "verdict"])
    records = []
    backend = get_backend(args.backend, threads=args.threads)
    for name in args.models.split(","):
        spec = common.model_spec(name)
        model, traced = common.seeded_traced(spec, shape, args.seed)
        found = None
        for folder in args.tables_dirs.split(","):
            if Path(folder).is_dir():
                found = found or find_table(Path(folder), traced.chain.fingerprint(), backend.name, "fp32",
                                            args.batch_size, args.threads, default_timing(backend, traced))
        for ratio in (float(r) for r in args.ratios.split(",")):
            for repeat in range(args.repeats):
                run_dir = out / f"{name.split(':')[-1]}_{args.size}_b{args.batch_size}_{ratio:g}_{repeat}"
                tables_dir = str(found.parent) if found else str(run_dir / "no_tables")
                try:
                    report = dpcompress.compress(model, shape, budget_ratio=ratio, importance="uniform",
                                                 backend=backend, out_dir=run_dir, progress=False,
                                                 tables_dir=tables_dir).report
                except Exception as err:  # an infeasible budget is a finding, not a crash of the benchmark
                    rows.row([name, f"{ratio:g}", repeat, "-", "-", "-", "-", "-", f"{type(err).__name__}: {err}"])
                    continue
                records.append(run_record(spec, ratio, shape, report))
                rows.row(run_row(name, ratio, repeat, report, records[-1]))
                record.write(records)
    print(f"record: {record.write(records)}")


def run_record(spec: str, ratio: float, shape, report) -> dict:
    loop, measured = report["closed_loop"], report["measured_speedup"]
    within = measured >= (1 - ALLOWANCE) / ratio
    return {"model": spec, "ratio": ratio, "input_shape": list(shape), "kept_original": report["kept_original"],
            "met_budget": loop["met_budget"], "steps": loop["steps"], "reason": loop["reason"],
            "candidates": loop["candidates"], "pruned": report["plan"]["pruned"],
            "latency_table": report["latency_table"], "predicted_speedup": report["predicted_speedup"],
            "measured_speedup": measured, "measured_speedup_interval": report["measured_speedup_interval"],
            "within": within, "slower": measured < 1}


def run_row(name: str, ratio: float, repeat: int, report, run) -> list:
    loop = report["closed_loop"]
    if report["kept_original"]:
        verdict = "kept the original: no plan measured faster"
    else:
        verdict = ("SLOWER than the original" if run["slower"] else "within" if run["within"] else
                   f"missed the budget's {1 / ratio:.2f}x")
    kept = ("original" if report["kept_original"] else
            f"#{1 + next(i for i, c in enumerate(loop['candidates']) if c['chosen'])}")
    low, high = run["measured_speedup_interval"]
    return [name, f"{ratio:g}", repeat, f"{len(loop['candidates'])} ({loop['steps']})", kept, len(run["pruned"]),
            f"{report['predicted_speedup']:.2f}x", f"{run['measured_speedup']:.2f}x ({low:.2f}-{high:.2f}x)", verdict]


if __name__ == "__main__":
    main()
