"""Command line: parses options, calls the library, prints. No logic of its own.

Heavy imports (torch, onnxruntime, tensorrt) happen inside the commands that need
them so that ``dpcompress --help`` and ``dpcompress solve`` start fast.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any, Dict, Optional

import click

from dpcompress import __version__
from dpcompress.errors import UserError


class _Group(click.Group):
    """Turns a UserError into one line on stderr and exit status 2 (traceback with --debug)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as err:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            click.echo(f"error: {err}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dpcompress")
@click.option("--debug", is_flag=True, help="Show tracebacks for user errors.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or stage lines (results and errors only).")
@click.pass_context
def main(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """Latency-aware CNN depth compression: remove activations, merge convolutions."""
    ctx.obj = {"debug": debug, "quiet": quiet}


def _progress() -> Any:
    """Progress on stderr for the running command: a bar on a terminal, plain lines in a log, nothing
    with --quiet."""
    from dpcompress.progress import ProgressBar

    obj = click.get_current_context().obj or {}
    return ProgressBar(quiet=bool(obj.get("quiet")))


# Options shared by every command that builds a model.
def model_options(func: Any) -> Any:
    func = click.option("--input-shape", default="1,3,224,224", show_default=True,
                        help="N,C,H,W of the model input.")(func)
    func = click.option("--weights", type=click.Path(dir_okay=False), default=None,
                        help="state_dict file (.pt) to load into the model.")(func)
    func = click.option("--model", "model_spec", required=True,
                        help="torchvision:NAME[?k=v&...], timm:NAME[?k=v&...], path/to/file.py:factory or "
                             "package.module:factory.")(func)
    return func


def submodule_option(func: Any) -> Any:
    return click.option("--submodule", default=None,
                        help="Compress only this submodule (qualified name, e.g. backbone.body), in place, at the "
                             "input it receives inside the model.")(func)


# ---- trace / export (model structure) ----


@main.command()
@model_options
@submodule_option
@click.option("--json", "as_json", is_flag=True, help="Print the Chain JSON instead of a table.")
@click.option("--capture", type=click.Choice(["auto", "fx", "export"]), default="auto", show_default=True,
              help="How the graph is taken: torch.fx, torch.export, or fx and export where fx cannot trace the "
                   "model (what every other command does).")
def trace(model_spec: str, weights: Optional[str], input_shape: str, submodule: Optional[str], as_json: bool,
          capture: str) -> None:
    """Show the model's mergeable trunk: positions, barriers, residuals, valid blocks."""
    from dpcompress.graph.submodule import trace_target
    from dpcompress.graph.trace import parse_input_shape
    from dpcompress.models import build_model
    from dpcompress.report import chain_table

    model = build_model(model_spec, weights)
    chain = trace_target(model, parse_input_shape(input_shape), submodule, spec=model_spec, capture=capture)[0].chain
    if as_json:
        click.echo(json.dumps(chain.to_json(), indent=2))
    else:
        click.echo(chain_table(chain))


@main.command()
@model_options
@submodule_option
@click.option("--plan", "plan_path", required=True, type=click.Path(dir_okay=False),
              help="plan.json from `dpcompress solve`, or hand-written with activations and boundaries.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Fine-tuned checkpoint from `dpcompress finetune` (replaces --weights for the trunk).")
@click.option("--format", "fmt", type=click.Choice(["torch", "onnx", "openvino", "tensorrt"]), default="onnx",
              show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Where to write the merged model.")
@click.option("--verify", is_flag=True, help="Check the export against the unmerged reference in ONNX Runtime.")
@click.option("--tolerance", type=float, default=1e-3, show_default=True,
              help="Largest relative error --verify accepts (max |diff| / max |reference|).")
@click.option("--dynamic-batch", is_flag=True, help="ONNX: leave the batch dimension dynamic.")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="TensorRT engine precision.")
def export(model_spec: str, weights: Optional[str], input_shape: str, submodule: Optional[str], plan_path: str,
           checkpoint: Optional[str], fmt: str, out: str, verify: bool, tolerance: float, dynamic_batch: bool,
           precision: str) -> None:
    """Merge the model as the plan says and write it as TorchScript, ONNX or a TensorRT engine."""
    from dpcompress.pipeline import export_from_spec
    from dpcompress.report import export_summary

    report = export_from_spec(model_spec, weights, input_shape, plan_path, fmt, out, verify=verify,
                              tolerance=tolerance, dynamic_batch=dynamic_batch, precision=precision,
                              checkpoint=checkpoint, submodule=submodule)
    if report.note:
        click.echo(report.note, err=True)
    click.echo(export_summary(report, out))

# ---- solve ----


@main.command()
@click.option("--latency-table", "latency_table_path", required=True, type=click.Path(dir_okay=False),
              help="Latency table CSV (start,end,latency_ms), from `dpcompress profile`.")
@click.option("--importance", "importance_source", default="uniform", show_default=True,
              help="Importance table CSV (start,end,importance), or 'uniform' to keep as many activations "
                   "as the budget allows.")
@click.option("--budget-ms", type=float, default=None, help="Latency budget in ms.")
@click.option("--budget-ratio", type=float, default=None, help="Budget as a fraction of the original latency.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Plan JSON to write.")
@click.option("--frontier", "frontier_path", type=click.Path(dir_okay=False), default=None,
              help="Also write every Pareto-optimal (latency, importance) plan to this CSV.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Also draw the frontier with the chosen plan marked (PNG).")
@click.option("--chain", "chain_path", type=click.Path(dir_okay=False), default=None,
              help="Chain JSON from `dpcompress trace --json`: segments end only at its activations.")
@click.option("--model", "model_spec", default=None, help="Trace this model for the chain instead of --chain.")
@click.option("--weights", default=None, type=click.Path(dir_okay=False), help="state_dict for --model.")
@click.option("--input-shape", default="1,3,224,224", show_default=True, help="N,C,H,W, with --model.")
@click.option("--measure", is_flag=True,
              help="With --model: the closed loop. Bench the most important candidate plans around the budget on "
                   "--backend, stepping down the frontier while they measure over it, and write the best one "
                   "measured within it (else the fastest measured faster than the original, else the plan that "
                   "merges nothing).")
@click.option("--candidates", type=int, default=3, show_default=True, help="With --measure: plans to bench.")
@click.option("--backend", "backend_name", type=click.Choice(["onnxruntime", "openvino", "torch", "tensorrt"]),
              default=None,
              help="With --measure: the runtime to bench on.  [default: onnxruntime]")
@click.option("--threads", type=int, default=None, help="With --measure: CPU threads.  [default: all cores]")
@click.option("--submodule", default=None, help="With --model: the submodule the table was profiled for.")
def solve(latency_table_path: str, importance_source: str, budget_ms: Optional[float],
          budget_ratio: Optional[float], out: str, frontier_path: Optional[str], plot_path: Optional[str],
          chain_path: Optional[str], model_spec: Optional[str], weights: Optional[str], input_shape: str,
          measure: bool, candidates: int, backend_name: Optional[str], threads: Optional[int],
          submodule: Optional[str]) -> None:
    """Choose the activations to keep and the convs to merge within a latency budget (no torch needed)."""
    from dpcompress.graph.plan import save_plan
    from dpcompress.search.solver import load_chain, resolve_budget, solve_for_model, write_frontier_csv
    from dpcompress.tables import read_importance_table, read_latency_table

    if chain_path and model_spec:
        raise UserError("give --chain or --model, not both")
    if measure and not model_spec:
        raise UserError("--measure benches the plans on the model: give --model")
    table = read_latency_table(latency_table_path)
    importance = None if importance_source == "uniform" else read_importance_table(importance_source)
    chain = load_chain(chain_path) if chain_path else None
    traced = None
    if model_spec:
        traced = _traced_model(model_spec, weights, input_shape, submodule)
        chain = traced.chain
    elif submodule:
        raise UserError("--submodule names a part of --model: give --model too")
    budget = resolve_budget(table, budget_ms, budget_ratio)
    plan, frontier = solve_for_model(table, importance, budget, chain,
                                     with_frontier=bool(frontier_path or plot_path or measure))
    if measure:
        from dpcompress.search.closed_loop import measure_candidates

        backend = _backend(backend_name, False, "cpu", threads, False, False)
        batch = table.meta.get("batch_size") or chain.input_shape[0]
        loop = measure_candidates(backend, traced, frontier, budget, input_shape=(batch, *chain.input_shape[1:]),
                                  count=candidates, say=_progress())
        click.echo(loop.reason, err=True)
        plan = loop.plan
    save_plan(out, plan)
    if frontier_path:
        write_frontier_csv(frontier_path, frontier)
    if plot_path:
        from dpcompress.search.frontier_plot import plot_frontier

        from dpcompress.search.solver import merge_only_frontier

        plot_frontier(plot_path, frontier, plan, budget, plan.original_latency_ms,
                      merge_only=merge_only_frontier(table, importance, chain) if table.pruned_latency_ms else None)
    click.echo(plan_summary(plan, chain.activation_positions if chain else None))
    for path in (out, frontier_path, plot_path):
        if path:
            click.echo(f"wrote {path}")


def plan_summary(plan: Any, eligible: Optional[list] = None) -> str:
    kept = " ".join(map(str, plan.activations)) or "none"
    pruned = set(plan.pruned)
    emptied = [b for b in plan.blocks if all(p in pruned for p in range(b[0] + 1, b[1] + 1))]
    of = f" of {len(eligible)}" if eligible is not None else ""
    lines = [f"kept activations: {len(plan.activations)}{of} ({kept})",
             f"blocks: {len(plan.boundaries) - 1} merged convs for {plan.num_positions} original convs"
             + (f" ({len(emptied)} of them with every conv pruned)" if emptied else "")]
    if plan.pruned:
        lines.append(f"pruned convs: {len(plan.pruned)} replaced by identity ({' '.join(map(str, plan.pruned))})")
    latency = f"predicted latency: {plan.latency_ms:.4f} ms (budget {plan.budget_ms:.4f} ms"
    if plan.original_latency_ms:
        latency += (f", original {plan.original_latency_ms:.4f} ms, "
                    f"{plan.latency_ms / plan.original_latency_ms:.1%} of it")
    importance = "not solved (the original network)" if plan.importance is None else f"{plan.importance:.6g}"
    lines += [latency + ")", f"importance: {importance}",
              f"solve time: {plan.solve_seconds * 1e3:.1f} ms"]
    return "\n".join(lines)


# ---- profile / bench ----


prune_option = click.option(
    "--prune/--no-prune", default=None,
    help="LayerMerge's search space: convs that keep their input's shape may also be replaced by identity "
         "inside merged blocks.  [default: on where the model has such convs]")


def backend_options(func: Any) -> Any:
    """Options choosing and tuning the latency backend (profile and bench)."""
    options = [
        click.option("--backend", "backend_name", type=click.Choice(["onnxruntime", "openvino", "torch", "tensorrt"]),
                     default=None, help="Runtime to time on.  [default: onnxruntime]"),
        click.option("--gpu", is_flag=True,
                     help="Time on the GPU: tensorrt where it imports, else torch on CUDA."),
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
                     help="Device for --backend onnxruntime|torch (tensorrt is always cuda)."),
        click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True),
        click.option("--threads", type=int, default=None, help="CPU threads.  [default: all cores]"),
        click.option("--cuda-graphs", is_flag=True, help="torch on CUDA: replay the forward as a CUDA graph."),
        click.option("--channels-last", is_flag=True, help="torch: channels_last memory format."),
        click.option("--warmup", type=int, default=10, show_default=True, help="Untimed runs first."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _backend(backend_name: Optional[str], gpu: bool, device: str, threads: Optional[int], cuda_graphs: bool,
             channels_last: bool) -> Any:
    from dpcompress.backends import choose_backend

    backend, why = choose_backend(backend_name, gpu=gpu, device=device, threads=threads,
                                  cuda_graphs=cuda_graphs, channels_last=channels_last)
    _progress()(why or f"backend: {backend.describe()}")
    return backend


@main.command()
@model_options
@submodule_option
@backend_options
@click.option("--batch-size", type=int, default=None, help="Batch size to time at.  [default: N of --input-shape]")
@click.option("--iters", type=int, default=50, show_default=True, help="Timed runs per block; the median is kept.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Latency table CSV to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing table made with other settings.")
@click.option("--prune-margin", type=float, default=2.0, show_default=True,
              help="Bound, not time, blocks slower than their single convs even at this x the fastest FLOP rate.")
@click.option("--time-all", is_flag=True, help="Time every block, dominated ones too (slow: huge merged kernels).")
@click.option("--max-block-seconds", type=float, default=60.0, show_default=True,
              help="Bound, not time, a merged block whose timing would take longer (in-network: its network's).")
@click.option("--timing", type=click.Choice(["in-network", "standalone"]), default=None,
              help="in-network: blocks timed inside whole networks by the runtime's node profiler (what the "
                   "network pays); standalone: each block as its own model.  [default: in-network where the "
                   "backend can (onnxruntime, openvino), else standalone]")
@click.option("--processes", type=int, default=1, show_default=True,
              help="Make the table this many times, each in a fresh process, and keep each row's median.")
@prune_option
def profile(model_spec: str, weights: Optional[str], input_shape: str, submodule: Optional[str],
            backend_name: Optional[str], gpu: bool,
            device: str, precision: str, threads: Optional[int], cuda_graphs: bool, channels_last: bool,
            warmup: int, batch_size: Optional[int], iters: int, out: str, overwrite: bool, prune_margin: float,
            time_all: bool, max_block_seconds: float, timing: Optional[str], processes: int,
            prune: Optional[bool]) -> None:
    """Time every valid block as its merged convolution and write the latency table (resumable)."""
    from dpcompress.graph.geometry import size_text

    settings = dict(model_spec=model_spec, weights=weights, input_shape=input_shape, submodule=submodule,
                    backend_name=backend_name, gpu=gpu, device=device, precision=precision, threads=threads,
                    cuda_graphs=cuda_graphs, channels_last=channels_last, warmup=warmup, batch_size=batch_size,
                    iters=iters, overwrite=overwrite, prune_margin=prune_margin, time_all=time_all,
                    max_block_seconds=max_block_seconds, timing=timing, prune=prune)
    quiet = bool((click.get_current_context().obj or {}).get("quiet"))
    if processes < 1:
        raise UserError(f"--processes must be at least 1 (got {processes})")
    if processes > 1:
        _profile_in_processes(settings, out, processes, quiet)
        return
    result = _profile_from_settings(settings, out, quiet)
    from dpcompress.latency.calibration import REST_FIT_WORDS

    unbuildable = len(result.meta["unbuildable_blocks"])
    capped = len(result.meta["capped_blocks"])
    click.echo(f"wrote {result.table_path} ({len(result.rows)} rows, {result.timed_shapes} shapes timed now, "
               f"{result.meta['bounded_blocks']} bounded as dominated, "
               + (f"{capped} bounded by --max-block-seconds, " if capped else "")
               + (f"{unbuildable} left out as their merge needs more than {size_text(result.meta['max_merge_bytes'])} "
                  "(DPCOMPRESS_MAX_MERGE_BYTES), " if unbuildable else "")
               + f"{result.resumed_blocks} rows resumed) and {result.meta_path}")
    if result.meta.get("loaded_networks") and result.timed_shapes:
        click.echo(f"{result.meta['loaded_networks']} profiled networks met too few quiet rounds (the original "
                   f"within {result.meta['quiet_margin']:.2f}x of {result.meta['anchor_quiet_ms']:.3f} ms) and were "
                   "read from all their rounds: the machine was loaded; profile again when it is quiet")
    if result.meta.get("rest_per_block") is not None:
        click.echo(f"rest outside the blocks: {result.meta['rest_ms']:.3f} ms + {result.meta['rest_per_block']:.3f} x "
                   f"a plan's blocks (fitted over {REST_FIT_WORDS.get(result.meta.get('rest_fit'), 'its networks')}; "
                   f"the network of single convs' own: {result.meta['singles_rest_ms']:.3f} ms)")
    if result.meta.get("retimed_shapes") and result.timed_shapes:
        click.echo(f"{result.meta['retimed_shapes']} block shapes were timed again: their networks ran in a state "
                   "taken for quiet until a quieter one showed")
    for note in result.notes:
        click.echo(note)


def _profile_from_settings(settings: Dict[str, Any], out: str, quiet: bool) -> Any:
    """``profile`` in this process: the backend and model built from their specs, the table written."""
    from dpcompress.latency.profile import profile_table
    from dpcompress.pipeline import prune_default
    from dpcompress.progress import ProgressBar, profile_lines

    s = settings
    backend = _backend(s["backend_name"], s["gpu"], s["device"], s["threads"], s["cuda_graphs"], s["channels_last"])
    traced = _traced_model(s["model_spec"], s["weights"], s["input_shape"], s["submodule"])
    return profile_table(traced.chain, backend, out, model_spec=s["model_spec"], input_shape=traced.chain.input_shape,
                         batch_size=s["batch_size"], precision=s["precision"], warmup=s["warmup"], iters=s["iters"],
                         overwrite=s["overwrite"], prune_margin=None if s["time_all"] else s["prune_margin"],
                         progress=profile_lines(ProgressBar(quiet=quiet)), traced=traced, timing=s["timing"],
                         max_block_seconds=s["max_block_seconds"], prune=prune_default(s["prune"], traced.chain))


def _profile_in_child(settings: Dict[str, Any], quiet: bool, out: Path) -> None:
    """One process's table of ``profile --processes`` (a spawned process: nothing inherited)."""
    with click.Context(main, obj={"quiet": quiet}):  # what the command's helpers read
        result = _profile_from_settings(settings, str(out), quiet)
    for note in result.notes:
        click.echo(f"{out.name}: {note}")


def _profile_in_processes(settings: Dict[str, Any], out: str, processes: int, quiet: bool) -> None:
    """``profile --processes``: the library's ``profile_in_processes``, each process profiling from ``settings``."""
    import functools

    from dpcompress.latency.processes import profile_in_processes
    from dpcompress.tables import meta_path_for

    # Settle what a user can get wrong here, once, before any process starts.
    _backend(settings["backend_name"], settings["gpu"], settings["device"], settings["threads"],
             settings["cuda_graphs"], settings["channels_last"])
    _traced_model(settings["model_spec"], settings["weights"], settings["input_shape"], settings["submodule"])
    meta = profile_in_processes(functools.partial(_profile_in_child, settings, quiet), out, processes,
                                overwrite=settings["overwrite"], say=None if quiet else _say_on_stderr)
    originals = ", ".join(f"{ms:.3f}" for ms in meta["process_original_ms"])
    click.echo(f"wrote {out} (each row the median of {processes} tables made in fresh processes; their "
               f"original networks: {originals} ms) and {meta_path_for(out)}")


def _say_on_stderr(line: str) -> None:
    click.echo(line, err=True)


@main.command()
@model_options
@submodule_option
@backend_options
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False), default=None,
              help="plan.json: also time the merged model and compare.")
