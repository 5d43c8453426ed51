"""The GPU check (issue 31): PyTorch CUDA tables at the papers' settings, predicted against measured.

    PYTHONPATH=. python benchmarks/gpu_check.py --out DIR            # one CUDA GPU, about 8 minutes
    PYTHONPATH=. python benchmarks/gpu_check.py --dry-run --out DIR  # the same steps on the CPU, a minute
    make gpu-check                                                   # the first, into out/gpu_check

Made to run right the first time on a lent machine that nothing can be installed on: it needs only
torch, torchvision, numpy, onnx, onnxruntime and click (pytest for the GPU tests), and it drives
dpcompress through its command line alone (the same commands a user types), so the library's
internals can move under it. Steps, each time-boxed (its own limit, clipped to what is left of
``--minutes``), each recorded in DIR/gpu_check.json as soon as it ends, finished or not:

1. environment: package versions, GPU name, driver, CUDA and cuDNN; ``dpcompress trace`` of the model.
   A missing package, no CUDA device (without --dry-run) or a model that does not build ends the
   check here with one line and exit status 2.
2. gpu_tests: ``pytest -m gpu`` over the test files that have GPU-marked tests.
3. profile: ``dpcompress profile`` on the torch backend (CUDA events, warm-up, CUDA graphs,
   channels_last) at batch 128, as the papers time, in fp16, with LayerMerge's pruning options; the
   table and its meta are copied to DIR. Should profiling with CUDA graphs fail, it runs once more
   without them (recorded), and the benches then run without them too.
4. plans: ``dpcompress importance --method uniform`` with ``--no-prune`` and with ``--prune`` (every
   segment 1, a pruned conv costs what a removed activation does), then ``dpcompress solve`` at each
   budget twice: with the table without pruned rows (the solver prunes nothing it has no row for: Kim et
   al. 2023's search space) and with the one with them (LayerMerge's).
5. bench: ``dpcompress bench --plan --json`` of each plan against the original on the same backend,
   then ``dpcompress export --verify`` of each (ONNX, checked against the unmerged network in ONNX
   Runtime). Benches first: their figures are what the check is for.

The budgets, 0.71 and 0.61 of the original's latency, are the papers' MobileNetV2-1.0 speed-ups
(1/1.41, 1/1.63), whose figures the record keeps beside ours. ``--dry-run`` runs every step through
the same functions and commands, with a small model at a small input, batch 1, fp32, on the CPU
(CUDA graphs are then off: the backend uses them on CUDA only). The dpcompress commands run in a
child process per step (benchmarks/gpu_worker.py), killed at the step's limit; the GPU tests in
pytest's own.

DIR receives four files (few enough for the device tool's eight): gpu_check.json (the record),
gpu_check.log (every command's output), latency_table.csv and latency_table.meta.json. The plans,
exports and bench outputs are in the work folder (``--work``, default a new temporary folder,
kept); the record holds what they say.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, TextIO, Tuple

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().with_name("gpu_worker.py")
RECORD_FORMAT = "dpcompress-gpu-check/1"
RECORD_NAME, LOG_NAME, TABLE_NAME = "gpu_check.json", "gpu_check.log", "latency_table.csv"

# The published MobileNetV2-1.0 (ImageNet, 224x224) figures the check's speed-ups stand beside, and the plan
# of ours each compares with: the budget its speed-up asks for (1/1.41, 1/1.63), in its search space.
PAPERS = {
    "kim2023": {"paper": "Kim et al. 2023, Efficient Latency-Aware CNN Depth Compression via Two-Stage DP",
                "model": "MobileNetV2-1.0", "speedup": 1.41, "top1": 72.83, "runtime": "TensorRT",
                "budget_ratio": 0.71, "prune": False},
    "layermerge2024": {"paper": "Kim et al. 2024, LayerMerge", "model": "MobileNetV2-1.0", "speedup": 1.63,
                       "top1": 72.99, "runtime": "PyTorch", "budget_ratio": 0.61, "prune": True},
}


@dataclass(frozen=True)
class Settings:
    model: str
    input_shape: Tuple[int, int, int, int]
    device: str
    precision: str
    budgets: Tuple[float, ...] = tuple(paper["budget_ratio"] for paper in PAPERS.values())
    backend: str = "torch"
    threads: Optional[int] = None  # CPU threads (None: all cores; on CUDA not used)
    cuda_graphs: bool = True
    channels_last: bool = True
    max_block_seconds: float = 20.0  # a merged block slower to time than this is bounded, not timed
    bench_rounds: int = 20
    bench_iters: int = 10
    minutes: float = 8.0


# The check proper, and its dry run: only the model, input (batch), device and precision differ, and the
# CPU's threads: one, since a CPU shared with other work slows torch's spinning thread pool many times over.
REAL = Settings(model="torchvision:mobilenet_v2", input_shape=(128, 3, 224, 224), device="cuda", precision="fp16")
DRY_RUN = replace(REAL, model="dpcompress.zoo:tiny_mobilenet_v2", input_shape=(1, 3, 32, 32), device="cpu",
                  precision="fp32", threads=1)

# Each step's limit in seconds, and the share of --minutes kept back for the steps after it (of 8 minutes:
# the plans and benches keep at least 144 s, about 1.5 times what four benches and exports should take).
STEP_LIMITS = {"environment": 120, "gpu_tests": 150, "profile": 270, "plans": 90, "bench": 300}
KEEP_FOR_LATER = {"environment": 0.0, "gpu_tests": 0.5, "profile": 0.3, "plans": 0.25, "bench": 0.0}
MIN_STEP_SECONDS = 10.0  # a step with less time than this left is skipped


class StepFailed(Exception):
    """A step that did not finish: its status (failed, timeout, skipped) and why, in one line."""

    def __init__(self, message: str, status: str = "failed") -> None:
        super().__init__(message)
        self.status = status


class Fatal(Exception):
    """What ends the whole check at once (exit status 2): nothing after it could run."""


class Record:
    """The JSON record, written again (atomically) whenever a step starts or ends."""

    def __init__(self, path: Path, data: Dict[str, Any]) -> None:
        self.path, self.data = path, data
        self.save()

    def save(self) -> None:
        partial = self.path.with_name(self.path.name + ".tmp")
        partial.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(partial, self.path)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[Dict[str, Any]]:
        """Record step ``name``: running, then ok, or the status and line of the StepFailed it raised."""
        entry: Dict[str, Any] = {"status": "running"}
        self.data["steps"][name] = entry
        self.save()
        began = time.perf_counter()
        try:
            yield entry
            entry["status"] = "ok"
        except StepFailed as err:
            entry["status"], entry["error"] = err.status, str(err)
        except Fatal as err:
            entry["status"], entry["error"] = "failed", str(err)
            raise
        except Exception as err:  # a fault of the check's own: recorded, and the next steps still run
            traceback.print_exc()
            entry["status"], entry["error"] = "failed", f"internal error: {type(err).__name__}: {err}"
        finally:
            entry["seconds"] = round(time.perf_counter() - began, 2)
            self.save()


@dataclass
class Check:
    """One run of the check: its settings, folders, record, log and deadline."""

    settings: Settings
    out: Path
    work: Path
    record: Record
    log: TextIO
    deadline: float
    table: Optional[Path] = None
    plans: Dict[str, Path] = field(default_factory=dict)

    def say(self, line: str) -> None:
        stamp = f"[{time.strftime('%H:%M:%S')}] "
        print(stamp + line, flush=True)
        self.log.write(stamp + line + "\n")
        self.log.flush()

    def time_for(self, step: str) -> float:
        """The step's time limit: its own, clipped to what is left once the later steps' share is kept."""
        left = self.deadline - time.monotonic() - KEEP_FOR_LATER[step] * self.settings.minutes * 60
        if left < MIN_STEP_SECONDS:
            raise StepFailed(f"{max(0.0, self.deadline - time.monotonic()):.0f} s of --minutes left",
                             "skipped")
        return min(STEP_LIMITS[step], left)

    def child(self, argv: Sequence[str], timeout_s: float, output: Optional[TextIO] = None
              ) -> Tuple[Optional[int], float]:
        """Run ``argv`` from the repository root (importing dpcompress from it), its output into ``output``
        (default: the log); (exit status, or None where it was killed at ``timeout_s``; seconds)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        self.log.flush()
        began = time.perf_counter()
        process = subprocess.Popen(list(argv), cwd=ROOT, env=env, stdout=output or self.log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            status: Optional[int] = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            status = None
        return status, time.perf_counter() - began

    def dpcompress(self, step: str, commands: List[Dict[str, Any]], timeout_s: float) -> Dict[str, Dict[str, Any]]:
        """Run dpcompress ``commands`` (name, args, stdout) in one worker process; each finished one's
        exit status and seconds by name. The others are missing: the limit came first, or the worker died
        of a signal (a crash in native code), which is then the exit of the command it died in."""
        commands_path, results_path = self.work / f"{step}.commands.json", self.work / f"{step}.results.jsonl"
        commands_path.write_text(json.dumps(commands, indent=2))
        results_path.unlink(missing_ok=True)
        status, _ = self.child([sys.executable, str(WORKER), str(commands_path), str(results_path)], timeout_s)
        if status is None:
            self.say(f"{step}: stopped at its limit of {timeout_s:.0f} s")
        lines = results_path.read_text().splitlines() if results_path.exists() else []
        done = {result["name"]: result for result in map(json.loads, lines)}
        unfinished = [command["name"] for command in commands if command["name"] not in done]
        if status is not None and status < 0 and unfinished:  # killed by a signal: the command it was running
            self.say(f"{step}: the worker died (signal {-status}) in {unfinished[0]}")
            done[unfinished[0]] = {"name": unfinished[0], "exit": status, "seconds": None, "crashed": True}
        return done


# ---- command lines ----


def shape_text(shape: Sequence[int]) -> str:
    return ",".join(str(x) for x in shape)


def model_args(s: Settings) -> List[str]:
    return ["--model", s.model, "--input-shape", shape_text(s.input_shape)]


def backend_args(s: Settings) -> List[str]:
    flags = ["--cuda-graphs"] * s.cuda_graphs + ["--channels-last"] * s.channels_last
    threads = ["--threads", str(s.threads)] if s.threads else []
    return ["--backend", s.backend, "--device", s.device, "--precision", s.precision, *threads, *flags]


def plan_names(s: Settings) -> List[Tuple[str, float, bool]]:
    """(name, budget ratio, prune) of each plan: every budget without and with pruning."""
    return [(plan_name(budget, prune), budget, prune) for budget in s.budgets for prune in (False, True)]


def plan_name(budget: float, prune: bool) -> str:
    return f"r{budget:g}_{'prune' if prune else 'merge'}"


# ---- steps ----


def environment(check: Check) -> None:
    """Versions, GPU and driver, then ``dpcompress trace``: the model builds and traces."""
    s = check.settings
    with check.record.step("environment"):
        found, traced = check.work / "environment.json", check.work / "trace.txt"
        done = check.dpcompress("environment", [
            {"name": "environment", "stdout": str(found), "needs_cuda": s.device == "cuda", "required": True},
            {"name": "trace", "args": ["trace", *model_args(s)], "stdout": str(traced)}], check.time_for("environment"))
        if done.get("environment", {}).get("exit") not in (0, 3):
            raise Fatal(f"the environment report failed; see {check.out / LOG_NAME}")
        env = json.loads(found.read_text())
        check.record.data["environment"] = env
        if env["missing"]:
            errors = "; ".join(f"{name}: {env['modules'][name]['error']}" for name in env["missing"])
            raise Fatal(f"missing what the check needs ({errors}); it needs torch, torchvision, numpy, onnx, "
                        "onnxruntime and click")
        if s.device == "cuda" and not env.get("cuda_available"):
            raise Fatal("torch sees no CUDA device (torch.cuda.is_available() is False); run on a GPU machine, "
                        "or with --dry-run for the CPU")
        if done.get("trace", {}).get("exit") != 0:
            raise Fatal(f"dpcompress trace of {s.model} failed; see {check.out / LOG_NAME}")
        lines = traced.read_text().strip().splitlines()
        check.record.data["model"] = {"spec": s.model, "input_shape": list(s.input_shape),
                                      "trace_summary": lines[-1] if lines else None}


def gpu_test_files() -> List[str]:
    """The test files with GPU-marked tests, found afresh each run."""
    return sorted(str(path.relative_to(ROOT)) for path in (ROOT / "tests").rglob("test_*.py")
                  if "mark.gpu" in path.read_text())


def pytest_counts(text: str) -> Dict[str, int]:
    """pytest's closing counts (``3 passed, 2 skipped in 1.2s``), from its last such line."""
    lines = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected|error)", line)]
    counts = {"passed": 0, "failed": 0, "skipped": 0, "deselected": 0, "errors": 0}
    for number, word in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", lines[-1] if lines else ""):
        counts["errors" if word.startswith("error") else word] = int(number)
    return counts


