"""Stage compositions shared by the CLI and the Python API: the whole job, and export from files."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

from dpcompress.errors import UserError
from dpcompress.export import ExportReport, export_plan
from dpcompress.fileio import write_json_atomic, write_text_atomic
from dpcompress.graph.rewrite import merge_reference, merged_model, reference_model, unchanged_network
from dpcompress.graph.trace import parse_input_shape
from dpcompress.models import build_model
from dpcompress.progress import profile_lines
from dpcompress.report import report_markdown, shown_path
from dpcompress.graph.plan import check_plan_against_chain, load_plan

DEFAULT_TABLES = Path(__file__).resolve().parent.parent / "latency_tables"


@dataclass(frozen=True)
class CompressSettings:
    budget_ms: Optional[float] = None
    budget_ratio: Optional[float] = 0.7
    importance: Optional[str] = None  # uniform | proxy | finetune; default finetune with data, else uniform
    importance_steps: int = 100
    backend: Any = None  # a backend name (default onnxruntime) or a Backend object
    gpu: bool = False
    batch_size: Optional[int] = None
    precision: str = "fp32"
    threads: Optional[int] = None  # CPU threads of the backend; None: all cores
    warmup: int = 10
    iters: int = 50
    epochs: int = 10
    distill: float = 0.0
    tolerance: float = 1e-3
    tables_dir: Optional[str] = None  # where to look for a matching table before profiling
    measure: bool = True  # the closed loop: bench the best candidates, keep one measured within the budget
    candidates: int = 3
    # Pruning options (LayerMerge's search space); None: on where a conv is reducible.
    prune: Optional[bool] = None


def prune_default(prune: Optional[bool], chain: Any) -> bool:
    """``prune`` as given, else on where any conv of the chain is reducible (keeps its input's shape)."""
    return bool(chain.reducible_positions()) if prune is None else prune


def find_table(tables_dir: Path, fingerprint: str, backend: str, precision: str, batch_size: int,
               threads: Optional[int] = None, timing: Optional[str] = None, prune: bool = False) -> Optional[Path]:
    """A latency table under ``tables_dir`` made for this chain, backend, precision and batch size, with
    pruning options where ``prune`` asks for them (a table with them serves without too: its options are
    dropped), and with ``threads`` CPU threads and rows timed the way ``timing`` says, where given (a table
    from before timings were recorded counts as ``standalone``, one from before pruning options as made
    without them). Tables made for the request exactly come first."""
    found = []
    for meta_path in sorted(tables_dir.rglob("*.meta.json")):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(meta, dict):
            continue
        table = meta_path.with_name(meta_path.name[: -len(".meta.json")] + ".csv")
        if (meta.get("chain_fingerprint") == fingerprint and meta.get("backend") == backend
                and meta.get("precision") == precision and meta.get("batch_size") == batch_size
                and (threads is None or meta.get("threads") == threads)
                and (timing is None or meta.get("timing", "standalone") == timing)
                and (meta.get("prune", False) or not prune) and table.is_file()):
            found.append((meta.get("prune", False) != prune, table))
    return min(found)[1] if found else None


@dataclass
class CompressResult:
    """What :func:`compress_model` made: the merged network, its plan, the report, and the reference
    network (activations removed, not merged: the one to fine-tune). With a submodule, ``model`` and
    ``reference`` are the whole model with that submodule replaced."""

    model: Any
    plan: Any
    report: Dict[str, Any]
    reference: Any


def compress_model(model: Any, input_shape: Sequence[int], out_dir: "str | Path",
                   settings: CompressSettings = CompressSettings(), *, data: Any = None,
                   importance_table: Any = None, submodule: Optional[str] = None,
                   model_spec: Optional[str] = None, weights: Optional[str] = None,
                   say: Callable[[str], None] = print) -> CompressResult:
    """Run every stage on ``model`` (an ``nn.Module``); write all files and report.{json,md} into ``out_dir``.

    ``data`` is a :class:`~dpcompress.training.data.DataBundle` (fine-tuning and finetune importance);
    ``importance_table`` an ImportanceTable to use instead of measuring one; ``submodule`` the qualified
    name of the part to compress in place (``model_spec`` and ``weights`` are recorded in the report).
    """
    from dpcompress.graph.submodule import put_back, trace_target
    from dpcompress.graph.trace import require_logits

    method = _importance_method(settings, data, importance_table, submodule)
    model = model.eval()
    say(f"[1/7] trace {model_spec or type(model).__name__}" + (f", submodule {submodule}" if submodule else ""))
    traced, site = trace_target(model, input_shape, submodule, spec=model_spec)
    if data is not None or method in ("proxy", "finetune"):
        require_logits(traced, f"importance {method!r}" if data is None else "fine-tuning")  # before profiling
    if site is not None:
        say(f"      {submodule} receives {'x'.join(map(str, site.input_shape))}"
            + (" (its children, chained)" if site.chained_children else ""))
    job = _Job(traced=traced, backend=_compress_backend(settings, say), settings=settings, model_spec=model_spec,
               out=Path(out_dir), say=say)
    job.out.mkdir(parents=True, exist_ok=True)  # only once the model and backend work: a bad input writes nothing
    table_path, table = _latency_table(job)
    importance_table = _importance(job, method, data, importance_table)
    budget, solved, plan, loop = _solve(job, table, importance_table)
    reference, accuracy = _finetuned_reference(job, plan, data, loop)
    merged = merge_reference(reference)

    say("[6/7] export + verify")
    exported = export_site(model, traced.model, reference, merged, site, "onnx", job.out / "compressed.onnx",
                           input_shape, tolerance=settings.tolerance)
    if exported.note:
        say(f"      {exported.note}")
    whole_reference, whole_merged = reference, merged
    if site is not None:
        whole_reference, whole_merged = put_back(model, site, reference), put_back(model, site, merged)
    if data is not None:
        from dpcompress.training.train import evaluate

        accuracy["test_before"] = evaluate(model, data.test)
        accuracy["test_merged"] = evaluate(merged, data.test)

    kept_original = bool(loop is not None and loop.kept_original)
    whole = (model, site, whole_merged, input_shape) if site is not None and not kept_original else None
    bench, whole_bench = _benches(job, plan, merged, table, whole)
    report = {
        "model": model_spec, "weights": weights, "input_shape": list(input_shape), "submodule": submodule,
        "submodule_input_shape": list(site.input_shape) if site is not None else None,
        "data": data.spec if data is not None else None,
        "importance_method": method, "latency_table": str(table_path), "budget_ms": budget, "prune": job.prune,
        "plan": plan.to_json(), "predicted_latency_ms": plan.latency_ms,
        "predicted_speedup": bench.predicted_speedup, "measured_speedup": bench.measured_speedup,
        "measured_speedup_interval": bench.measured_speedup_interval,
        "measured_original_ms": bench.original.median_ms,
        "measured_compressed_ms": bench.compressed.median_ms if bench.compressed else None,
        "table_anchor_quiet_ms": table.meta.get("anchor_quiet_ms"),
        "whole_model_bench": whole_bench.to_json() if whole_bench is not None else None,
        "accuracy": accuracy or None, "export": exported.to_json(),
        "bench": bench.to_json(),
        "solved_plan": solved.to_json(), "closed_loop": loop.to_json() if loop is not None else None,
        "kept_original": kept_original,
    }
    write_json_atomic(job.out / "report.json", report)
    write_text_atomic(job.out / "report.md", report_markdown(report))
    return CompressResult(model=whole_merged, plan=plan, report=report, reference=whole_reference)


@dataclass
class _Job:
    """What every step of :func:`compress_model` after tracing works on."""

    traced: Any  # the TracedModel (of the submodule, where one is compressed)
    backend: Any
    settings: CompressSettings
    model_spec: Optional[str]
    out: Path
    say: Callable[[str], None]

    @property
    def chain(self) -> Any:
        return self.traced.chain

    @property
    def batch_size(self) -> int:
        return self.settings.batch_size or int(self.chain.input_shape[0])

    @property
    def bench_shape(self) -> "tuple[int, ...]":
        return (self.batch_size, *self.chain.input_shape[1:])

    @property
    def prune(self) -> bool:
        return prune_default(self.settings.prune, self.chain)


def _importance_method(settings: CompressSettings, data: Any, importance_table: Any,
                       submodule: Optional[str]) -> str:
    """How importance is had: ``table`` (given), else the settings' method (default finetune with data,
    else uniform); refused where it cannot be measured."""
    method = "table" if importance_table is not None else (
        settings.importance or ("finetune" if data is not None else "uniform"))
    if method == "finetune" and data is None:
        raise UserError("--importance finetune needs --data; without data use uniform or proxy")
    if submodule is not None and (data is not None or method not in ("uniform", "table")):
        raise UserError("with --submodule, dpcompress does not train or measure importance inside the whole "
                        "model yet: use uniform importance (or an importance table) without --data, and fine-tune "
                        "the returned reference model in your own training loop")
    return method


def _compress_backend(settings: CompressSettings, say: Callable[[str], None]) -> Any:
    """The settings' backend: a Backend object as given (the API may pass one), else chosen by name."""
    from dpcompress.backends import Backend, choose_backend

    if isinstance(settings.backend, Backend):
        return settings.backend
    backend, picked = choose_backend(settings.backend, gpu=settings.gpu, threads=settings.threads)
    if picked:
        say(picked)
    return backend


def _latency_table(job: _Job) -> "tuple[Path, Any]":
    """Step 2: a shipped or earlier table made for this chain and setting, else one profiled into the output."""
    from dpcompress.latency.profile import default_timing, profile_table
    from dpcompress.tables import read_latency_table

    settings, chain = job.settings, job.chain
    tables_dir = Path(settings.tables_dir) if settings.tables_dir else DEFAULT_TABLES
    timing = default_timing(job.backend, job.traced)
    table_path = find_table(tables_dir, chain.fingerprint(), job.backend.name, settings.precision, job.batch_size,
                            settings.threads, timing, job.prune) if tables_dir.is_dir() else None
    if table_path is not None:
        job.say(f"[2/7] latency table: reusing {shown_path(table_path)}")
    else:
        table_path = job.out / "latency.csv"
        job.say(f"[2/7] latency table: profiling {len(chain.valid_blocks())} blocks on {job.backend.name} "
                f"-> {table_path}")
        unpruned = (find_table(tables_dir, chain.fingerprint(), job.backend.name, settings.precision,
                               job.batch_size, settings.threads, timing, False) if job.prune else None)
        if unpruned is not None:
            job.say(f"      with pruning options, which {shown_path(unpruned)} lacks (--no-prune uses it as it is)")
        profile_table(chain, job.backend, table_path, model_spec=job.model_spec, input_shape=chain.input_shape,
                      batch_size=job.batch_size, precision=settings.precision, warmup=settings.warmup,
                      iters=settings.iters, traced=job.traced, timing=timing, progress=profile_lines(job.say),
                      prune=job.prune)
    table = read_latency_table(table_path)
    if not job.prune and table.pruned_latency_ms:  # the solver would search the options it has
        table = replace(table, pruned_latency_ms={})
    return table_path, table


def _importance(job: _Job, method: str, data: Any, importance_table: Any) -> Any:
    """Step 3: the importance table (None: uniform, which needs none except to price pruned convs: without a
    row the solver prunes none)."""
    from dpcompress.search.importance import ImportanceSettings, compute_importance
    from dpcompress.tables import read_importance_table

    job.say(f"[3/7] importance: {'given' if method == 'table' else method}"
            + ("" if method == "table" else f", pruning {'on' if job.prune else 'off'}"))
    if method not in ("uniform", "table") or (method == "uniform" and job.prune):
        importance_path = job.out / "importance.csv"
        compute_importance(job.traced, ImportanceSettings(method=method, steps=job.settings.importance_steps,
                                                          prune=job.prune),
                           importance_path, data=data, model_spec=job.model_spec, progress=job.say)
        return read_importance_table(importance_path)
    return importance_table


def _solve(job: _Job, table: Any, importance_table: Any) -> "tuple[float, Any, Any, Any]":
    """Step 4: the solver's plan and frontier at the budget, then (``measure``) the closed loop's choice among
    the best candidates; writes plan.json, frontier.csv and frontier.png. Returns the budget, the solver's plan,
    the plan chosen (the loop's, else the solver's) and the loop's result (None without the loop)."""
    from dpcompress.graph.plan import save_plan
    from dpcompress.search.closed_loop import measure_candidates
    from dpcompress.search.frontier_plot import plot_frontier
    from dpcompress.search.solver import merge_only_frontier, resolve_budget, solve_for_model, write_frontier_csv

    settings = job.settings
    budget = resolve_budget(table, settings.budget_ms, settings.budget_ratio)
    job.say(f"[4/7] solve at budget {budget:.4g} ms")
    solved, frontier = solve_for_model(table, importance_table, budget, chain=job.chain, with_frontier=True)
    loop = None
    plan = solved
    if settings.measure:
        job.say(f"      measuring the best {settings.candidates} candidates on {job.backend.name}")
        loop = measure_candidates(job.backend, job.traced, frontier, budget, input_shape=job.bench_shape,
                                  precision=settings.precision, count=settings.candidates, warmup=settings.warmup,
                                  say=job.say)
        plan = loop.plan
        job.say(f"      {loop.reason}")
    save_plan(job.out / "plan.json", plan)
    write_frontier_csv(job.out / "frontier.csv", frontier)
    plot_frontier(job.out / "frontier.png", frontier, chosen=plan, budget_ms=budget,
                  original_latency_ms=plan.original_latency_ms,
                  merge_only=merge_only_frontier(table, importance_table, job.chain) if job.prune else None)
    return budget, solved, plan, loop


def _finetuned_reference(job: _Job, plan: Any, data: Any, loop: Any) -> "tuple[Any, Dict[str, float]]":
    """Step 5: the reference network (activations removed, not merged), fine-tuned where there is data and a
    plan that changes something, in eval mode; and the fine-tuning's accuracy figures."""
    accuracy: Dict[str, float] = {}
    if data is not None and loop is not None and loop.kept_original:
        job.say("[5/7] fine-tune: skipped (the original network was kept)")
        reference = reference_model(job.traced, plan)
    elif data is not None:
        from dpcompress.training.finetune import FinetuneSettings, finetune

        job.say(f"[5/7] fine-tune {job.settings.epochs} epochs on {data.spec}")
        result = finetune(job.traced, plan, data, job.out / "finetuned.pt",
                          FinetuneSettings(epochs=job.settings.epochs, distill=job.settings.distill),
                          model_spec=job.model_spec, progress=job.say)
        reference = result.network
        accuracy = dict(result.accuracy)
    else:
        job.say("[5/7] fine-tune: skipped (no data)")
        reference = reference_model(job.traced, plan)
    return reference.eval(), accuracy


def _benches(job: _Job, plan: Any, merged: Any, table: Any, whole: "Optional[tuple[Any, Any, Any, Sequence[int]]]"
             ) -> "tuple[Any, Any]":
    """Step 7: the original (rebuilt as a plan's network is) against the merged network on the backend and,
    with ``whole`` (the whole model, the submodule's site, the whole model compressed, its input shape: where a
    submodule was compressed), the two whole models in PyTorch."""
    from dpcompress.latency.bench import bench_modules

    settings = job.settings
    job.say(f"[7/7] bench on {job.backend.name}")
    original = unchanged_network(job.traced)
    # Judged against the state the table was made in, where the table knows it and the bench meets it.
    bench = bench_modules(job.backend, original, merged, input_shape=job.bench_shape,
                          precision=settings.precision, warmup=settings.warmup, plan=plan,
                          quiet_level_ms=table.meta.get("anchor_quiet_ms"))
    if whole is None:
        return bench, None
    from dpcompress.backends.torch_backend import TorchBackend
    from dpcompress.graph.submodule import put_back

    model, site, whole_merged, input_shape = whole
    job.say("      bench the whole model in PyTorch, original against compressed (10 rounds of 2 runs)")
    # Few runs: a whole detector's forward (post-processing included) can take seconds.
    return bench, bench_modules(TorchBackend(threads=settings.threads), put_back(model, site, original),
                                whole_merged, input_shape=input_shape, warmup=2, rounds=10, iters_per_round=2)


def export_site(model: Any, traced_module: Any, reference: Any, merged: Any, site: Any, fmt: str, out: Path,
                input_shape: Sequence[int], *, verify: bool = True, tolerance: float = 1e-3,
                dynamic_batch: bool = False, precision: str = "fp32") -> ExportReport:
    """Export (and verify) the compressed network. Where a submodule was compressed: the whole model where it
    exports, else the submodule alone; the report's note says which and why."""
    options = dict(verify=verify, tolerance=tolerance, dynamic_batch=dynamic_batch, precision=precision)
    if site is None:
        return export_plan(model, reference, merged, fmt, out, input_shape, **options)
    from dpcompress.graph.submodule import put_back

    try:
        exported = export_plan(model, put_back(model, site, reference), put_back(model, site, merged), fmt, out,
                               input_shape, **options)
        return replace(exported, note=f"wrote the whole model, with {site.name} compressed")
    except UserError:
        raise  # a verification that failed: never fall back past it
    except Exception as err:  # exporters raise many types for models they cannot capture
        reason = _failure_reason(err)
    exported = export_plan(traced_module, reference, merged, fmt, out, site.input_shape, **options)
    return replace(exported, note=f"the whole model does not export ({reason}); wrote the submodule {site.name} "
                                  f"alone, at its input {'x'.join(map(str, site.input_shape))}")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _failure_reason(err: BaseException) -> str:
    """One line saying why an export failed: the first line of the innermost cause (torch.onnx wraps the
    torch.export error in a generic 'Failed to export the model with torch.export' message), colour codes
    removed."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = [line.strip() for line in _ANSI.sub("", str(err)).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:160]}" if lines else type(err).__name__


def compress_from_spec(model_spec: str, weights: Optional[str], input_shape: Sequence[int], out_dir: str,
                       settings: CompressSettings = CompressSettings(), data_spec: Optional[str] = None,
                       submodule: Optional[str] = None, say: Callable[[str], None] = print) -> Dict[str, Any]:
    """The model and data that specs name, compressed by :func:`compress_model`; returns the report."""
    data = None
    if data_spec is not None:
        from dpcompress.training.data import load_data, parse_input_size

        data = load_data(data_spec, parse_input_size(input_shape))
    model = build_model(model_spec, weights)
    return compress_model(model, input_shape, out_dir, settings, data=data, submodule=submodule,
                          model_spec=model_spec, weights=weights, say=say).report


def traced_from_spec(model_spec: str, weights: Optional[str], input_shape: Sequence[int],
                     submodule: Optional[str] = None) -> "tuple[Any, Any, Any]":
    """The model a spec names, its traced chain (of ``submodule`` where given, at the input it receives inside
    the model) and the submodule's site (None without one)."""
    from dpcompress.graph.submodule import trace_target

    model = build_model(model_spec, weights)
    return (model, *trace_target(model, input_shape, submodule, spec=model_spec))


def bench_spec(backend: Any, model_spec: str, *, weights: Optional[str] = None,
               input_shape: Sequence[int] = (1, 3, 224, 224), plan_path: Optional[str] = None,
               submodule: Optional[str] = None, **bench_settings: Any) -> Any:
    """Build the model a spec names and bench it (:func:`~dpcompress.latency.bench.bench_modules`, which
    ``bench_settings`` go to), against its merged version when a plan is given. With ``submodule``, bench
    that submodule alone, at the input it receives inside the model."""
    from dpcompress.latency.bench import bench_modules

    _, traced, site = traced_from_spec(model_spec, weights, input_shape, submodule)
    if site is not None:
        input_shape = (input_shape[0], *site.input_shape[1:])
    compressed = plan = None
    if plan_path is not None:
        plan = load_plan(plan_path)
        compressed = merged_model(traced, plan)  # checks the plan
    # Without a plan, the model as given; with one, rebuilt as the plan's network is (module doc of bench).
    original = traced.model if compressed is None else unchanged_network(traced)
    return bench_modules(backend, original, compressed, input_shape=input_shape, plan=plan, **bench_settings)


def export_from_spec(model_spec: str, weights: Optional[str], input_shape: str, plan_path: str, fmt: str,
                     out: str, verify: bool = False, tolerance: float = 1e-3, dynamic_batch: bool = False,
                     precision: str = "fp32", checkpoint: Optional[str] = None,
                     submodule: Optional[str] = None) -> ExportReport:
    """Build the model, check the plan against its chain, merge, (verify,) and write ``out``. With
    ``submodule``, the whole model is written where it exports (else the submodule alone)."""
    shape = parse_input_shape(input_shape)
    plan = load_plan(plan_path)
    model, traced, site = traced_from_spec(model_spec, weights, shape, submodule)
    check_plan_against_chain(plan, traced.chain, source=plan_path)
    if checkpoint is not None:
        from dpcompress.training.finetune import load_finetuned

        reference = load_finetuned(checkpoint, traced, plan)
    else:
        reference = reference_model(traced, plan)
    reference.eval()
    merged = merge_reference(reference)
    return export_site(model, traced.model, reference, merged, site, fmt, Path(out), shape, verify=verify,
                       tolerance=tolerance, dynamic_batch=dynamic_batch, precision=precision)