@click.option("--rounds", type=int, default=16, show_default=True,
              help="Rounds that time the original and the compressed model in turn, spread over --sessions sets.")
@click.option("--iters", type=int, default=10, show_default=True, help="Timed runs of each model per round.")
@click.option("--sessions", type=int, default=4, show_default=True,
              help="Session sets: each builds both models in two fresh sessions; the speed-up's interval is over "
                   "the sets (two sessions of one model can run a few percent apart).")
@click.option("--ci", type=float, default=0.0, show_default=True,
              help="After --rounds, go on with sets until the speed-up's 95%% interval (without --plan, the "
                   "median's) is within this of it, relative (or --max-rounds); 0: no such target.")
@click.option("--max-rounds", type=int, default=48, show_default=True,
              help="Stop here anyway (sets go on past --rounds until --sessions of them met a quiet machine).")
@click.option("--min-seconds", type=float, default=0.0, show_default=True,
              help="Go on with rounds until this long has passed: a shared machine switches between quiet and "
                   "loaded states for seconds at a time, and the figures come from its quiet rounds.")
@click.option("--quiet-ms", type=float, default=None,
              help="Judge the original's quiet rounds against this latency (a table's anchor_quiet_ms: the state "
                   "it was made in) instead of the bench's own fastest tenth, where at least 3 rounds meet it.")