def gpu_tests(check: Check) -> None:
    with check.record.step("gpu_tests") as entry:
        if "error" in check.record.data["environment"]["modules"]["pytest"]:
            raise StepFailed("pytest is not installed", "skipped")
        files = gpu_test_files()
        entry["files"] = files
        if not files:
            raise StepFailed("no test file has GPU-marked tests", "skipped")
        output = check.work / "gpu_tests.txt"
        with open(output, "w") as captured:
            status, _ = check.child([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                     *files], check.time_for("gpu_tests"), captured)
        text = output.read_text()
        check.log.write(text)
        entry.update(pytest_counts(text), exit=status)
        if status is None:
            raise StepFailed("pytest -m gpu ran past its limit", "timeout")
        if status != 0 or entry["failed"] or entry["errors"]:
            raise StepFailed(f"pytest -m gpu: exit {status}, {entry['failed']} failed, {entry['errors']} errors")


def profile(check: Check) -> None:
    """The latency table; where profiling with CUDA graphs fails, once more without them (the bench then
    runs without them too: its backend must be the table's)."""
    with check.record.step("profile") as entry:
        table = check.work / TABLE_NAME
        done = profile_table(check, table, entry)
        if done.get("exit") not in (0, None) and check.settings.cuda_graphs:
            check.say("profile failed with CUDA graphs; profiling again without them")
            check.settings = replace(check.settings, cuda_graphs=False)
            check.record.data["settings"]["cuda_graphs"] = False
            entry["retried_without_cuda_graphs"] = True
            done = profile_table(check, table, entry)
        if not done:
            raise StepFailed("dpcompress profile ran past its limit", "timeout")
        if done["exit"] != 0:
            raise StepFailed(f"dpcompress profile failed (exit {done['exit']})")
        for path in (table, meta_path(table)):
            shutil.copy(path, check.out / path.name)
        check.table = table
        check.record.data["table"] = table_summary(table, done["seconds"])


