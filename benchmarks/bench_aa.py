"""A/A: the bench on two identical networks must measure 1.00x, and say so (issue 33).

For each model, input size and runtime: ``--benches`` benches (``dpcompress.latency.bench.bench_modules``, its
defaults) of the original rebuilt as a plan's network is (``unchanged_network``) against itself rebuilt again:
what every bench of a plan compares with. Prints, per model and runtime, how many of the benches' 95% intervals
hold 1.00 and the range of their speed-ups. With ``--pair given``, the original is the model as given instead
(the path benches took before issue 33), against its rebuilt copy.

Usage: .venv/bin/python benchmarks/bench_aa.py [--models mobilenet_v2@224,shufflenet_v2_x1_0@64,regnet_y_400mf@64]
           [--backends onnxruntime,openvino] [--benches 20] [--pair rebuilt|given]
       .venv/bin/python benchmarks/bench_aa.py --quick   # tiny model at 32x32, 2 benches, ONNX Runtime
"""

from __future__ import annotations

import statistics

import common  # benchmarks/ is the script's folder

from dpcompress.backends import get_backend
from dpcompress.graph.rewrite import unchanged_network
from dpcompress.latency.bench import bench_modules

QUICK = {"models": f"{common.QUICK_SPEC}@{common.QUICK_SIZE}", "backends": "onnxruntime", "benches": 2}


def main() -> None:
    parser = common.parser(__doc__, "bench_aa")
    parser.add_argument("--models", default="mobilenet_v2@224,shufflenet_v2_x1_0@64,regnet_y_400mf@64",
                        help="NAME@SIZE, comma-separated (a torchvision name or a full spec)")
    parser.add_argument("--backends", default=",".join(common.BACKENDS))
    parser.add_argument("--benches", type=int, default=20)
    parser.add_argument("--pair", default="rebuilt", choices=("rebuilt", "given"),
                        help="rebuilt: the original rebuilt against itself rebuilt; given: the model as given "
                             "against its rebuilt copy")
    args = common.parse(parser, QUICK)
    record = common.Record(args)
    table = common.Table(["model", "input", "runtime", "benches", "interval holds 1.00", "median speed-up",
                          "speed-ups (min-max)", "interval half-width (median)"])
    results = []
    for item in args.models.split(","):
        name, size = item.rsplit("@", 1)
        shape = (1, 3, int(size), int(size))
        model, traced = common.seeded_traced(common.model_spec(name), shape, args.seed)
        rebuilt = unchanged_network(traced)
        first = model if args.pair == "given" else rebuilt
        for backend_name in args.backends.split(","):
            backend = get_backend(backend_name, threads=args.threads)
            benches = []
            for _ in range(args.benches):
                bench = bench_modules(backend, first, rebuilt, input_shape=shape)
                low, high = bench.measured_speedup_interval
                benches.append({"speedup": bench.measured_speedup, "interval": [low, high],
                                "holds_one": low <= 1.0 <= high, "session_speedups": bench.session_speedups,
                                "original_ms": bench.original.median_ms, "quiet_rounds": bench.quiet_rounds,
                                "rounds": bench.rounds})
            speedups = [b["speedup"] for b in benches]
            widths = [(b["interval"][1] - b["interval"][0]) / 2 for b in benches]
            summary = {"model": name, "size": int(size), "backend": backend_name, "pair": args.pair,
                       "benches": benches, "holds_one": sum(b["holds_one"] for b in benches),
                       "median": statistics.median(speedups), "min": min(speedups), "max": max(speedups),
                       "median_half_width": statistics.median(widths)}
            results.append(summary)
            table.row([name, size, backend_name, len(benches), f"{summary['holds_one']} of {len(benches)}",
                       f"{summary['median']:.3f}x", f"{summary['min']:.3f}-{summary['max']:.3f}x",
                       f"{summary['median_half_width']:.3f}"])
            record.write(results)
    print(f"record: {record.write(results)}")


if __name__ == "__main__":
    main()