@click.option("--json", "as_json", is_flag=True, help="Print the full record as JSON (alone on stdout).")
def bench(model_spec: str, weights: Optional[str], input_shape: str, submodule: Optional[str],
          backend_name: Optional[str], gpu: bool,
          device: str, precision: str, threads: Optional[int], cuda_graphs: bool, channels_last: bool,
          warmup: int, plan_path: Optional[str], rounds: int, iters: int, sessions: int, ci: float,
          max_rounds: int, min_seconds: float, quiet_ms: Optional[float], as_json: bool) -> None:
    """Time the original model (and the plan's merged model, in turns) end to end. With a plan, the original
    is rebuilt as the plan's network is, so that both reach the runtime by the same path."""
    from dpcompress.pipeline import bench_spec
    from dpcompress.graph.trace import parse_input_shape

    if rounds < 1 or iters < 1 or sessions < 1 or max_rounds < rounds:
        raise UserError("--rounds, --iters and --sessions must be at least 1, and --max-rounds at least --rounds")
    if not 0 <= ci < 1:
        raise UserError(f"--ci must be 0 or more and below 1 (got {ci})")
    if not min_seconds >= 0:
        raise UserError(f"--min-seconds must be 0 or more (got {min_seconds})")
    if quiet_ms is not None and not quiet_ms > 0:
        raise UserError(f"--quiet-ms must be above 0 (got {quiet_ms})")
    backend = _backend(backend_name, gpu, device, threads, cuda_graphs, channels_last)
    result = bench_spec(backend, model_spec, weights=weights, input_shape=parse_input_shape(input_shape),
                        plan_path=plan_path, precision=precision, warmup=warmup, rounds=rounds,
                        iters_per_round=iters, sessions=sessions, until_ci=ci or None,
                        max_rounds=max_rounds, submodule=submodule, min_seconds=min_seconds, quiet_level_ms=quiet_ms)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        for line in result.summary_lines():
            click.echo(line)


