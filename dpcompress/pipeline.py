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
from dpcompress.graph.rewrite import merge_reference, reference_model
from dpcompress.graph.trace import parse_input_shape
from dpcompress.models import build_model
from dpcompress.progress import profile_lines
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
    # Pruning options (LayerMerge's search space); None: on where a conv is reducible. Off by default until
    # the shipped tables carry pruning options: on, compress would profile every model anew.
    prune: Optional[bool] = False


def prune_default(prune: Optional[bool], chain: Any) -> bool:
    """``prune`` as given, else on where any conv of the chain is reducible (keeps its input's shape)."""
    return bool(chain.reducible_positions()) if prune is None else prune


def _shown(path: Path) -> str:
    """The path relative to the working directory where it lies under it (shorter to read)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def find_table(tables_dir: Path, fingerprint: str, backend: str, precision: str, batch_size: int,
               threads: Optional[int] = None, timing: Optional[str] = None, prune: bool = False) -> Optional[Path]:
    """A latency table under ``tables_dir`` made for this chain, backend, precision, batch size and
    pruning setting (and with ``threads`` CPU threads and rows timed the way ``timing`` says, where
    given; a table from before timings were recorded counts as ``standalone``, one from before
    pruning options as made without them)."""
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
                and meta.get("prune", False) == prune and table.is_file()):
            return table
    return None


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
    from dpcompress.backends import choose_backend
    from dpcompress.latency.bench import bench_modules
    from dpcompress.latency.profile import default_timing, profile_table
    from dpcompress.search.frontier_plot import plot_frontier
    from dpcompress.search.importance import ImportanceSettings, compute_importance
    from dpcompress.graph.plan import save_plan
    from dpcompress.search.solver import resolve_budget, solve_for_model, write_frontier_csv
    from dpcompress.tables import read_importance_table, read_latency_table

    method = "table" if importance_table is not None else (
        settings.importance or ("finetune" if data is not None else "uniform"))
    if method == "finetune" and data is None:
        raise UserError("--importance finetune needs --data; without data use uniform or proxy")
    if submodule is not None and (data is not None or method not in ("uniform", "table")):
        raise UserError("with --submodule, dpcompress does not train or measure importance inside the whole "
                        "model yet: use uniform importance (or an importance table) without --data, and fine-tune "
                        "the returned reference model in your own training loop")
    model = model.eval()
    label = model_spec or type(model).__name__
    from dpcompress.graph.submodule import trace_target

    say(f"[1/7] trace {label}" + (f", submodule {submodule}" if submodule else ""))
    traced, site = trace_target(model, input_shape, submodule, spec=model_spec)
    if site is not None:
        say(f"      {submodule} receives {'x'.join(map(str, site.input_shape))}"
            + (" (its children, chained)" if site.chained_children else ""))
    chain = traced.chain
    chain_shape = chain.input_shape

    from dpcompress.backends import Backend

    if isinstance(settings.backend, Backend):  # the API may pass a backend object
        backend, picked = settings.backend, None
    else:
        backend, picked = choose_backend(settings.backend, gpu=settings.gpu, threads=settings.threads)
    if picked:
        say(picked)
    out = Path(out_dir)  # made only once the model and backend are known to work: a bad input writes nothing
    out.mkdir(parents=True, exist_ok=True)
    batch_size = settings.batch_size or int(chain_shape[0])
    tables_dir = Path(settings.tables_dir) if settings.tables_dir else DEFAULT_TABLES
    timing = default_timing(backend, traced)
    prune = prune_default(settings.prune, chain)
    table_path = find_table(tables_dir, chain.fingerprint(), backend.name, settings.precision, batch_size,
                            settings.threads, timing, prune) if tables_dir.is_dir() else None
    if table_path is not None:
        say(f"[2/7] latency table: reusing {_shown(table_path)}")
    else:
        table_path = out / "latency.csv"
        say(f"[2/7] latency table: profiling {len(chain.valid_blocks())} blocks on {backend.name} -> {table_path}")
        profile_table(chain, backend, table_path, model_spec=model_spec, input_shape=chain_shape,
                      batch_size=batch_size, precision=settings.precision, warmup=settings.warmup,
                      iters=settings.iters, traced=traced, timing=timing, progress=profile_lines(say), prune=prune)
    table = read_latency_table(table_path)

    say(f"[3/7] importance: {'given' if method == 'table' else method}"
        + ("" if method == "table" else f", pruning {'on' if prune else 'off'}"))
    # Uniform importance needs no table, except to price pruned convs (without a row the solver prunes none).
    if method not in ("uniform", "table") or (method == "uniform" and prune):
        importance_path = out / "importance.csv"
        compute_importance(traced, ImportanceSettings(method=method, steps=settings.importance_steps, prune=prune),
                           importance_path, data=data, model_spec=model_spec, progress=say)
        importance_table = read_importance_table(importance_path)

    budget = resolve_budget(table, settings.budget_ms, settings.budget_ratio)
    say(f"[4/7] solve at budget {budget:.4g} ms")
    solved, frontier = solve_for_model(table, importance_table, budget, chain=chain, with_frontier=True)
    bench_shape = (batch_size, *chain_shape[1:])
    loop = None
    plan = solved
    if settings.measure:
        from dpcompress.search.closed_loop import measure_candidates

        say(f"      measuring the best {settings.candidates} candidates on {backend.name}")
        loop = measure_candidates(backend, traced, frontier, budget, input_shape=bench_shape,
                                  precision=settings.precision, count=settings.candidates, warmup=settings.warmup,
                                  say=say)
        plan = loop.plan
        say(f"      {loop.reason}")
    save_plan(out / "plan.json", plan)
    write_frontier_csv(out / "frontier.csv", frontier)
    plot_frontier(out / "frontier.png", frontier, chosen=plan, budget_ms=budget,
                  original_latency_ms=plan.original_latency_ms)

    accuracy: Dict[str, float] = {}
    if data is not None and loop is not None and loop.kept_original:
        say("[5/7] fine-tune: skipped (the original network was kept)")
        reference = reference_model(traced, plan)
    elif data is not None:
        from dpcompress.training.finetune import FinetuneSettings, finetune

        say(f"[5/7] fine-tune {settings.epochs} epochs on {data.spec}")
        result = finetune(traced, plan, data, out / "finetuned.pt",
                          FinetuneSettings(epochs=settings.epochs, distill=settings.distill), model_spec=model_spec,
                          progress=say)
        reference = result.network
        accuracy = dict(result.accuracy)
    else:
        say("[5/7] fine-tune: skipped (no data)")
        reference = reference_model(traced, plan)
    reference.eval()
    merged = merge_reference(reference)

    say("[6/7] export + verify")
    exported = export_site(model, traced.model, reference, merged, site, "onnx", out / "compressed.onnx",
                           input_shape, tolerance=settings.tolerance)
    if exported.note:
        say(f"      {exported.note}")
    whole_reference, whole_merged = reference, merged
    if site is not None:
        from dpcompress.graph.submodule import put_back

        whole_reference, whole_merged = put_back(model, site, reference), put_back(model, site, merged)
    if data is not None:
        from dpcompress.training.train import evaluate

        accuracy["test_before"] = evaluate(model, data.test)
        accuracy["test_merged"] = evaluate(merged, data.test)

    say(f"[7/7] bench on {backend.name}")
    # Judged against the state the table was made in, where the table knows it and the bench meets it.
    bench = bench_modules(backend, traced.model, merged, input_shape=bench_shape, precision=settings.precision,
                          warmup=settings.warmup, plan=plan, quiet_level_ms=table.meta.get("anchor_quiet_ms"))
    whole_bench = None
    if site is not None and not (loop is not None and loop.kept_original):
        from dpcompress.backends.torch_backend import TorchBackend

        say("      bench the whole model in PyTorch, original against compressed (10 rounds of 2 runs)")
        # Few runs: a whole detector's forward (post-processing included) can take seconds.
        whole_bench = bench_modules(TorchBackend(threads=settings.threads), model, whole_merged,
                                    input_shape=input_shape, warmup=2, rounds=10, iters_per_round=2)
    report = {
        "model": model_spec, "weights": weights, "input_shape": list(input_shape), "submodule": submodule,
        "submodule_input_shape": list(site.input_shape) if site is not None else None,
        "data": data.spec if data is not None else None,
        "importance_method": method, "latency_table": str(table_path), "budget_ms": budget, "prune": prune,
        "plan": plan.to_json(), "predicted_latency_ms": plan.latency_ms,
        "predicted_speedup": bench.predicted_speedup, "measured_speedup": bench.measured_speedup,
        "measured_original_ms": bench.original.median_ms,
        "measured_compressed_ms": bench.compressed.median_ms if bench.compressed else None,
        "table_anchor_quiet_ms": table.meta.get("anchor_quiet_ms"),
        "whole_model_bench": whole_bench.to_json() if whole_bench is not None else None,
        "accuracy": accuracy or None, "export": exported.to_json(),
        "bench": bench.to_json(),
        "solved_plan": solved.to_json(), "closed_loop": loop.to_json() if loop is not None else None,
        "kept_original": bool(loop is not None and loop.kept_original),
    }
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", report_markdown(report))
    return CompressResult(model=whole_merged, plan=plan, report=report, reference=whole_reference)


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


def report_markdown(report: Dict[str, Any]) -> str:
    e = report["export"]
    v = e["verification"]
    lines = [
        f"# dpcompress report: {report['model'] or 'in-memory model'}", "",
        f"- input shape: {'x'.join(map(str, report['input_shape']))}; latency table: `{_shown(Path(report['latency_table']))}`",
        f"- importance: {report['importance_method']}; budget: {report['budget_ms']:.4g} ms",
        f"- kept activations: {len(report['plan']['activations'])}; blocks: {len(report['plan']['boundaries']) - 1}",
        f"- pruning: {pruning_text(report['prune'], report['plan'].get('pruned') or [])}",
        "", "| | before | after |", "|---|---|---|",
        f"| predicted latency (ms) | {report['plan']['original_latency_ms']:.4g} | "
        f"{report['predicted_latency_ms']:.4g} |",
        f"| measured latency (ms, median) | {report['measured_original_ms']:.4g} | "
        f"{report['measured_compressed_ms']:.4g} |",
        f"| conv layers | {e['before']['conv_layers']} | {e['after']['conv_layers']} |",
        f"| parameters | {e['before']['parameters']:,} | {e['after']['parameters']:,} |",
        f"| FLOPs | {e['before']['flops'] / 1e6:.1f}M | {e['after']['flops'] / 1e6:.1f}M |",
        "",
        f"- predicted speed-up: {report['predicted_speedup']:.2f}x; "
        f"measured speed-up: {report['measured_speedup']:.2f}x",
        f"- verification: max relative error {v['max_rel_error']:.3g} ({'OK' if v['passed'] else 'FAILED'})",
    ]
    if report.get("submodule"):
        whole = report["whole_model_bench"]
        lines[3:3] = [f"- compressed submodule: `{report['submodule']}` (input "
                      f"{'x'.join(map(str, report['submodule_input_shape']))}); the table below is the submodule's"]
        lines.append(f"- export: {e['note']}")
        if whole:
            lines.append(f"- whole model in PyTorch: {whole['original']['median_ms']:.4g} ms before, "
                         f"{whole['compressed']['median_ms']:.4g} ms after: "
                         f"{whole['original']['median_ms'] / whole['compressed']['median_ms']:.2f}x")
    loop = report.get("closed_loop")
    if loop:
        lines += ["", f"Closed loop: the budget is {loop['budget_ratio']:.1%} of the original's measured latency "
                  f"in the same bench; {loop['reason']}.", "",
                  "| candidate | kept activations | blocks | importance | predicted ms | measured ms | "
                  "measured budget ms | measured speed-up | verdict |", "|---|---|---|---|---|---|---|---|---|"]
        for index, c in enumerate(loop["candidates"], start=1):
            verdict = ("chosen" if c["chosen"] else "within" if c["within_budget"] and c["faster"] else
                       "over the budget" if not c["within_budget"] else "no faster than the original")
            lines.append(f"| {index} | {len(c['activations'])} | {len(c['boundaries']) - 1} | {c['importance']:.4g} | "
                         f"{c['predicted_ms']:.4g} | {c['measured_ms']:.4g} | {c['measured_budget_ms']:.4g} | "
                         f"{c['measured_speedup']:.2f}x | {verdict} |")
    else:
        lines += ["", "Closed loop: off (--no-measure); the plan is the solver's, unmeasured before export."]
    accuracy = report["accuracy"]
    if accuracy:
        lines.append("- accuracy: " + ", ".join(f"{k} {100 * val:.2f}%" for k, val in sorted(accuracy.items())))
    else:
        lines.append("- accuracy: not measured (no --data given)")
    lines += ["", "![frontier](frontier.png)", ""]
    return "\n".join(lines)


def pruning_text(prune: bool, pruned: Sequence[int]) -> str:
    """How the report and the plan summary say what was pruned."""
    if not prune:
        return "off (no conv may be replaced by identity)"
    return (f"on; {len(pruned)} conv(s) replaced by identity ({' '.join(map(str, pruned))})" if pruned
            else "on; no conv replaced by identity")


def traced_from_spec(model_spec: str, weights: Optional[str], input_shape: Sequence[int],
                     submodule: Optional[str] = None) -> "tuple[Any, Any, Any]":
    """The model a spec names, its traced chain (of ``submodule`` where given, at the input it receives inside
    the model) and the submodule's site (None without one)."""
    from dpcompress.graph.submodule import trace_target

    model = build_model(model_spec, weights)
    return (model, *trace_target(model, input_shape, submodule, spec=model_spec))


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
