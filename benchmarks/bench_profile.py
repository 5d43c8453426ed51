"""Wall time to profile the full mobilenet_v2 latency table on the CPU with ONNX Runtime.

Target: under 3 minutes on the 2-core development machine. Run:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_profile.py [--warmup 10 --iters 50 --out DIR]
Prints the load average before and after, so a figure taken under load is recognisable.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from dpcompress.backends import get_backend
from dpcompress.latency.profile import profile_table
from dpcompress.graph.trace import chain_for_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="torchvision:mobilenet_v2")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="folder for the table (default: a temporary one)")
    args = parser.parse_args()

    load_before = os.getloadavg()
    started = time.perf_counter()
    chain = chain_for_spec(args.model, (1, 3, 224, 224))
    traced = time.perf_counter()
    backend = get_backend("onnxruntime", threads=args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(args.out or tmp, "table.csv")
        result = profile_table(chain, backend, out, model_spec=args.model, warmup=args.warmup, iters=args.iters,
                               overwrite=True)
    finished = time.perf_counter()
    print(json.dumps({
        "model": args.model, "backend": backend.describe(), "warmup": args.warmup, "iters": args.iters,
        "blocks": len(result.rows), "unique_shapes": result.meta["unique_shapes"],
        "timed_shapes": result.timed_shapes, "bounded_blocks": result.meta["bounded_blocks"],
        "trace_s": round(traced - started, 1), "profile_s": round(finished - traced, 1),
        "total_s": round(finished - started, 1),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }, indent=2))


if __name__ == "__main__":
    main()