# ---- importance / finetune / compress ----


def _traced_model(model_spec: str, weights: Optional[str], input_shape: str, submodule: Optional[str] = None) -> Any:
    from dpcompress.graph.trace import parse_input_shape
    from dpcompress.pipeline import traced_from_spec

    return traced_from_spec(model_spec, weights, parse_input_shape(input_shape), submodule)[1]


@main.command()
@model_options
@click.option("--method", type=click.Choice(["uniform", "proxy", "finetune"]), default="finetune", show_default=True,
              help="finetune: accuracy change after brief fine-tuning (the paper's); proxy: output change, "
                   "no training; uniform: all 1.")
@click.option("--data", "data_spec", default=None, help="digits or imagefolder:DIR (needed by finetune).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Importance table CSV to write.")
@click.option("--steps", type=int, default=100, show_default=True, help="Fine-tuning steps per segment.")
@click.option("--lr", type=float, default=0.01, show_default=True, help="Fine-tuning learning rate (cosine decay).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--alpha", type=float, default=1.0, show_default=True,
              help="Subtract alpha x the mean accuracy change of the segments that remove nothing.")
@click.option("--seed", type=int, default=0, show_default=True)
@prune_option
def importance(model_spec: str, weights: Optional[str], input_shape: str, method: str, data_spec: Optional[str],
               out: str, steps: int, lr: float, batch_size: int, alpha: float, seed: int,
               prune: Optional[bool]) -> None:
    """Measure the importance of every allowed segment (resumable; shards across torchrun processes)."""
    from dpcompress.training import distributed
    from dpcompress.training.data import load_data, parse_input_size
    from dpcompress.search.importance import ImportanceSettings, compute_importance
    from dpcompress.graph.trace import parse_input_shape
    from dpcompress.pipeline import prune_default

    data = load_data(data_spec, parse_input_size(parse_input_shape(input_shape))) if data_spec else None
    traced = _traced_model(model_spec, weights, input_shape)
    settings = ImportanceSettings(method=method, steps=steps, lr=lr, batch_size=batch_size, alpha=alpha, seed=seed,
                                  prune=prune_default(prune, traced.chain))
    rows = compute_importance(traced, settings, out, data=data, model_spec=model_spec, progress=_progress())
    if distributed.is_main():
        click.echo(f"wrote {out} ({len(rows)} rows, method {method})")