def profile_table(check: Check, table: Path, entry: Dict[str, Any]) -> Dict[str, Any]:
    """``dpcompress profile`` with LayerMerge's pruning options; its result ({} where it ran past the limit)."""
    s = check.settings
    args = ["profile", *model_args(s), *backend_args(s), "--prune", "--max-block-seconds", f"{s.max_block_seconds:g}",
            "--overwrite", "--out", str(table)]
    entry["command"] = "dpcompress " + " ".join(args)
    return check.dpcompress("profile", [{"name": "profile", "args": args}], check.time_for("profile")).get("profile", {})


def meta_path(table: Path) -> Path:
    return table.with_name(table.stem + ".meta.json")


def table_summary(table: Path, seconds: float) -> Dict[str, Any]:
    """What the table says, read from its CSV and meta (the file formats, not the library)."""
    meta = json.loads(meta_path(table).read_text())
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    singles = {int(r["end"]): float(r["latency_ms"]) for r in rows
               if int(r["end"]) == int(r["start"]) + 1 and not (r.get("pruned") or "").strip()}
    keys = ("format", "timing", "backend", "backend_version", "backend_options", "device", "device_name", "precision",
            "batch_size", "input_shape", "warmup", "iters", "num_positions", "rest_ms", "rest_per_block",
            "bounded_blocks", "capped_blocks", "unbuildable_blocks", "unique_shapes", "date")
    return {"seconds": round(seconds, 2), "rows": len(rows), "timed_rows": sum(r["timed"] == "1" for r in rows),
            "pruned_rows": sum(bool((r.get("pruned") or "").strip()) for r in rows),
            "single_convs_ms": math.fsum(singles.values()), **{k: meta.get(k) for k in keys}}


