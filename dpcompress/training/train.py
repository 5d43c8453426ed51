"""Training and evaluation: SGD with cosine decay, optional knowledge distillation, resumable.

Used for the digits model itself, for the brief fine-tuning of each importance measurement,
and for fine-tuning a plan's network. Under ``torchrun`` (when :mod:`dpcompress.training.distributed`
has joined a process group) the model trains data-parallel with DistributedDataParallel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dpcompress.progress import Counted
from dpcompress.training import distributed
from dpcompress.errors import UserError
from dpcompress.fileio import atomic_path

CHECKPOINT_FORMAT = "dpcompress-train-state/1"


@dataclass
class TrainResult:
    epochs: int  # epochs finished (0 in steps mode)
    steps: int  # optimizer steps taken in this call
    epoch_losses: List[float] = field(default_factory=list)  # mean training loss of each epoch run here
    final_loss: float = float("nan")  # mean loss of the last epoch, or of all steps in steps mode


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on logits softened by ``temperature``, scaled by T^2 (Hinton et al.)."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)


def train(model: nn.Module, dataset: Dataset, *, epochs: Optional[int] = None, steps: Optional[int] = None,
          lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 4e-5, batch_size: int = 64,
          teacher: Optional[nn.Module] = None, distill: float = 0.0, temperature: float = 1.0,
          seed: int = 0, checkpoint: Union[str, Path, None] = None,
          checkpoint_key: Optional[Dict[str, Any]] = None, data_parallel: Optional[bool] = None,
          device: Optional[torch.device] = None,
          progress: Optional[Callable[[str], None]] = None) -> TrainResult:
    """Train ``model`` in place for ``epochs`` or ``steps`` (exactly one), SGD with per-step cosine decay.

    loss = (1 - distill) * CE(labels) + distill * KD(teacher), the paper's fine-tuning loss.
    With ``checkpoint`` (epochs mode) the model, optimizer, scheduler and epoch are saved
    atomically after every epoch, and a run that finds the file resumes after its epoch, provided
    the settings and ``checkpoint_key`` (what else identifies the run: plan, model) are the same.
    ``data_parallel`` defaults to whether a torchrun process group is active.
    """
    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs and steps")
    if not 0.0 <= distill <= 1.0:
        raise UserError(f"--distill {distill} is outside [0, 1]")
    if distill > 0 and teacher is None:
        raise ValueError("distill > 0 needs a teacher")
    if data_parallel is None:
        data_parallel = distributed.active()
    device = device or distributed.device()
    torch.manual_seed(seed)
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    net: nn.Module = model
    if data_parallel:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    steps_per_epoch = _num_batches(dataset, batch_size, data_parallel)
    total_steps = steps if steps is not None else epochs * steps_per_epoch  # type: ignore[operator]
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                                nesterov=momentum > 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps))))

    start_epoch = 0
    settings = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "distill": distill,
                "world_size": distributed.world_size() if data_parallel else 1, **(checkpoint_key or {})}
    if checkpoint is not None and epochs is not None and Path(checkpoint).exists():
        start_epoch = _resume(Path(checkpoint), model, optimizer, scheduler, settings, device)
        if progress:
            progress(f"resumed from {checkpoint} after epoch {start_epoch}")

    result = TrainResult(epochs=start_epoch, steps=0)
    net.train()
    if steps is not None:
        losses = [_step(net, batch, optimizer, scheduler, teacher, distill, temperature, device)
                  for batch in _batches(dataset, batch_size, seed, data_parallel, steps)]
        result.steps = len(losses)
        result.final_loss = sum(losses) / max(1, len(losses))
    else:
        for epoch in range(start_epoch, epochs):  # type: ignore[arg-type]
            loader = _loader(dataset, batch_size, seed, epoch, data_parallel)
            losses = [_step(net, batch, optimizer, scheduler, teacher, distill, temperature, device)
                      for batch in loader]
            result.steps += len(losses)
            result.epochs = epoch + 1
            result.epoch_losses.append(sum(losses) / max(1, len(losses)))
            result.final_loss = result.epoch_losses[-1]
            if checkpoint is not None:
                _save_state(Path(checkpoint), model, optimizer, scheduler, epoch + 1, settings)
            if progress:
                progress(Counted(f"epoch {epoch + 1}/{epochs}: loss {result.final_loss:.4f}, "
                                 f"lr {scheduler.get_last_lr()[0]:.5f}", epoch + 1, epochs, "fine-tune"))
    model.eval()
    return result


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 256,
             device: Optional[torch.device] = None) -> float:
    """Top-1 accuracy of ``model`` on ``dataset``, in [0, 1] (the model is left in eval mode)."""
    correct, total = 0, 0
    for logits, labels in _predictions(model, dataset, batch_size, device):
        correct += int((logits.argmax(1) == labels).sum())
        total += len(labels)
    return correct / max(1, total)


@torch.no_grad()
def mean_loss(model: nn.Module, dataset: Dataset, batch_size: int = 256,
              device: Optional[torch.device] = None) -> float:
    """Mean cross-entropy of ``model`` on ``dataset`` (eval mode)."""
    loss_sum, total = 0.0, 0
    for logits, labels in _predictions(model, dataset, batch_size, device):
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        total += len(labels)
    return loss_sum / max(1, total)


def _predictions(model: nn.Module, dataset: Dataset, batch_size: int,
                 device: Optional[torch.device]) -> Iterator[Any]:
    device = device or distributed.device()
    model.to(device).eval()
    for images, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        yield model(images.to(device)).float().cpu(), labels


def _step(net: nn.Module, batch: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
          teacher: Optional[nn.Module], distill: float, temperature: float, device: torch.device) -> float:
    images, labels = batch[0].to(device), batch[1].to(device)
    logits = net(images)
    loss = F.cross_entropy(logits, labels)
    if distill > 0 and teacher is not None:
        with torch.no_grad():
            teacher_logits = teacher(images)
        loss = (1.0 - distill) * loss + distill * distillation_loss(logits, teacher_logits, temperature)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return float(loss.detach())


def _loader(dataset: Dataset, batch_size: int, seed: int, epoch: int, data_parallel: bool) -> DataLoader:
    """One epoch's shuffled batches; seeded so that a resumed run sees the same order."""
    if data_parallel:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True)
        sampler.set_epoch(epoch)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True)
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator,
                      drop_last=len(dataset) > batch_size)  # type: ignore[arg-type]