@main.command()
@model_options
@click.option("--plan", "plan_path", required=True, type=click.Path(dir_okay=False), help="plan.json to fine-tune.")
@click.option("--data", "data_spec", required=True, help="digits or imagefolder:DIR.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Checkpoint (.pt) to write.")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--lr", type=float, default=0.01, show_default=True, help="SGD learning rate (cosine decay).")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Per process.")
@click.option("--distill", type=float, default=0.0, show_default=True,
              help="Knowledge-distillation weight from the original model (the paper uses 0.3).")
@click.option("--seed", type=int, default=0, show_default=True)
def finetune(model_spec: str, weights: Optional[str], input_shape: str, plan_path: str, data_spec: str, out: str,
             epochs: int, lr: float, batch_size: int, distill: float, seed: int) -> None:
    """Train the plan's network (activations removed, padding reordered); resumable, DDP under torchrun."""
    from dpcompress.training import distributed
    from dpcompress.training.data import load_data, parse_input_size
    from dpcompress.training.finetune import FinetuneSettings
    from dpcompress.training.finetune import finetune as run_finetune
    from dpcompress.graph.plan import load_plan
    from dpcompress.graph.trace import parse_input_shape

    settings = FinetuneSettings(epochs=epochs, lr=lr, batch_size=batch_size, distill=distill, seed=seed)
    plan = load_plan(plan_path)
    data = load_data(data_spec, parse_input_size(parse_input_shape(input_shape)))
    traced = _traced_model(model_spec, weights, input_shape)
    result = run_finetune(traced, plan, data, out, settings, model_spec=model_spec, progress=_progress())
    if distributed.is_main():
        acc = result.accuracy
        click.echo(f"wrote {out}: holdout accuracy {acc['original_holdout']:.4f} original, "
                   f"{acc['holdout_before']:.4f} with activations removed, {acc['holdout_after']:.4f} fine-tuned; "
                   f"test {acc['test_after']:.4f}")