def plans(check: Check) -> None:
    s = check.settings
    with check.record.step("plans") as entry:
        if check.table is None:
            raise StepFailed("no latency table", "skipped")
        # Uniform importance, with rows for the pruned sets or without: solve prices no pruning it has no row for.
        importance = {prune: check.work / f"importance_{'prune' if prune else 'merge'}.csv" for prune in (False, True)}
        commands = [{"name": f"importance_{'prune' if prune else 'merge'}",
                     "args": ["importance", *model_args(s), "--method", "uniform", "--prune" if prune else "--no-prune",
                              "--out", str(path)]} for prune, path in importance.items()]
        for name, budget, prune in plan_names(s):
            path = check.work / f"plan_{name}.json"
            chosen = ["--importance", str(importance[prune])]
            commands.append({"name": name, "args": ["solve", "--latency-table", str(check.table), *chosen,
                                                    "--budget-ratio", f"{budget:g}", "--out", str(path)]})
        done = check.dpcompress("plans", commands, check.time_for("plans"))
        check.record.data["plans"] = []
        for name, budget, prune in plan_names(s):
            path = check.work / f"plan_{name}.json"
            if done.get(name, {}).get("exit") == 0:
                check.plans[name] = path
            check.record.data["plans"].append(plan_entry(name, budget, prune, path if name in check.plans else None))
        check.record.save()
        missing = [name for name, _, _ in plan_names(s) if name not in check.plans]
        entry["solved"] = len(check.plans)
        if missing:
            raise StepFailed(f"no plan for {', '.join(missing)} (importance: exit "
                             f"{done.get('importance_prune', {}).get('exit', 'none')}, without pruning "
                             f"{done.get('importance_merge', {}).get('exit', 'none')})")


