"""Wall time to profile the full mobilenet_v2 latency table on the CPU with ONNX Runtime (or ``--backend``).

Target: under 3 minutes on the 2-core development machine. Run:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_profile.py [--warmup 10 --iters 50 --out-dir DIR]
    .venv/bin/python benchmarks/bench_profile.py --quick   # the tiny model at 32x32, 2 warm-up runs, 5 timed
The record has the load average before and after, so a figure taken under load is recognisable. The table
is made again each run (``--out-dir``/table.csv).
"""

from __future__ import annotations

import json
import os
import time

import common
import torch

from dpcompress.backends import get_backend
from dpcompress.graph.trace import chain_for_spec
from dpcompress.latency.profile import profile_table

QUICK = {"model": common.QUICK_SPEC, "size": common.QUICK_SIZE, "warmup": 2, "iters": 5}


def main() -> None:
    parser = common.parser(__doc__, "bench_profile", backend=True)
    parser.add_argument("--model", default="torchvision:mobilenet_v2")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    args = common.parse(parser, QUICK)

    record = common.Record(args)
    torch.manual_seed(args.seed)  # the model's weights (the latencies do not depend on them)
    started = time.perf_counter()
    chain = chain_for_spec(args.model, (1, 3, args.size, args.size))
    traced = time.perf_counter()
    backend = get_backend(args.backend, threads=args.threads)
    result = profile_table(chain, backend, os.path.join(args.out_dir, "table.csv"), model_spec=args.model,
                           warmup=args.warmup, iters=args.iters, overwrite=True)
    finished = time.perf_counter()
    summary = {
        "model": args.model, "backend": backend.describe(), "warmup": args.warmup, "iters": args.iters,
        "blocks": len(result.rows), "unique_shapes": result.meta["unique_shapes"],
        "timed_shapes": result.timed_shapes, "bounded_blocks": result.meta["bounded_blocks"],
        "trace_s": round(traced - started, 1), "profile_s": round(finished - traced, 1),
        "total_s": round(finished - started, 1),
    }
    print(json.dumps(summary, indent=2))
    print(f"record: {record.write(summary)}")


if __name__ == "__main__":
    main()