@main.command()
@model_options
@submodule_option
@click.option("--out-dir", required=True, type=click.Path(file_okay=False), help="Folder for every output file.")
@click.option("--budget-ms", type=float, default=None, help="Latency budget in ms (table units).")
@click.option("--budget-ratio", type=float, default=None, help="Budget as a fraction of the original latency "
              "[default: 0.7 when no --budget-ms].")
@click.option("--data", "data_spec", default=None, help="digits or imagefolder:DIR; enables fine-tuning and "
              "accuracy. Without it nothing is trained and accuracy is not measured.")
@click.option("--importance", "importance_method", type=click.Choice(["uniform", "proxy", "finetune"]), default=None,
              help="Default: finetune with --data, uniform without.")
@click.option("--importance-steps", type=int, default=100, show_default=True)
@click.option("--backend", type=click.Choice(["onnxruntime", "openvino", "torch", "tensorrt"]), default=None)
@click.option("--gpu", is_flag=True, help="Profile and bench on the GPU (TensorRT if installed, else torch CUDA).")
@click.option("--batch-size", type=int, default=None)
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--threads", type=int, default=None,
              help="CPU threads for profiling and benching (a shipped table is reused only if it matches).  "
              "[default: all cores]")
@click.option("--epochs", type=int, default=10, show_default=True, help="Fine-tuning epochs (with --data).")
@click.option("--distill", type=float, default=0.0, show_default=True, help="Knowledge distillation weight.")
@click.option("--tables-dir", type=click.Path(file_okay=False), default=None,
              help="Where to look for a matching latency table [default: the shipped latency_tables/].")