def plan_entry(name: str, budget: float, prune: bool, path: Optional[Path]) -> Dict[str, Any]:
    entry: Dict[str, Any] = {"name": name, "budget_ratio": budget, "prune": prune, "solved": path is not None}
    if path is None:
        return entry
    plan = json.loads(path.read_text())
    keys = ("num_positions", "activations", "boundaries", "pruned", "budget_ms", "latency_ms", "original_latency_ms",
            "importance", "solve_seconds", "chain_fingerprint")
    entry.update({k: plan.get(k) for k in keys})
    entry["blocks"] = len(plan["boundaries"]) - 1
    entry["predicted_speedup"] = plan["original_latency_ms"] / plan["latency_ms"] if plan.get("latency_ms") else None
    return entry


def bench(check: Check) -> None:
    s = check.settings
    with check.record.step("bench") as entry:
        if not check.plans:
            raise StepFailed("no plans", "skipped")
        commands = []
        for name, path in check.plans.items():
            commands.append({"name": f"bench_{name}", "stdout": str(check.work / f"bench_{name}.json"),
                             "args": ["bench", *model_args(s), *backend_args(s), "--plan", str(path), "--rounds",
                                      str(s.bench_rounds), "--iters", str(s.bench_iters), "--json"]})
        for name, path in check.plans.items():
            commands.append({"name": f"export_{name}", "stdout": str(check.work / f"export_{name}.txt"),
                             "args": ["export", *model_args(s), "--plan", str(path), "--format", "onnx", "--verify",
                                      "--out", str(check.work / f"{name}.onnx")]})
        done = check.dpcompress("bench", commands, check.time_for("bench"))
        for plan in check.record.data["plans"]:
            if plan["solved"]:
                plan["bench"] = bench_entry(done.get(f"bench_{plan['name']}"), check.work / f"bench_{plan['name']}.json")
                plan["export"] = export_entry(done.get(f"export_{plan['name']}"),
                                              check.work / f"export_{plan['name']}.txt")
        entry["finished"] = len(done)
        if len(done) < len(commands):
            raise StepFailed(f"{len(done)} of {len(commands)} benches and exports finished in the limit", "timeout")
        failed = [name for name, result in done.items() if result["exit"] != 0]
        if failed:
            raise StepFailed(f"failed: {', '.join(failed)}")


