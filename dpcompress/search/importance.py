"""Importance of each segment: how much the network suffers when the activations inside go.

A segment (i, j) lies between two consecutive kept activations, so i and j are activation
positions (or 0 and L) and every activation strictly inside is removed. Methods:

- ``finetune`` (the paper's measure): remove the segment's activations (padding reordered as
  for merging), fine-tune briefly, and take the change of holdout accuracy against the
  unmodified model. Normalised as in the paper: subtract ``alpha`` times the mean change over
  the base segments, the segments with no activation inside, whose change is what the brief
  fine-tuning does by itself.
- ``proxy``: no training; minus the KL divergence between the original and the modified
  network's output distributions on a calibration batch (holdout images, or seeded noise
  when no data is given).
- ``uniform``: every segment 1.

With pruning (``prune``, LayerMerge's search space) a segment also has rows with convs pruned
(the ``pruned`` column), measured the same way with those convs replaced by identity. The pruned
sets of segment (i, j) are the pruning options (``pruning_options``) of the blocks it can be
merged into as one piece: of (i, j) itself where it is a valid block, else of every valid block
lying on some split of it into valid blocks. Each such set is reached by a plan (that block takes
the option, the others none), so no row is measured in vain; sets spread over several blocks of a
segment that is no valid block get no row, and the solver, which allows a (segment, pruned set) only
where it has a row, never picks them: a smaller search space, never a wrong price. Rows stay few:
about the options of one block per segment, not the combinations of its blocks' options.

Pricing pruned rows:

- ``uniform`` knows nothing of accuracy; it prices what a plan removes by counting: one
  activation removed costs one segment (importance 1 each), so one conv pruned costs 1 as well,
  ``1 - len(pruned)``. Pruning a conv removes a whole layer, at least what removing its
  activation removes; pricing them alike lets latency alone choose between them.
- ``finetune``: the offset subtracted is that of the base segments with nothing pruned, for all
  rows alike. The offset estimates what the brief fine-tuning does by itself to an unmodified
  network, which does not depend on what a row removes; taking pruned base segments into it would
  count pruning damage as fine-tuning noise, lower the offset's bar, and so make pruning look
  cheaper for every row. A pruned row is trained with its segment's seed (same batches), so it
  differs from the unpruned row only by what is pruned.
- ``proxy``: as for any row, minus the KL divergence.

Each segment is independent and seeded by its position, so results do not depend on the
order or the process that measures it. Rows are flushed to ``<name>.partial-<rank>.csv`` as
they finish; a run with the same model, weights and settings (``<name>.meta.json``) resumes
from them. Under torchrun each rank measures every world_size-th pending segment and rank 0
writes the table.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from dpcompress.progress import Counted
from dpcompress.training import distributed
from dpcompress.graph.chain import Chain
from dpcompress.errors import UserError
from dpcompress.fileio import PathLike, write_json_atomic
from dpcompress.graph.geometry import pruning_options
from dpcompress.graph.plan import Plan
from dpcompress.search.solver import options_on_splits
from dpcompress.tables import (PRUNED_COLUMN, ImportanceTable, Pruned, format_pruned, meta_path_for,
                               read_importance_table, write_importance_table)

IMPORTANCE_FORMAT = "dpcompress-importance/1"
METHODS = ("uniform", "proxy", "finetune")
RAW_COLUMNS = {
    "uniform": [],
    "proxy": ["kl", "cosine"],
    "finetune": ["removed_acc", "holdout_acc", "acc_change", "seconds"],
}
Segment = Tuple[int, int]
SegmentOption = Tuple[int, int, Pruned]  # a segment and the convs pruned in it (() for none)
Row = Dict[str, Any]


@dataclass(frozen=True)
class ImportanceSettings:
    method: str = "finetune"
    steps: int = 100  # fine-tuning steps per segment (finetune)
    lr: float = 0.01
    batch_size: int = 64
    alpha: float = 1.0  # weight of the base-segment mean subtracted (finetune)
    calibration_size: int = 64  # images in the proxy's calibration batch
    seed: int = 0
    prune: bool = False  # also rows with convs pruned (module doc)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown importance method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.steps < 1 or self.batch_size < 1 or self.calibration_size < 1:
            raise UserError("--steps, --batch-size and the calibration size must be at least 1")


def allowed_segments(chain: Chain) -> List[Segment]:
    """Every (i, j), i < j in activation_positions + {0, L}, that splits into valid blocks."""
    L = chain.num_positions
    ends = sorted({0, L, *chain.activation_positions})
    blocks = chain.valid_blocks()
    segments = []
    for i in ends:
        reachable = {i}  # positions reached from i through consecutive valid blocks (stage-1 feasibility)
        for start, end in blocks:  # sorted by start, so each start is final before it is extended
            if start in reachable:
                reachable.add(end)
        segments += [(i, j) for j in ends if j > i and j in reachable]
    return segments


def segment_pruning_options(chain: Chain, segment: Segment) -> List[Pruned]:
    """The pruned sets of ``segment`` that get a row (module doc): the empty set first, then the
    options of (start, end) where it is a valid block, else of every valid block on a split of it."""
    start, end = segment
    if chain.is_valid_block(start, end):
        return pruning_options(chain, start, end)
    options = options_on_splits(chain.valid_blocks(), lambda block: pruning_options(chain, *block), start, end)
    return sorted(options, key=lambda pruned: (len(pruned), pruned))


def segment_options(chain: Chain, prune: bool) -> List[SegmentOption]:
    """Every allowed segment with each pruned set that gets a row (only the empty one without ``prune``)."""
    return [(start, end, pruned) for start, end in allowed_segments(chain)
            for pruned in (segment_pruning_options(chain, (start, end)) if prune else [()])]


def segment_plan(chain: Chain, segment: Segment, pruned: Sequence[int] = ()) -> Plan:
    """The plan that removes exactly the activations strictly inside ``segment`` and replaces the convs
    at ``pruned`` by identity; single-conv blocks."""
    start, end = segment
    L = chain.num_positions
    kept = [p for p in chain.activation_positions if not start < p < end]
    return Plan(activations=kept, boundaries=list(range(L + 1)), num_positions=L,
                model=chain.model, chain_fingerprint=chain.fingerprint(), pruned=sorted(pruned))


def base_segments(chain: Chain, segments: Sequence[Segment]) -> List[Segment]:
    """Segments that remove nothing: no activation strictly inside."""
    positions = chain.activation_positions
    return [(i, j) for i, j in segments if not any(i < p < j for p in positions)]


def segment_seed(seed: int, segment: Segment) -> int:
    return seed * 1_000_003 + segment[0] * 1_009 + segment[1]


def model_fingerprint(model: Any) -> str:
    """Hash of a model's weights and buffers: a resumed run must measure the same network."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def measure_segment(traced: Any, option: SegmentOption, settings: ImportanceSettings, data: Any,
                    context: Dict[str, Any]) -> Row:
    """Raw measurements for one segment with its pruned convs (see RAW_COLUMNS); ``context`` holds what
    all segments share."""
    import torch

    from dpcompress.graph.rewrite import reference_model
    from dpcompress.training.train import evaluate, train

    start, end, pruned = option
    segment = (start, end)
    row: Row = {"start": start, "end": end, PRUNED_COLUMN: format_pruned(pruned)}
    if settings.method == "uniform":
        return row
    # A copy: training must never touch the weights another segment starts from.
    network = copy.deepcopy(reference_model(traced, segment_plan(traced.chain, segment, pruned))).eval()
    device = distributed.device()
    if settings.method == "proxy":
        batch, reference_logits = context["calibration"], context["reference_logits"]
        with torch.no_grad():
            logits = network.to(device)(batch.to(device)).float().cpu()
        log_p = torch.log_softmax(reference_logits, 1)
        log_q = torch.log_softmax(logits, 1)
        row["kl"] = float((log_p.exp() * (log_p - log_q)).sum(1).mean())
        row["cosine"] = float(torch.nn.functional.cosine_similarity(reference_logits, logits, dim=1).mean())
        return row
    began = time.perf_counter()
    row["removed_acc"] = evaluate(network, data.holdout, device=device)
    train(network, data.train, steps=settings.steps, lr=settings.lr, batch_size=settings.batch_size,
          seed=segment_seed(settings.seed, segment), data_parallel=False, device=device)
    row["holdout_acc"] = evaluate(network, data.holdout, device=device)
    row["acc_change"] = row["holdout_acc"] - context["base_acc"]
    row["seconds"] = round(time.perf_counter() - began, 3)
    return row


