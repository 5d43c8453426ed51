"""The Python API: every stage on an in-memory ``nn.Module``.

These are the functions ``import dpcompress`` exposes. Each one composes the stage functions of
the library (the same ones the command line calls); spec strings are parsed only at the CLI edge.
Torch and the backends are imported inside the functions, so importing dpcompress stays cheap.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Tuple, Union

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from dpcompress.backends import Backend
    from dpcompress.graph.chain import Chain
    from dpcompress.graph.trace import TracedModel
    from dpcompress.pipeline import CompressResult
    from dpcompress.graph.plan import Plan
    from dpcompress.tables import ImportanceTable, LatencyTable

PathLike = Union[str, Path]


def _traced(model: "nn.Module", input_shape: Sequence[int], submodule: Optional[str]
            ) -> Tuple["TracedModel", Any]:
    """The traced model, or its submodule at the input it receives inside the model, and the site."""
    from dpcompress.graph.submodule import trace_target

    return trace_target(model, input_shape, submodule)


def trace(model: "nn.Module", input_shape: Sequence[int], *, submodule: Optional[str] = None,
          capture: str = "auto") -> "Chain":
    """The mergeable chain of ``model`` at ``input_shape`` (N, C, H, W): its convs, positions, activations,
    barriers and valid blocks. With ``submodule`` (a qualified name such as ``"backbone.body"``), the chain
    of that part at the input it receives when ``model`` runs on ``input_shape``. ``capture`` is how the
    graph is taken: ``"fx"`` (torch.fx), ``"export"`` (torch.export) or ``"auto"`` (fx, and export where fx
    cannot trace the model; every other stage captures so); the chain's ``capture`` says which was used."""
    from dpcompress.graph.submodule import trace_target

    return trace_target(model, input_shape, submodule, capture=capture)[0].chain


def _backend(backend: "str | Backend", threads: Optional[int]) -> "Backend":
    from dpcompress.backends import Backend, choose_backend

    if isinstance(backend, Backend):
        return backend
    return choose_backend(backend, threads=threads)[0]


def profile(model: "nn.Module", input_shape: Sequence[int], *, backend: "str | Backend" = "onnxruntime",
            out: Optional[PathLike] = None, submodule: Optional[str] = None, precision: str = "fp32",
            threads: Optional[int] = None, timing: Optional[str] = None, warmup: int = 10, iters: int = 50,
            progress: bool = True, processes: int = 1, prune: Optional[bool] = None) -> "LatencyTable":
    """Time every valid block of ``model`` (or ``submodule``) on ``backend`` and return the latency table.

    ``backend`` is a name (``onnxruntime``, ``openvino``, ``torch``, ``tensorrt``) or a Backend instance.
    With ``out`` (a .csv path) the table and its meta are kept there, and an interrupted run resumes
    from them; without, they are written to a temporary folder and removed. ``timing`` is
    ``in-network`` or ``standalone`` (default: in-network where the backend can). With ``processes``
    above 1, the table is made that many times, each in a fresh process (``backend`` then by name),
    and each row is the median of theirs (``latency.processes.profile_in_processes``). ``prune``: rows for
    LayerMerge's pruning options too (default: where the model has convs that keep their input's shape).
    """
    import functools

    from dpcompress.latency.processes import profile_in_processes
    from dpcompress.tables import read_latency_table

    if processes > 1 and not isinstance(backend, str):
        raise ValueError("profile with processes > 1 needs the backend by name: each process makes its own")
    make = functools.partial(_profile_into, model, tuple(input_shape), submodule, backend, threads, precision,
                             timing, warmup, iters, progress, prune)

    def run(path: Path) -> "LatencyTable":
        if processes > 1:
            profile_in_processes(make, path, processes, overwrite=True, say=_progress_printer(progress))
        else:
            make(path)
        return read_latency_table(path)

    if out is not None:
        return run(Path(out))
    with tempfile.TemporaryDirectory(prefix="dpcompress_profile_") as folder:
        return run(Path(folder) / "latency.csv")


def _profile_into(model: "nn.Module", input_shape: Sequence[int], submodule: Optional[str], backend: "str | Backend",
                  threads: Optional[int], precision: str, timing: Optional[str], warmup: int, iters: int,
                  progress: bool, prune: Optional[bool], path: Path) -> None:
    """The table of :func:`profile` written at ``path`` (resumable), in this process."""
    from dpcompress.latency.profile import profile_table
    from dpcompress.pipeline import prune_default
    from dpcompress.progress import profile_lines

    traced, site = _traced(model, input_shape, submodule)
    runtime = _backend(backend, threads)
    shape = site.input_shape if site is not None else tuple(input_shape)
    say = _progress_printer(progress)
    result = profile_table(traced.chain, runtime, path, input_shape=shape, precision=precision, warmup=warmup,
                           iters=iters, traced=traced, timing=timing, progress=profile_lines(say),
                           prune=prune_default(prune, traced.chain))
    for note in result.notes:  # what the calibration could not do as intended
        say(note)


