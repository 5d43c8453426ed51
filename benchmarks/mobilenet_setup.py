"""The network most benchmarks here measure: mobilenet_v2, seed-0 random weights, traced at 224x224."""

from __future__ import annotations

from typing import TYPE_CHECKING, Tuple

import torch

from dpcompress.graph.trace import trace_model
from dpcompress.models import build_model

if TYPE_CHECKING:  # pragma: no cover
    from dpcompress.graph.trace import TracedModel

SPEC = "torchvision:mobilenet_v2"
SHAPE = (1, 3, 224, 224)


def mobilenet_v2() -> Tuple[torch.nn.Module, "TracedModel"]:
    """The model (eval mode, weights from ``torch.manual_seed(0)``) and its trace at ``SHAPE``."""
    torch.manual_seed(0)
    model = build_model(SPEC, None).eval()
    return model, trace_model(model, SHAPE, spec=SPEC)