def normalise(rows: Sequence[Row], chain: Chain, settings: ImportanceSettings) -> List[Row]:
    """Rows with their ``importance`` column, sorted by segment and pruned convs (pricing: module doc)."""
    rows = sorted(rows, key=_row_option)
    if settings.method == "uniform":
        return [{**r, "importance": 1.0 - len(_row_option(r)[2])} for r in rows]
    if settings.method == "proxy":
        return [{**r, "importance": -r["kl"]} for r in rows]
    unpruned = [r for r in rows if not r[PRUNED_COLUMN]]
    base = set(base_segments(chain, [(r["start"], r["end"]) for r in unpruned]))
    changes = [r["acc_change"] for r in unpruned if (r["start"], r["end"]) in base]
    offset = settings.alpha * sum(changes) / len(changes) if changes else 0.0
    return [{**r, "importance": r["acc_change"] - offset} for r in rows]


def compute_importance(traced: Any, settings: ImportanceSettings, out: PathLike, *, data: Any = None,
                       model_spec: Optional[str] = None,
                       progress: Optional[Callable[[str], None]] = None) -> List[Row]:
    """Measure every allowed segment of ``traced`` (with each of its pruned sets where ``settings.prune``)
    and write the table ``out`` (+ meta); return its rows.

    Resumes from the rows of an interrupted run with the same settings. Under torchrun every
    rank must call this; rank 0 writes the files and every rank returns the full rows.
    """
    import torch

    from dpcompress.training.train import evaluate

    distributed.init()
    out = Path(out)
    chain: Chain = traced.chain
    if settings.method == "finetune" and data is None:
        raise UserError("--method finetune needs --data (it fine-tunes and measures holdout accuracy); "
                        "use --method proxy or uniform without data")
    if settings.method != "uniform":
        from dpcompress.graph.trace import require_logits

        require_logits(traced, f"importance {settings.method!r}")
    options = segment_options(chain, settings.prune)
    meta = {
        "format": IMPORTANCE_FORMAT,
        "model": model_spec if model_spec is not None else chain.model,
        "input_shape": list(chain.input_shape),
        "chain_fingerprint": chain.fingerprint(),
        "weights_fingerprint": model_fingerprint(traced.gm),
        "data": getattr(data, "spec", None),
        "settings": asdict(settings),
        "num_segments": len(allowed_segments(chain)),
        "num_rows": len(options),
    }
    # Rank 0 decides what is pending (or fails) and tells the others, so no rank waits forever.
    decision: Any = None
    if distributed.is_main():
        try:
            done = _resumable_rows(out, meta)
            decision = {"done": done}
            write_json_atomic(meta_path_for(out), {**meta, "complete": False})
        except UserError as err:
            decision = {"error": str(err)}
    decision = distributed.broadcast(decision)
    if "error" in decision:
        raise UserError(decision["error"])
    done_rows = {_row_option(r): r for r in decision["done"] if _row_option(r) in set(options)}
    pending = [o for o in options if o not in done_rows]
    mine = distributed.shard(pending)
    if progress and distributed.is_main():
        progress(f"{len(options)} rows, {len(done_rows)} done before, {len(pending)} to measure"
                 + (f" on {distributed.world_size()} processes" if distributed.world_size() > 1 else ""))

    context: Dict[str, Any] = {}
    device = distributed.device()
    if mine and settings.method == "finetune":
        context["base_acc"] = evaluate(traced.gm, data.holdout, device=device)
    if mine and settings.method == "proxy":
        context["calibration"] = _calibration_batch(chain, data, settings)
        with torch.no_grad():
            context["reference_logits"] = traced.gm.to(device)(context["calibration"].to(device)).float().cpu()
    columns = ["start", "end", PRUNED_COLUMN, *RAW_COLUMNS[settings.method]]
    new_rows: List[Row] = []
    journal = _journal_path(out, distributed.rank())
    for count, option in enumerate(mine, start=1):
        row = measure_segment(traced, option, settings, data, context)
        _append_row(journal, columns, row)
        new_rows.append(row)
        if progress:
            shown = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}
            prefix = f"[rank {distributed.rank()}] " if distributed.world_size() > 1 else ""
            progress(Counted(f"{prefix}{count}/{len(mine)} {shown}", count, len(mine), "importance"))

    gathered = distributed.all_gather(new_rows)
    all_rows = dict(done_rows)
    for rows in gathered:
        all_rows.update({_row_option(r): r for r in rows})
    table = normalise(list(all_rows.values()), chain, settings)
    if distributed.is_main():
        # A table without pruning has no pruned column, as before pruning existed.
        extra = [*([PRUNED_COLUMN] if settings.prune else []), *RAW_COLUMNS[settings.method]]
        write_importance_table(out, [_without_empty_pruned(r, settings.prune) for r in table], extra_columns=extra)
        write_json_atomic(meta_path_for(out), {**meta, "complete": True})
        for path in _journals(out):
            path.unlink()
    distributed.barrier()
    return table