def bench_entry(result: Optional[Dict[str, Any]], output: Path) -> Dict[str, Any]:
    if result is None or result["exit"] != 0:
        return {"exit": None if result is None else result["exit"]}
    found = json.loads(output.read_text())
    original, compressed = found["original"]["median_ms"], found["compressed"]["median_ms"]
    batch = found["input_shape"][0]
    return {"exit": 0, "seconds": result["seconds"], "original_ms": original, "compressed_ms": compressed,
            "measured_speedup": found["measured_speedup"], "interval": found["measured_speedup_interval"],
            "predicted_speedup": found["predicted_speedup"],
            "predicted_speedup_measured_rest": found["predicted_speedup_measured_rest"],
            "quiet_rounds": found["quiet_rounds"], "rounds": found["rounds"],
            "original_images_per_s": batch / original * 1e3, "compressed_images_per_s": batch / compressed * 1e3,
            "backend": found["backend"]}


def export_entry(result: Optional[Dict[str, Any]], output: Path) -> Dict[str, Any]:
    """``export --verify`` exits 0 only where the export matched the unmerged network."""
    if result is None:
        return {"exit": None, "verified": None}
    text = output.read_text() if output.exists() else ""
    error = re.search(r"max relative error ([0-9.eE+-]+)", text)
    return {"exit": result["exit"], "verified": result["exit"] == 0, "seconds": result["seconds"],
            "max_relative_error": float(error.group(1)) if error else None}


# ---- the whole check ----