def _batches(dataset: Dataset, batch_size: int, seed: int, data_parallel: bool, steps: int) -> Iterator[Any]:
    """``steps`` batches, running through as many seeded epochs as needed."""
    taken, epoch = 0, 0
    while taken < steps:
        for batch in _loader(dataset, batch_size, seed, epoch, data_parallel):
            if taken == steps:
                return
            taken += 1
            yield batch
        epoch += 1


def _num_batches(dataset: Dataset, batch_size: int, data_parallel: bool) -> int:
    n = len(dataset)  # type: ignore[arg-type]
    if data_parallel:
        return max(1, (n // distributed.world_size()) // batch_size)
    return max(1, n // batch_size if n > batch_size else 1)


def _save_state(path: Path, model: nn.Module, optimizer: Any, scheduler: Any, epoch: int,
                settings: Dict[str, Any]) -> None:
    if distributed.is_main():
        with atomic_path(path) as tmp:
            torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "epoch": epoch, "settings": settings}, tmp)
    distributed.barrier()


def _resume(path: Path, model: nn.Module, optimizer: Any, scheduler: Any, settings: Dict[str, Any],
            device: torch.device) -> int:
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        raise UserError(f"training checkpoint {path} cannot be read ({err}); delete it to start over") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a dpcompress training checkpoint; delete it or choose another output")
    if state["settings"] != settings:
        raise UserError(f"training checkpoint {path} was made with other settings ({state['settings']}, now "
                        f"{settings}); delete it to start over")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"])