def check_importance_table(path: PathLike, chain: Chain) -> ImportanceTable:
    """Read an importance table and make sure it was made for this model's chain (UserError if not)."""
    table = read_importance_table(path)
    meta_file = meta_path_for(path)
    if meta_file.exists():
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{meta_file}: not readable JSON ({err}); fix or delete it") from err
        made_for = meta.get("chain_fingerprint") if isinstance(meta, dict) else None
        if made_for is not None and made_for != chain.fingerprint():
            raise UserError(f"importance table {path} was made for another model (chain fingerprint {made_for}, "
                            f"this model has {chain.fingerprint()}); run `dpcompress importance` for this model")
    allowed = set(allowed_segments(chain))
    foreign = sorted((set(table.importance) | {(s, e) for s, e, _ in table.pruned_importance}) - allowed)
    if foreign:
        raise UserError(f"importance table {path} has segment {foreign[0]}, which this model does not have "
                        f"(its positions run 0..{chain.num_positions}); it was made for another model")
    return table


def _calibration_batch(chain: Chain, data: Any, settings: ImportanceSettings) -> Any:
    import torch

    if data is not None:
        count = min(settings.calibration_size, len(data.holdout))
        return torch.stack([data.holdout[i][0] for i in range(count)])
    _, channels, height, width = chain.input_shape
    generator = torch.Generator().manual_seed(settings.seed)
    return torch.randn(settings.calibration_size, channels, height, width, generator=generator)


