"""The models the graph, merge and pipeline tests trace: small hand-written networks with the structures
that matter (residuals, a squeeze-excitation gate, strided convs whose merged kernel outgrows its input),
the torchvision models traced without model-specific code, and zoo models with calibrated BatchNorm."""

from __future__ import annotations

from typing import Tuple

import torch.nn as nn

from dpcompress.graph.trace import TracedModel, trace_model
from dpcompress.models import build_model
from tests.bn_calibration import calibrate_batchnorm, randomize_batchnorm_affine

TORCHVISION_MODELS = ["mobilenet_v2", "mobilenet_v2?width_mult=1.4", "vgg19_bn", "vgg11", "resnet18", "resnet50",
                      "efficientnet_b0", "mobilenet_v3_large", "mnasnet1_0", "regnet_x_400mf"]


class TinyResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU6())
        self.b = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6())
        self.c = nn.Sequential(nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8))
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 8, 1), nn.Sigmoid())
        self.d = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.c(self.b(self.a(x)))
        x = x * self.gate(x)  # squeeze-excitation: the gate's conv is not on the trunk
        return self.d(x)


class Strided(nn.Module):
    """Stride-2 convs around an identity residual: merged whole, a 31x31 kernel of stride 4."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8))
        self.act = nn.ReLU()
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.wide = nn.Sequential(nn.Conv2d(16, 16, 5, padding=2), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        x = self.act(x + self.b(self.a(x)))
        return self.head(self.wide(self.down(x))).mean((2, 3))


def traced_strided(size: Tuple[int, int]) -> TracedModel:
    model = Strided()
    randomize_batchnorm_affine(model)
    calibrate_batchnorm(model, (4, 3, *size))
    return trace_model(model, (1, 3, *size))


def calibrated(model: nn.Module, size: int) -> nn.Module:
    randomize_batchnorm_affine(model)
    return calibrate_batchnorm(model, (4, 3, size, size))


def traced_zoo(spec: str, size: int = 32) -> TracedModel:
    return trace_model(calibrated(build_model(spec), size), (1, 3, size, size), spec=spec)
