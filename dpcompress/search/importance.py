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
from dpcompress.search.plan import Plan
from dpcompress.tables import ImportanceTable, meta_path_for, read_importance_table, write_importance_table

IMPORTANCE_FORMAT = "dpcompress-importance/1"
METHODS = ("uniform", "proxy", "finetune")
RAW_COLUMNS = {
    "uniform": [],
    "proxy": ["kl", "cosine"],
    "finetune": ["removed_acc", "holdout_acc", "acc_change", "seconds"],
}
Segment = Tuple[int, int]
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


def segment_plan(chain: Chain, segment: Segment) -> Plan:
    """The plan that removes exactly the activations strictly inside ``segment``; single-conv blocks."""
    start, end = segment
    L = chain.num_positions
    kept = [p for p in chain.activation_positions if not start < p < end]
    return Plan(activations=kept, boundaries=list(range(L + 1)), num_positions=L,
                model=chain.model, chain_fingerprint=chain.fingerprint())


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


def measure_segment(traced: Any, segment: Segment, settings: ImportanceSettings, data: Any,
                    context: Dict[str, Any]) -> Row:
    """Raw measurements for one segment (see RAW_COLUMNS); ``context`` holds what all segments share."""
    import torch

    from dpcompress.graph.rewrite import reference_model
    from dpcompress.training.train import evaluate, train

    row: Row = {"start": segment[0], "end": segment[1]}
    if settings.method == "uniform":
        return row
    # A copy: training must never touch the weights another segment starts from.
    network = copy.deepcopy(reference_model(traced, segment_plan(traced.chain, segment))).eval()
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
    """Rows with their ``importance`` column, sorted by segment."""
    rows = sorted(rows, key=lambda r: (r["start"], r["end"]))
    if settings.method == "uniform":
        return [{**r, "importance": 1.0} for r in rows]
    if settings.method == "proxy":
        return [{**r, "importance": -r["kl"]} for r in rows]
    base = set(base_segments(chain, [(r["start"], r["end"]) for r in rows]))
    changes = [r["acc_change"] for r in rows if (r["start"], r["end"]) in base]
    offset = settings.alpha * sum(changes) / len(changes) if changes else 0.0
    return [{**r, "importance": r["acc_change"] - offset} for r in rows]


def compute_importance(traced: Any, settings: ImportanceSettings, out: PathLike, *, data: Any = None,
                       model_spec: Optional[str] = None,
                       progress: Optional[Callable[[str], None]] = None) -> List[Row]:
    """Measure every allowed segment of ``traced`` and write the table ``out`` (+ meta); return its rows.

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
    segments = allowed_segments(chain)
    meta = {
        "format": IMPORTANCE_FORMAT,
        "model": model_spec if model_spec is not None else chain.model,
        "input_shape": list(chain.input_shape),
        "chain_fingerprint": chain.fingerprint(),
        "weights_fingerprint": model_fingerprint(traced.gm),
        "data": getattr(data, "spec", None),
        "settings": asdict(settings),
        "num_segments": len(segments),
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
    done_rows = {(r["start"], r["end"]): r for r in decision["done"] if (r["start"], r["end"]) in set(segments)}
    pending = [s for s in segments if s not in done_rows]
    mine = distributed.shard(pending)
    if progress and distributed.is_main():
        progress(f"{len(segments)} segments, {len(done_rows)} done before, {len(pending)} to measure"
                 + (f" on {distributed.world_size()} processes" if distributed.world_size() > 1 else ""))

    context: Dict[str, Any] = {}
    device = distributed.device()
    if mine and settings.method == "finetune":
        context["base_acc"] = evaluate(traced.gm, data.holdout, device=device)
    if mine and settings.method == "proxy":
        context["calibration"] = _calibration_batch(chain, data, settings)
        with torch.no_grad():
            context["reference_logits"] = traced.gm.to(device)(context["calibration"].to(device)).float().cpu()
    columns = ["start", "end", *RAW_COLUMNS[settings.method]]
    new_rows: List[Row] = []
    journal = _journal_path(out, distributed.rank())
    for count, segment in enumerate(mine, start=1):
        row = measure_segment(traced, segment, settings, data, context)
        _append_row(journal, columns, row)
        new_rows.append(row)
        if progress:
            shown = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}
            prefix = f"[rank {distributed.rank()}] " if distributed.world_size() > 1 else ""
            progress(Counted(f"{prefix}{count}/{len(mine)} {shown}", count, len(mine), "importance"))

    gathered = distributed.all_gather(new_rows)
    all_rows = dict(done_rows)
    for rows in gathered:
        all_rows.update({(r["start"], r["end"]): r for r in rows})
    table = normalise(list(all_rows.values()), chain, settings)
    if distributed.is_main():
        write_importance_table(out, table, extra_columns=RAW_COLUMNS[settings.method])
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
    foreign = sorted(set(table.importance) - allowed)
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
                row: Row = {"start": int(raw["start"]), "end": int(raw["end"])}
                for column in columns:
                    row[column] = float(raw[column])
            except (KeyError, TypeError, ValueError):
                continue
            rows.append(row)
    return rows
