"""Import torchvision even where its compiled ops do not match the installed torch.

A torchvision wheel built for CUDA, imported on a CPU-only torch, fails at import
time with ``operator torchvision::nms does not exist``: its Python code registers
fake (meta) kernels for ``torchvision::nms`` and ``torchvision::qnms`` whose
schemas the missing C++ library would have defined. The model definitions are
pure Python, so defining those two schemas first is enough to build them. Running a
detector also needs non-maximum suppression, which has no Python fallback in
torchvision (RoIAlign has one): where the compiled ops are missing, ``nms`` is
replaced by a plain-torch version, so detection models run end to end (slower in
post-processing than the compiled op). Where torchvision's own library loaded (the
normal case) this does nothing.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

# Schemas as torchvision's C++ library declares them (torchvision/csrc/ops/nms.cpp).
_MISSING_OP_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_fallback_library = None  # keeps the torch.library.Library alive (dropping it unregisters)


def _define_missing_ops() -> None:
    global _fallback_library
    import torch

    missing = [name for name in _MISSING_OP_SCHEMAS if not _op_exists(torch, name)]
    if not missing:
        return
    _fallback_library = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        _fallback_library.define(_MISSING_OP_SCHEMAS[name])


def _op_exists(torch: ModuleType, name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def nms_reference(boxes: "torch.Tensor", scores: "torch.Tensor", iou_threshold: float) -> "torch.Tensor":
    """Greedy non-maximum suppression as ``torchvision.ops.nms`` defines it: indices of the kept boxes
    (x1, y1, x2, y2), by decreasing score."""
    import numpy as np
    import torch

    order = scores.argsort(descending=True)
    ordered = boxes[order].detach().cpu().double().numpy()
    area = np.clip(ordered[:, 2:] - ordered[:, :2], 0, None).prod(axis=1)
    suppressed = np.zeros(len(ordered), dtype=bool)
    # One row of IoUs per kept box, in numpy: memory stays linear in the boxes (detectors with random
    # weights pass tens of thousands) and each step costs microseconds, not a torch dispatch.
    for index in range(len(ordered)):
        if suppressed[index]:
            continue
        rest = ordered[index + 1:]
        top_left = np.maximum(ordered[index, :2], rest[:, :2])
        bottom_right = np.minimum(ordered[index, 2:], rest[:, 2:])
        inter = np.clip(bottom_right - top_left, 0, None).prod(axis=1)
        iou = inter / (area[index] + area[index + 1:] - inter)
        suppressed[index + 1:] |= iou > iou_threshold
    return order[torch.from_numpy(np.flatnonzero(~suppressed))]


def _use_reference_nms(torchvision: ModuleType) -> None:
    if torchvision.extension._has_ops():
        return
    import torchvision.ops.boxes as boxes

    boxes.nms = nms_reference  # batched_nms looks nms up in this module
    torchvision.ops.nms = nms_reference


def import_torchvision() -> ModuleType:
    """Return the torchvision module, defining missing op schemas (and a plain-torch nms) if needed."""
    try:
        torchvision = importlib.import_module("torchvision")
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
        _define_missing_ops()
        for name in [m for m in list(importlib.sys.modules) if m == "torchvision" or m.startswith("torchvision.")]:
            del importlib.sys.modules[name]  # drop the half-imported package before retrying
        torchvision = importlib.import_module("torchvision")
    _use_reference_nms(torchvision)
    return torchvision
