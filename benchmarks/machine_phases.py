"""Is a slow spell the process's or the machine's, and which networks does it slow? (issue 15)

``lockstep``: ``--processes`` fresh processes each build the same network and are timed one after
another in short rounds (round-robin over pipes, never two at once). If the slow state belonged to a
process, some processes would stay slower than others round after round; if it belongs to the
machine at that moment, every process moves with it: the median ratio of the slowest to the fastest
process in a round stays near 1 while the round means swing.

``speedup``: the original network and a plan's merged network, alternating 10-run rounds in one
process for ``--seconds``; prints per 10 s window both medians and the speed-up, and the speed-up
in rounds where the original ran within ``timing.QUIET_MARGIN`` of its fastest tenth (quiet) and
above that (loaded).

    .venv/bin/python benchmarks/machine_phases.py lockstep --backend onnxruntime --processes 4 --rounds 40
    .venv/bin/python benchmarks/machine_phases.py speedup --backend openvino --plan plan_0.5.json --seconds 90
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time

SHAPE = (1, 3, 224, 224)


def _serve(conn, backend_name: str, model: str, threads: int) -> None:
    """A lockstep child: build the network, then time a round whenever asked."""
    import torch

    from dpcompress.backends import get_backend
    from dpcompress.models import build_model

    torch.manual_seed(0)
    runner = get_backend(backend_name, threads=threads).prepare(build_model(model).eval(), SHAPE)
    runner.time(10, 10)
    conn.send("ready")
    while (runs := conn.recv()) is not None:
        conn.send(statistics.median(runner.time(2, runs)))


def lockstep(args: argparse.Namespace) -> None:
    context = multiprocessing.get_context("spawn")
    pipes, children = [], []
    for _ in range(args.processes):
        ours, theirs = context.Pipe()
        child = context.Process(target=_serve, args=(theirs, args.backend, args.model, args.threads))
        child.start()
        pipes.append(ours)
        children.append(child)
    for pipe in pipes:
        pipe.recv()
    medians = [[] for _ in pipes]
    for _ in range(args.rounds):
        for pipe, collected in zip(pipes, medians):
            pipe.send(20)
            collected.append(pipe.recv())
    for pipe in pipes:
        pipe.send(None)
    for child in children:
        child.join()
    per_round = list(zip(*medians))
    print(f"{args.model} on {args.backend}, {args.processes} processes in lockstep, {args.rounds} rounds of 20 runs; "
          f"load {os.getloadavg()[0]:.2f}")
    print("  per process, median ms: " + " ".join(f"{statistics.median(m):.2f}" for m in medians))
    print(f"  slowest over fastest process in a round (median over rounds): "
          f"{statistics.median(max(r) / min(r) for r in per_round):.3f}")
    step = max(1, args.rounds // 20)
    print("  round means over time (ms): " + " ".join(f"{statistics.mean(r):.2f}" for r in per_round[::step]))


def speedup(args: argparse.Namespace) -> None:
    import torch

    from dpcompress.backends import get_backend
    from dpcompress.graph.rewrite import merged_model
    from dpcompress.latency.timing import quiet_rounds
    from dpcompress.pipeline import traced_from_spec
    from dpcompress.graph.plan import load_plan

    torch.manual_seed(0)
    _, traced, _ = traced_from_spec(args.model, None, SHAPE, None)
    original, merged = get_backend(args.backend, threads=args.threads).prepare_all(
        [traced.model, merged_model(traced, load_plan(args.plan))], SHAPE, "fp32")
    original.time(10, 10)
    merged.time(10, 10)
    rounds = []
    began = time.time()
    while time.time() - began < args.seconds:
        rounds.append((time.time() - began, statistics.median(original.time(1, 10)),
                       statistics.median(merged.time(1, 10))))
    print(f"{args.model} on {args.backend}, plan {args.plan}: {len(rounds)} rounds; load {os.getloadavg()[0]:.2f}")
    for window in range(0, int(args.seconds), 10):
        inside = [r for r in rounds if window <= r[0] < window + 10]
        if inside:
            print(f"  {window:3d}-{window + 10:3d} s: original {statistics.median(r[1] for r in inside):.2f} ms, "
                  f"merged {statistics.median(r[2] for r in inside):.2f} ms, "
                  f"speed-up {statistics.median(r[1] / r[2] for r in inside):.2f}x")
    quiet = quiet_rounds([r[1] for r in rounds])
    for label, wanted in (("quiet", True), ("loaded", False)):
        chosen = [r for r, q in zip(rounds, quiet) if q == wanted]
        if chosen:
            print(f"  {label} rounds ({len(chosen)}): original {statistics.median(r[1] for r in chosen):.2f} ms, "
                  f"merged {statistics.median(r[2] for r in chosen):.2f} ms, "
                  f"speed-up {statistics.median(r[1] / r[2] for r in chosen):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=("lockstep", "speedup"))
    parser.add_argument("--model", default="torchvision:mobilenet_v2")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--plan", help="speedup: the plan whose merged network to time against the original.")
    parser.add_argument("--seconds", type=float, default=90.0)
    args = parser.parse_args()
    if args.mode == "speedup" and not args.plan:
        parser.error("speedup needs --plan")
    (lockstep if args.mode == "lockstep" else speedup)(args)


if __name__ == "__main__":
    main()
