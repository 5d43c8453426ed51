"""Sweep of a model zoo: trace, profile, solve, export --verify and bench each model (issue 12).

Every model runs in a fresh subprocess, so that its peak memory is its own (``os.wait4``
gives the child's maximum resident set size) and a crash or a kill ends only that model.
Results are appended to a JSONL file (``--jsonl``), one line per model; models already in it are
skipped, so an interrupted sweep resumes where it stopped. The run's own lines are its JSON record's
results (``--out``). The sweeps behind the recorded figures are in benchmarks/records/.

Per model: convs, valid blocks (and those of two or more convs), barriers by kind, profile
time, peak memory, the smallest feasible latency as a fraction of the original (from the
table), the plan at a budget 30% of the way from that smallest latency to the original,
its predicted and measured speed-up, and the export's max relative error. Where nothing
can be merged, or no merge is faster than its convs, the line says why from the barrier
kinds.

    python benchmarks/sweep_zoo.py --jsonl benchmarks/records/sweep_64.jsonl     # every torchvision classifier, 64x64
    python benchmarks/sweep_zoo.py --size 224 --models resnet18,mobilenet_v2 --jsonl benchmarks/records/sweep_224.jsonl
    python benchmarks/sweep_zoo.py --models timm:resnet18,timm:efficientnet_b0 --jsonl sweep_timm.jsonl
    python benchmarks/sweep_zoo.py --quick   # the tiny model at 32x32, run again each time

A model is a torchvision name (``resnet18``) or any model spec (``timm:NAME``, ``file.py:factory``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List

import common

REPO = common.REPO
QUICK = {"models": common.QUICK_SPEC, "size": common.QUICK_SIZE, "redo": True, "timeout": 600}
BUDGET_FRACTION = 0.3  # of the way from the smallest achievable latency to the original
ALSO_READ = "position also read by "


def barrier_kind(reason: str) -> str:
    """A barrier's reason (graph/trace.py) without positions and module names: "MaxPool2d (maxpool)" ->
    "MaxPool2d", "a branch: this conv reads position 5" -> "branch"."""
    if reason.startswith("a branch"):
        return "branch"
    if reason.startswith(ALSO_READ):
        return "output also read by " + _op_name(reason[len(ALSO_READ):])
    return _op_name(reason)


def _op_name(text: str) -> str:
    return re.sub(r"\s*\(.*\)$", "", text).strip()


def torchvision_classifiers() -> List[str]:
    from dpcompress.tv_compat import import_torchvision

    torchvision = import_torchvision()
    return list(torchvision.models.list_models(module=torchvision.models))


# ---- one model, in its own process ----


def run_model(spec: str, size: int, threads: int, max_block_seconds: float, seed: int, work: Path,
              record: Dict[str, Any], save: Any) -> None:
    """Every stage for one model; ``record`` is filled (and ``save``d) as each stage ends."""
    import torch

    from dpcompress.backends import get_backend
    from dpcompress.export import export_plan
    from dpcompress.graph.rewrite import merge_reference, reference_model, unchanged_network
    from dpcompress.graph.trace import trace_model
    from dpcompress.latency.bench import bench_modules
    from dpcompress.latency.profile import profile_table
    from dpcompress.models import build_model
    from dpcompress.search.solver import frontier, solve_for_model
    from dpcompress.tables import read_latency_table

    torch.manual_seed(seed)
    shape = (1, 3, size, size)
    started = time.perf_counter()
    model = build_model(spec).eval()  # random weights: latency and exactness do not depend on them
    traced = trace_model(model, shape, spec=spec)
    chain = traced.chain
    blocks = chain.valid_blocks()
    barriers = collections.Counter(barrier_kind(u.barrier) for u in chain.units if u.barrier)
    record.update(stage="traced", trace_s=time.perf_counter() - started, convs=chain.num_positions,
                  removable_activations=len(chain.activation_positions), valid_blocks=len(blocks),
                  merge_blocks=sum(1 for s, e in blocks if e - s > 1), barriers=dict(barriers.most_common()),
                  parameters=sum(p.numel() for p in model.parameters()))
    save()
    if record["merge_blocks"] == 0:
        record.update(stage="done", why=why_nothing("nothing can be merged", barriers))
        return

    backend = get_backend("onnxruntime", threads=threads)
    table_path = work / "table.csv"
    started = time.perf_counter()
    result = profile_table(chain, backend, table_path, model_spec=spec, traced=traced,
                           max_block_seconds=max_block_seconds)
    record.update(stage="profiled", profile_s=time.perf_counter() - started, timed_shapes=result.timed_shapes,
                  unique_shapes=result.meta["unique_shapes"], bounded_blocks=result.meta["bounded_blocks"],
                  capped_blocks=len(result.meta.get("capped_blocks", [])), backend=backend.describe())
    save()

    table = read_latency_table(table_path)
    original = table.original_latency_ms()
    smallest = frontier(table, None, chain.activation_positions)[0][0]
    budget = smallest + BUDGET_FRACTION * (original - smallest)
    plan, _ = solve_for_model(table, None, budget, chain=chain)
    record.update(stage="solved", original_ms=original, smallest_ms=smallest, smallest_ratio=smallest / original,
                  budget_ms=budget, plan_ms=plan.latency_ms, predicted_speedup=original / plan.latency_ms,
                  plan_blocks=len(plan.blocks), merged_blocks=sum(1 for s, e in plan.blocks if e - s > 1),
                  kept_activations=len(plan.activations))
    if smallest >= original:
        record["why"] = why_nothing("no merge is faster than its convs", barriers)
    save()

    started = time.perf_counter()
    reference = reference_model(traced, plan).eval()
    merged = merge_reference(reference)
    report = export_plan(model, reference, merged, "onnx", work / "merged.onnx", shape, verify=True)
    assert report.verification is not None
    record.update(stage="exported", export_s=time.perf_counter() - started,
                  max_rel_error=report.verification.max_rel_error, verified=report.verification.passed)
    save()
    del reference  # bench needs the original and the merged network only, as `dpcompress bench` loads them

    # Sets go on until the speed-up is known to 1% (the machine is shared: one bench can wander).
    bench = bench_modules(backend, unchanged_network(traced), merged, input_shape=shape, plan=plan, until_ci=0.01,
                          max_rounds=100)
    record.update(stage="done", measured_speedup=bench.measured_speedup, bench_rounds=bench.rounds,
                  measured_speedup_interval=bench.measured_speedup_interval,
                  original_measured_ms=bench.original.median_ms,
                  compressed_measured_ms=bench.compressed.median_ms if bench.compressed else None)


def why_nothing(what: str, barriers: "collections.Counter[str]") -> str:
    kinds = ", ".join(f"{kind} x{count}" for kind, count in barriers.most_common())
    return f"{what}; barriers: {kinds or 'none'}"


def worker(args: argparse.Namespace) -> int:
    from dpcompress.errors import UserError

    result_path = Path(args.result)
    record: Dict[str, Any] = {"stage": "started"}

    def save() -> None:
        # The peak so far at the end of each stage shows which stage set the peak (ru_maxrss only grows).
        record.setdefault("peak_rss_mb_by_stage", {})[record["stage"]] = \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result_path.write_text(json.dumps(record))

    try:
        run_model(args.worker, args.size, args.threads, args.max_block_seconds, args.seed, Path(args.work_dir),
                  record, save)
        record["status"] = "ok"
    except UserError as err:
        record.update(status="error", error=str(err))
    except Exception as err:  # noqa: BLE001 - the sweep records any failure and goes on with the next model
        record.update(status="crashed", error=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                      traceback=traceback.format_exc()[-4000:])
    save()
    return 0


# ---- the sweep ----


def latest_records(path: Path, size: int) -> Dict[str, Dict[str, Any]]:
    """The last record of each model at this size (a model re-run after a fix has several)."""
    records: Dict[str, Dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by an interruption
            if entry.get("size") == size:
                records[entry["spec"]] = entry
    return records


def run_one(spec: str, args: argparse.Namespace) -> Dict[str, Any]:
    """Run the worker for ``spec`` in a fresh process; its record plus peak memory, wall time and exit."""
    with tempfile.TemporaryDirectory(prefix="sweep_zoo_") as folder:
        result = Path(folder) / "result.json"
        command = [sys.executable, __file__, "--worker", spec, "--size", str(args.size), "--threads",
                   str(args.threads), "--work-dir", folder, "--result", str(result)]
        command += ["--max-block-seconds", str(args.max_block_seconds), "--seed", str(args.seed),
                    "--out-dir", folder]
        started = time.perf_counter()
        with open(Path(folder) / "log.txt", "w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
            status, usage = wait_with_timeout(process.pid, args.timeout)
        wall = time.perf_counter() - started
        record = json.loads(result.read_text()) if result.exists() else {"stage": "not started"}
        log_tail = (Path(folder) / "log.txt").read_text()[-2000:]
    record.update(spec=spec, size=args.size, threads=args.threads, wall_s=wall,
                  peak_rss_mb=usage.ru_maxrss / 1024, commit=args.commit, load_before=args.load,
                  load_after=os.getloadavg()[0])
    if status is None:
        record.update(status="timeout", error=f"killed after {args.timeout} s in stage after {record['stage']!r}")
    elif os.WIFSIGNALED(status):
        record.update(status="killed", error=f"signal {os.WTERMSIG(status)} after stage {record['stage']!r}",
                      log_tail=log_tail)
    elif "status" not in record:
        record.update(status="crashed", error=f"exit {os.WEXITSTATUS(status)} after stage {record['stage']!r}",
                      log_tail=log_tail)
    return record


def wait_with_timeout(pid: int, timeout: float) -> Any:
    """(exit status or None when killed for time, resource usage of the child)."""
    deadline = time.monotonic() + timeout
    while True:
        done_pid, status, usage = os.wait4(pid, os.WNOHANG)
        if done_pid == pid:
            return status, usage
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, _, usage = os.wait4(pid, 0)
            return None, usage
        time.sleep(0.5)


def main() -> int:
    parser = common.parser(__doc__, "sweep_zoo", threads=2)
    parser.add_argument("--models", default=None,
                        help="Comma-separated torchvision names or specs [default: every torchvision classifier].")
    parser.add_argument("--size", type=int, default=64, help="Input height and width.")
    parser.add_argument("--max-block-seconds", type=float, default=60.0, help="Profile's per-block time cap.")
    parser.add_argument("--timeout", type=float, default=1800, help="Seconds per model before it is killed.")
    parser.add_argument("--jsonl", default=None, help="JSONL file to append to (default OUT_DIR/sweep_zoo.jsonl).")
    parser.add_argument("--redo-failed", action="store_true",
                        help="Run again the models whose last record is not ok (after a fix); a new line is added.")
    parser.add_argument("--redo", action="store_true",
                        help="Run the models again even where recorded (after a change); a new line is added.")
    parser.add_argument("--table", action="store_true", help="Print the Markdown table of --jsonl and stop.")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = common.parse(parser, QUICK)
    if args.worker:
        return worker(args)
    jsonl = Path(args.jsonl or Path(args.out_dir) / "sweep_zoo.jsonl")
    if args.table:
        print(markdown_table(latest_records(jsonl, args.size).values()))
        return 0

    specs = [common.model_spec(m) for m in args.models.split(",")] if args.models else \
        [common.model_spec(m) for m in torchvision_classifiers()]
    done = set() if args.redo else {spec for spec, record in latest_records(jsonl, args.size).items()
                                     if not args.redo_failed or record["status"] == "ok"}
    run_record = common.Record(args)
    args.commit = run_record.machine["commit"]
    records = []
    for index, spec in enumerate(specs, 1):
        if spec in done:
            continue
        args.load = os.getloadavg()[0]
        print(f"[{index}/{len(specs)}] {spec} at {args.size}x{args.size} (load {args.load:.2f})", flush=True)
        record = run_one(spec, args)
        print(f"    {record['status']}: {summary(record)}", flush=True)
        with open(jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        records.append(record)
        run_record.write(records)
    print(markdown_table(records))
    print(f"record: {run_record.write(records)}")
    return 0


def markdown_table(records: Any) -> str:
    """One row per model: the figures docs/results.md shows."""
    def figure(record: Dict[str, Any], key: str, fmt: str) -> str:
        return fmt.format(record[key]) if record.get(key) is not None else "-"

    lines = ["| model | convs | valid blocks (merging) | barriers by kind | profile s | peak MB | smallest ratio "
             "| predicted | measured | max rel. error | outcome |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        barriers = ", ".join(f"{kind} {count}" for kind, count in (r.get("barriers") or {}).items()) or "-"
        blocks = f"{r['valid_blocks']} ({r['merge_blocks']})" if "valid_blocks" in r else "-"
        if r["status"] != "ok":
            outcome = f"{r['status']}: {r['error'][:120]}"
        else:
            outcome = (r.get("why") or "ok").split("; barriers")[0]  # the barriers have their own column
        lines.append(" | ".join([
            f"| {r['spec'].replace('torchvision:', '')}", figure(r, "convs", "{}"), blocks, barriers,
            figure(r, "profile_s", "{:.0f}"), figure(r, "peak_rss_mb", "{:.0f}"), figure(r, "smallest_ratio", "{:.2f}"),
            figure(r, "predicted_speedup", "{:.2f}x"), figure(r, "measured_speedup", "{:.2f}x"),
            figure(r, "max_rel_error", "{:.1e}"), outcome.replace("|", "/") + " |"]))
    return "\n".join(lines)


def summary(record: Dict[str, Any]) -> str:
    parts = [f"{record['wall_s']:.0f} s", f"peak {record['peak_rss_mb']:.0f} MB"]
    for key, fmt in (("convs", "{} convs"), ("merge_blocks", "{} mergeable blocks"), ("profile_s", "profile {:.0f} s"),
                     ("predicted_speedup", "predicted {:.2f}x"), ("measured_speedup", "measured {:.2f}x"),
                     ("max_rel_error", "error {:.1e}"), ("why", "{}"), ("error", "{}")):
        if record.get(key) is not None:
            parts.append(fmt.format(record[key]))
    return ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
