"""Ultralytics YOLO detection models for the tests that need them, built from the package's YAML (random
weights, nothing downloaded). Ultralytics is AGPL-3.0, so it is no dependency of dpcompress: the tests install
it as the test-only extra (``make install-yolo-tests``) and skip without it."""

from __future__ import annotations

import importlib.util
import os
import tempfile

import pytest
import torch
import torch.nn as nn

from tests.bn_calibration import calibrate_batchnorm, randomize_batchnorm_affine

needs_ultralytics = pytest.mark.skipif(importlib.util.find_spec("ultralytics") is None,
                                       reason="ultralytics is not installed (make install-yolo-tests)")


def yolo(config: str, size: int) -> nn.Module:
    """``DetectionModel(config)`` (``yolov8n.yaml``, ``yolo11n.yaml``) with seeded weights and BatchNorm
    statistics calibrated at ``size`` x ``size``, in eval mode."""
    from dpcompress.tv_compat import import_torchvision

    import_torchvision()  # ultralytics imports torchvision: its missing op schemas must be defined first
    os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="ultralytics_"))  # its settings file
    from ultralytics.nn.tasks import DetectionModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = DetectionModel(config, verbose=False)
    randomize_batchnorm_affine(model)
    return calibrate_batchnorm(model, (4, 3, size, size))