@click.option("--measure/--no-measure", default=True, show_default=True,
              help="Closed loop: bench the most important candidate plans around the budget on the backend, "
                   "stepping down the frontier while they measure over it, and keep the best one measured within "
                   "it (else the fastest measured faster than the original, else the original).")
@click.option("--candidates", type=int, default=3, show_default=True, help="Plans the closed loop benches.")
@prune_option
def compress(model_spec: str, weights: Optional[str], input_shape: str, submodule: Optional[str], out_dir: str,
             budget_ms: Optional[float],
             budget_ratio: Optional[float], data_spec: Optional[str], importance_method: Optional[str],
             importance_steps: int, backend: Optional[str], gpu: bool, batch_size: Optional[int], precision: str,
             threads: Optional[int], epochs: int, distill: float, tables_dir: Optional[str], measure: bool,
             candidates: int, prune: Optional[bool]) -> None:
    """Everything in one go: trace, table, importance, solve, fine-tune, export --verify, bench, report."""
    from dpcompress.pipeline import CompressSettings, compress_from_spec as run_compress
    from dpcompress.graph.trace import parse_input_shape

    if budget_ms is not None and budget_ratio is not None:
        raise UserError("give either --budget-ms or --budget-ratio, not both")
    settings = CompressSettings(
        budget_ms=budget_ms, budget_ratio=budget_ratio if budget_ms is None and budget_ratio is not None
        else (None if budget_ms is not None else 0.7),
        importance=importance_method, importance_steps=importance_steps, backend=backend, gpu=gpu,
        batch_size=batch_size, precision=precision, threads=threads, epochs=epochs, distill=distill, tables_dir=tables_dir,
        measure=measure, candidates=candidates, prune=prune)
    report = run_compress(model_spec, weights, parse_input_shape(input_shape), out_dir, settings, data_spec,
                          submodule=submodule, say=_progress())
    loop = report["closed_loop"]
    if loop is not None:
        click.echo(f"closed loop: {loop['reason']}")
    click.echo(f"predicted speed-up: {report['predicted_speedup']:.2f}x")
    click.echo(f"measured speed-up: {report['measured_speedup']:.2f}x"
               + (f" (submodule {submodule})" if submodule else ""))
    table_ms, bench_ms = report["table_anchor_quiet_ms"], report["bench"]["quiet_level_ms"]
    if table_ms is not None and bench_ms != table_ms:
        click.echo(f"note: the bench never met the state the table was made in (the original at {bench_ms:.3f} ms, "
                   f"the table's at {table_ms:.3f} ms): predicted and measured come from different machine states",
                   err=True)
    whole = report["whole_model_bench"]
    if whole:
        click.echo(f"whole model, PyTorch: {whole['measured_speedup']:.2f}x")
    if report["accuracy"]:
        click.echo("accuracy: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in sorted(report["accuracy"].items())))
    else:
        click.echo("accuracy: not measured (no --data)")
    click.echo(f"report: {out_dir}/report.md")


if __name__ == "__main__":  # pragma: no cover
    main()