def _journal_path(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.stem}.partial-{rank}.csv")


def _journals(out: Path) -> List[Path]:
    return sorted(out.parent.glob(f"{out.stem}.partial-*.csv"))


def _append_row(path: Path, columns: Sequence[str], row: Row) -> None:
    """Append one row and flush it to disk, so an interruption loses at most the segment in progress."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    if not path.exists():
        writer.writeheader()
    elif not path.read_bytes().endswith(b"\n"):
        buffer.write("\n")  # end a line an interruption cut short, so it stays one unreadable line
    writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
    with open(path, "a") as handle:
        handle.write(buffer.getvalue())
        handle.flush()
        os.fsync(handle.fileno())


def _resumable_rows(out: Path, meta: Dict[str, Any]) -> List[Row]:
    """Rows already measured with the same settings: journals of an interrupted run, or a finished table."""
    meta_file = meta_path_for(out)
    journals = _journals(out)
    previous: Optional[Dict[str, Any]] = None
    if meta_file.exists():
        try:
            previous = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            previous = None
    same = isinstance(previous, dict) and all(previous.get(k) == v for k, v in meta.items())
    if not same:
        if journals:
            raise UserError(f"{journals[0]} holds rows of an interrupted run with other settings or another "
                            f"model (see {meta_file}); delete the .partial-*.csv files to start over")
        return []
    sources = journals + ([out] if previous.get("complete") and out.exists() else [])  # type: ignore[union-attr]
    columns = RAW_COLUMNS[meta["settings"]["method"]]
    rows: List[Row] = []
    for source in sources:
        rows += _read_rows(source, columns)
    return rows


def _read_rows(path: Path, columns: Sequence[str]) -> List[Row]:
    """Complete rows of a journal or table; a line cut short by an interruption is skipped."""
    rows = []
    with open(path, newline="") as handle:
        for raw in csv.DictReader(handle):
            try:
                row: Row = {"start": int(raw["start"]), "end": int(raw["end"]),
                            PRUNED_COLUMN: raw.get(PRUNED_COLUMN) or ""}
                _row_option(row)  # a pruned cell cut short fails here, as other cells do below
                for column in columns:
                    row[column] = float(raw[column])
            except (KeyError, TypeError, ValueError):
                continue
            rows.append(row)
    return rows


def _row_option(row: Row) -> SegmentOption:
    return (row["start"], row["end"], tuple(int(p) for p in row[PRUNED_COLUMN].split()))


def _without_empty_pruned(row: Row, prune: bool) -> Row:
    return row if prune else {k: v for k, v in row.items() if k != PRUNED_COLUMN}