def solve(latency_table: "LatencyTable | PathLike", *, importance: "ImportanceTable | PathLike | None" = None,
          budget_ms: Optional[float] = None, budget_ratio: Optional[float] = None,
          chain: Optional["Chain"] = None) -> "Plan":
    """The plan of greatest importance whose predicted latency is within the budget: ``budget_ms``, or
    ``budget_ratio`` times the original latency (exactly one). Tables may be given as objects or paths;
    without ``importance`` every segment counts the same. With ``chain``, the plan is checked against it
    and only its activation positions are kept."""
    from dpcompress.search.solver import resolve_budget, solve_for_model
    from dpcompress.tables import read_importance_table, read_latency_table

    table = read_latency_table(latency_table) if isinstance(latency_table, (str, Path)) else latency_table
    importance_table = read_importance_table(importance) if isinstance(importance, (str, Path)) else importance
    budget = resolve_budget(table, budget_ms, budget_ratio)
    return solve_for_model(table, importance_table, budget, chain=chain)[0]


def merge(model: "nn.Module", plan: "Plan", input_shape: Sequence[int], *,
          submodule: Optional[str] = None) -> "nn.Module":
    """``model`` with ``plan`` applied: the activations it drops removed and each of its blocks one merged
    convolution (eval mode; ``model`` itself is left as it was). With ``submodule``, the whole model with
    that submodule compressed. The plan is checked against the chain first."""
    from dpcompress.graph.rewrite import merged_model

    traced, site = _traced(model, input_shape, submodule)
    merged = merged_model(traced, plan)
    if site is None:
        return merged
    from dpcompress.graph.submodule import put_back

    return put_back(model, site, merged)


def compress(model: "nn.Module", input_shape: Sequence[int], *, budget_ratio: Optional[float] = None,
             budget_ms: Optional[float] = None, data: Any = None,
             importance: "str | ImportanceTable | None" = None, backend: "str | Backend" = "onnxruntime",
             submodule: Optional[str] = None, out_dir: Optional[PathLike] = None, progress: bool = True,
             **settings: Any) -> "CompressResult":
    """The whole job on ``model``: trace, latency table (a shipped one where it matches, else profiled),
    importance, solve, measure the best candidates (the closed loop), fine-tune (with data), merge,
    export and verify, bench. Returns a CompressResult: ``.model`` (merged, eval mode), ``.plan``,
    ``.report`` (what report.json holds) and ``.reference`` (activations removed, unmerged: the network
    to fine-tune further).

    - ``budget_ratio`` or ``budget_ms`` (not both; neither means a ratio of 0.7).
    - ``data``: ``"digits"``, ``"imagefolder:DIR"``, a DataBundle, or a pair ``(train, validation)`` of
      Datasets or DataLoaders of ``(image, label)``.
    - ``importance``: ``"uniform"``, ``"proxy"``, ``"finetune"`` or an ImportanceTable; default finetune
      with data, else uniform.
    - ``submodule``: compress only that part, in place (``.model`` is the whole model).
    - ``out_dir``: where the files go (plan, tables, report, the ONNX export); a temporary folder, removed
      afterwards, when None.
    - ``settings``: any other field of :class:`~dpcompress.pipeline.CompressSettings` (``epochs``,
      ``threads``, ``measure``, ``candidates``, ...).
    """
    from dpcompress.pipeline import CompressSettings, compress_model
    from dpcompress.tables import ImportanceTable

    if budget_ms is None and budget_ratio is None:
        budget_ratio = 0.7
    importance_table = importance if isinstance(importance, ImportanceTable) else None
    method = importance if isinstance(importance, str) else None
    try:
        options = CompressSettings(budget_ms=budget_ms, budget_ratio=budget_ratio, importance=method,
                                   backend=backend, **settings)
    except TypeError as err:
        from dpcompress.errors import UserError

        raise UserError(f"compress: {err}") from err
    bundle = _data_bundle(data, input_shape)
    say = _progress_printer(progress)
    if out_dir is not None:
        return compress_model(model, input_shape, out_dir, options, data=bundle, importance_table=importance_table,
                              submodule=submodule, say=say)
    with tempfile.TemporaryDirectory(prefix="dpcompress_") as folder:
        return compress_model(model, input_shape, folder, options, data=bundle, importance_table=importance_table,
                              submodule=submodule, say=say)


def _data_bundle(data: Any, input_shape: Sequence[int]) -> Any:
    """``data`` as a DataBundle (see :func:`compress`)."""
    if data is None:
        return None
    from dpcompress.training.data import DataBundle, bundle_from_datasets, load_data, parse_input_size

    size = parse_input_size(input_shape)
    if isinstance(data, DataBundle):
        return data
    if isinstance(data, str):
        return load_data(data, size)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return bundle_from_datasets(data[0], data[1], size)
    from dpcompress.errors import UserError

    raise UserError(f"data must be a spec string, a DataBundle or a (train, validation) pair of Datasets or "
                    f"DataLoaders, not {type(data).__name__}")


def _progress_printer(progress: bool) -> Callable[[str], None]:
    """Progress bars and stage lines on stderr, or nothing."""
    from dpcompress.progress import ProgressBar

    return ProgressBar(quiet=not progress)
