"""Import torchvision even where its compiled ops do not match the installed torch.

A torchvision wheel built for CUDA, imported on a CPU-only torch, fails at import
time with ``operator torchvision::nms does not exist``: its Python code registers
fake (meta) kernels for ``torchvision::nms`` and ``torchvision::qnms`` whose
schemas the missing C++ library would have defined. The model definitions are
pure Python, so defining those two schemas first is enough to use them. Where
torchvision's own library loaded (the normal case) this does nothing.
"""

from __future__ import annotations

import importlib
from types import ModuleType

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


def import_torchvision() -> ModuleType:
    """Return the torchvision module, defining missing op schemas first if needed."""
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
    _define_missing_ops()
    for name in [m for m in list(importlib.sys.modules) if m == "torchvision" or m.startswith("torchvision.")]:
        del importlib.sys.modules[name]  # drop the half-imported package before retrying
    return importlib.import_module("torchvision")
