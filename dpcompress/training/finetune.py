"""Fine-tune a plan's network: activations removed, padding reordered, trained from the original weights.

The result is a checkpoint of the *reference* network (every conv and BatchNorm still
separate), which export merges exactly into one conv per block::

    {"format": "dpcompress-finetune/1", "model": spec, "plan": plan JSON,
     "chain_fingerprint": ..., "state_dict": reference_net.state_dict(), "epoch": n,
     "settings": {...}, "accuracy": {"holdout_before": ..., "holdout_after": ..., ...}}

Training state (model, optimizer, scheduler, epoch) is saved after every epoch in
``<name>.state.pt`` beside the output, so an interrupted run resumes; it is removed when the
final checkpoint is written. Under torchrun the network trains with DistributedDataParallel.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from dpcompress.training import distributed
from dpcompress.errors import UserError
from dpcompress.fileio import PathLike, atomic_path
from dpcompress.graph.plan import Plan, check_plan_against_chain, plan_from_json

FINETUNE_FORMAT = "dpcompress-finetune/1"


@dataclass(frozen=True)
class FinetuneSettings:
    epochs: int = 10
    lr: float = 0.01
    batch_size: int = 64
    distill: float = 0.0  # weight of knowledge distillation from the original model (paper: 0.3)
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise UserError("--epochs and --batch-size must be at least 1")
        if not 0.0 <= self.distill <= 1.0:
            raise UserError(f"--distill {self.distill} is outside [0, 1]")


@dataclass
class FinetuneResult:
    network: Any  # the fine-tuned reference network (nn.Module)
    accuracy: Dict[str, float] = field(default_factory=dict)  # holdout/test, before and after
    epoch_losses: list = field(default_factory=list)


def state_path_for(out: PathLike) -> Path:
    """``dir/<name>.pt`` -> ``dir/<name>.state.pt``: the per-epoch training state."""
    path = Path(out)
    return path.with_name(path.stem + ".state.pt")


def finetune(traced: Any, plan: Plan, data: Any, out: PathLike, settings: FinetuneSettings = FinetuneSettings(),
             *, model_spec: Optional[str] = None,
             progress: Optional[Callable[[str], None]] = None) -> FinetuneResult:
    """Train the plan's reference network on ``data.train`` and save the checkpoint ``out``.

    Under torchrun every rank must call this; rank 0 writes the files.
    """
    from dpcompress.graph.rewrite import reference_model
    from dpcompress.graph.trace import require_logits
    from dpcompress.training.train import evaluate, train

    distributed.init()
    chain = traced.chain
    check_plan_against_chain(plan, chain)
    require_logits(traced, "fine-tuning")
    network = reference_model(traced, plan)
    teacher = copy.deepcopy(traced.gm).eval() if settings.distill > 0 else None
    device = distributed.device()
    accuracy = {"original_holdout": evaluate(traced.gm, data.holdout, device=device),
                "holdout_before": evaluate(network, data.holdout, device=device)}
    key = {"chain_fingerprint": chain.fingerprint(), "activations": list(plan.activations),
           "boundaries": list(plan.boundaries), "seed": settings.seed, "temperature": settings.temperature}
    result = train(network, data.train, epochs=settings.epochs, lr=settings.lr, batch_size=settings.batch_size,
                   teacher=teacher, distill=settings.distill, temperature=settings.temperature,
                   seed=settings.seed, checkpoint=state_path_for(out), checkpoint_key=key, device=device,
                   progress=progress if distributed.is_main() else None)
    accuracy["holdout_after"] = evaluate(network, data.holdout, device=device)
    accuracy["test_after"] = evaluate(network, data.test, device=device)
    if distributed.is_main():
        import torch

        checkpoint = {
            "format": FINETUNE_FORMAT,
            "model": model_spec if model_spec is not None else chain.model,
            "plan": plan.to_json(),
            "chain_fingerprint": chain.fingerprint(),
            "state_dict": {k: v.detach().cpu() for k, v in network.state_dict().items()},
            "epoch": settings.epochs,
            "settings": asdict(settings),
            "data": getattr(data, "spec", None),
            "accuracy": accuracy,
        }
        with atomic_path(out) as tmp:
            torch.save(checkpoint, tmp)
        state_path_for(out).unlink(missing_ok=True)
    distributed.barrier()
    return FinetuneResult(network=network, accuracy=accuracy, epoch_losses=result.epoch_losses)


def read_checkpoint(path: PathLike) -> Dict[str, Any]:
    """The checkpoint dict of a ``dpcompress finetune`` output (UserError if it is not one)."""
    import torch

    if not Path(path).is_file():
        raise UserError(f"fine-tuned checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged or foreign file
        raise UserError(f"cannot read fine-tuned checkpoint {path} ({type(err).__name__}); "
                        "it must be written by `dpcompress finetune`") from err
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FINETUNE_FORMAT:
        raise UserError(f"{path} is not a `dpcompress finetune` checkpoint (format {FINETUNE_FORMAT!r})")
    return checkpoint


def load_finetuned(path: PathLike, traced: Any, plan: Plan) -> Any:
    """The fine-tuned reference network of ``plan``; UserError unless the checkpoint fits model and plan."""
    from dpcompress.graph.rewrite import reference_model

    checkpoint = read_checkpoint(path)
    chain = traced.chain
    if checkpoint.get("chain_fingerprint") != chain.fingerprint():
        raise UserError(f"checkpoint {path} was fine-tuned for another model (chain fingerprint "
                        f"{checkpoint.get('chain_fingerprint')}, this model has {chain.fingerprint()})")
    trained_plan = plan_from_json(checkpoint.get("plan"), f"{path} (its plan)")
    if (trained_plan.activations, trained_plan.boundaries) != (list(plan.activations), list(plan.boundaries)):
        raise UserError(f"checkpoint {path} was fine-tuned for another plan (activations "
                        f"{trained_plan.activations}, boundaries {trained_plan.boundaries}); "
                        "use the plan it was trained with or fine-tune again")
    network = reference_model(traced, plan)
    try:
        network.load_state_dict(checkpoint["state_dict"])
    except (KeyError, RuntimeError) as err:
        raise UserError(f"checkpoint {path} does not fit the plan's network: {str(err).splitlines()[0]}") from err
    return network.eval()