def comparisons(record: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Each paper's figure beside our plan at its budget, in its search space (where that plan was made)."""
    plans = {plan["name"]: plan for plan in record.get("plans", [])}
    found = []
    for key, paper in PAPERS.items():
        ours = plans.get(plan_name(paper["budget_ratio"], paper["prune"]), {})
        found.append({"paper": key, "their_speedup": paper["speedup"], "their_runtime": paper["runtime"],
                      "our_plan": ours.get("name"), "our_predicted_speedup": ours.get("predicted_speedup"),
                      "our_measured_speedup": ours.get("bench", {}).get("measured_speedup")})
    return found


VERIFIED_WORDS = {True: "yes", False: "no", None: "-"}  # export --verify passed, failed, did not run


def summary_lines(record: Dict[str, Any]) -> List[str]:
    """The table the check ends with: each plan's predicted and measured speed-up, and the papers'."""
    lines = [f"{'plan':<16}{'blocks':>7}{'pruned':>7}{'predicted':>11}{'measured':>10}{'error':>8}  verified"]
    for plan in record.get("plans", []):
        measured = plan.get("bench", {}).get("measured_speedup")
        predicted = plan.get("predicted_speedup")
        error = f"{measured / predicted - 1:+.1%}" if measured and predicted else "-"
        lines.append(f"{plan['name']:<16}{plan.get('blocks', '-'):>7}{len(plan.get('pruned') or []):>7}"
                     + (f"{predicted:>10.2f}x" if predicted else f"{'-':>11}")
                     + (f"{measured:>9.2f}x" if measured else f"{'-':>10}")
                     + f"{error:>8}  {VERIFIED_WORDS[plan.get('export', {}).get('verified')]}")
    for paper, compared in zip(PAPERS.values(), record.get("comparisons", [])):
        measured = compared["our_measured_speedup"]
        lines.append(f"{paper['paper']}: {paper['model']} {paper['speedup']:.2f}x at {paper['top1']}% "
                     f"({paper['runtime']}); ours ({compared['our_plan'] or 'no plan'}): "
                     + (f"{measured:.2f}x measured" if measured else "not measured"))
    return lines


def new_record(settings: Settings, dry_run: bool, work: Path) -> Dict[str, Any]:
    return {"format": RECORD_FORMAT, "mode": "dry-run" if dry_run else "gpu", "settings": asdict(settings),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "work": str(work),
            "papers": PAPERS, "steps": {}, "environment": None, "model": None, "table": None, "plans": [],
            "comparisons": []}


def run_check(settings: Settings, dry_run: bool, out: Path, work: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    record = Record(out / RECORD_NAME, new_record(settings, dry_run, work))
    with open(out / LOG_NAME, "w") as log:
        check = Check(settings, out, work, record, log, deadline=began + settings.minutes * 60)
        check.say(f"gpu check ({record.data['mode']}): {settings.model} at {shape_text(settings.input_shape)}, "
                  f"{settings.backend} on {settings.device}, {settings.precision}; record {out / RECORD_NAME}, "
                  f"work {work}")
        status = 0
        try:
            for step in (environment, gpu_tests, profile, plans, bench):
                step(check)
                result = record.data["steps"][step.__name__]
                check.say(f"{step.__name__}: {result['status']} ({result['seconds']:.1f} s)"
                          + (f": {result['error']}" if "error" in result else ""))
        except Fatal as err:
            check.say(f"error: {err}")
            status = 2
        record.data["seconds"] = round(time.monotonic() - began, 2)
        record.data["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        failed = [name for name, step in record.data["steps"].items() if step["status"] != "ok"]
        record.data["status"] = "ok" if not failed else f"not ok: {', '.join(failed)}"
        record.data["comparisons"] = comparisons(record.data)
        record.save()
        for line in summary_lines(record.data):
            check.say(line)
        check.say(f"{record.data['status']} in {record.data['seconds']:.0f} s; record {out / RECORD_NAME}")
    return status or (1 if failed else 0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder for the record, the log and the table")
    parser.add_argument("--work", type=Path, default=None, help="folder for plans, exports and command outputs "
                        "[default: a new temporary folder, kept]")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with a small model")
    parser.add_argument("--model", default=None, help="model spec [default: torchvision:mobilenet_v2; dry run: "
                        "dpcompress.zoo:tiny_mobilenet_v2]")
    parser.add_argument("--budgets", default=None, help="budget ratios, comma-separated [default: 0.71,0.61]")
    parser.add_argument("--minutes", type=float, default=None, help="the whole check's time [default: 8]")
    parser.add_argument("--precision", choices=("fp16", "fp32"), default=None,
                        help="[default: fp16; dry run: fp32]")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="time without CUDA graphs")
    parser.add_argument("--no-channels-last", action="store_true", help="time in the NCHW memory format")
    args = parser.parse_args(argv)
    settings = DRY_RUN if args.dry_run else REAL
    settings = replace(settings, cuda_graphs=not args.no_cuda_graphs, channels_last=not args.no_channels_last,
                       precision=args.precision or settings.precision)
    if args.model:
        settings = replace(settings, model=args.model)
    if args.budgets:
        settings = replace(settings, budgets=tuple(float(b) for b in args.budgets.split(",")))
    if args.minutes:
        settings = replace(settings, minutes=args.minutes)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    return run_check(settings, args.dry_run, args.out, work)


if __name__ == "__main__":
    sys.exit(main())
