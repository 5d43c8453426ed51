"""The digits models that the benchmarks compress: trained once, seeded, then reloaded."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset

from dpcompress import zoo
from dpcompress.training.train import train

SPEC = "dpcompress.zoo:digits_mobilenet_v2"


def run_log(out: Path) -> Callable[[str], None]:
    """A ``say`` for a benchmark run: each line printed and appended to ``out``/log.txt at once."""
    log = open(out / "log.txt", "a")

    def say(line: str) -> None:
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    return say


def trained_digits_model(weights: Path, train_set: Dataset, epochs: int,
                         factory: Callable[[], torch.nn.Module] = zoo.digits_mobilenet_v2, seed: int = 0,
                         ) -> "tuple[torch.nn.Module, bool]":
    """The model ``factory`` builds, with the weights at ``weights`` if that file exists, else trained
    (SGD lr 0.1 cosine, ``seed``) and saved there.

    Returns the model in eval mode and whether it was trained now.
    """
    torch.manual_seed(seed)  # the initial weights too: train() seeds only the data order and dropout
    model = factory()
    trained = not weights.exists()
    if trained:
        train(model, train_set, epochs=epochs, lr=0.1, seed=seed)
        torch.save(model.state_dict(), weights)
    else:
        model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval(), trained
