"""Shared by the data/train/importance/finetune tests: a tiny MobileNetV2 trained on 16x16 digits.

Training takes a few seconds, so it happens once per test session (cached in this module).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any, Dict

import torch

from dpcompress import zoo
from dpcompress.training.data import DataBundle, load_data

TINY_SPEC = "dpcompress.zoo:tiny_mobilenet_v2"
SIZE = 16
INPUT_SHAPE = (1, 3, SIZE, SIZE)
INPUT_SHAPE_ARG = f"1,3,{SIZE},{SIZE}"


@functools.lru_cache(maxsize=None)
def digits16() -> DataBundle:
    return load_data("digits", (SIZE, SIZE))


@functools.lru_cache(maxsize=None)
def _trained_state() -> Dict[str, Any]:
    from dpcompress.training.train import train

    torch.manual_seed(0)
    model = zoo.tiny_mobilenet_v2()
    train(model, digits16().train, epochs=3, lr=0.2, batch_size=32, seed=0)
    return copy.deepcopy(model.state_dict())


def trained_tiny() -> torch.nn.Module:
    """A fresh copy of the trained tiny model, in eval mode."""
    model = zoo.tiny_mobilenet_v2()
    model.load_state_dict(_trained_state())
    return model.eval()


def save_trained_tiny(path: Path) -> Path:
    torch.save(_trained_state(), path)
    return path
