"""Small MobileNetV2-style models for the built-in digits data (32x32 inputs).

Use them as ``--model dpcompress.zoo:digits_mobilenet_v2`` (keyword arguments after ``?``).
The code follows torchvision's MobileNetV2 (Conv-BN-ReLU6 units, inverted residuals with an
identity shortcut where shapes allow) so that torch.fx traces it and the tracer finds the same
structure it finds in torchvision models.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import nn


class ConvBNAct(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 activation: bool = True) -> None:
        layers: List[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        if activation:
            layers.append(nn.ReLU6(inplace=True))
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when expand_ratio is 1), 3x3 depthwise, 1x1 linear project."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_ch * expand_ratio
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct(in_ch, hidden, kernel=1))
        layers += [ConvBNAct(hidden, hidden, stride=stride, groups=hidden),
                   ConvBNAct(hidden, out_ch, kernel=1, activation=False)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class SmallMobileNetV2(nn.Module):
    def __init__(self, stem: int, settings: Sequence[Tuple[int, int, int, int]], last: int,
                 num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        layers: List[nn.Module] = [ConvBNAct(3, stem)]  # stride 1: 32x32 inputs are small already
        in_ch = stem
        for expand_ratio, out_ch, repeats, stride in settings:
            for index in range(repeats):
                layers.append(InvertedResidual(in_ch, out_ch, stride if index == 0 else 1, expand_ratio))
                in_ch = out_ch
        layers.append(ConvBNAct(in_ch, last, kernel=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1)
        return self.classifier(torch.flatten(x, 1))


def _channels(base: int, width: float) -> int:
    return max(4, int(round(base * width)))


def digits_mobilenet_v2(num_classes: int = 10, width: float = 1.0, dropout: float = 0.1) -> SmallMobileNetV2:
    """22 convolutions: stem, a t=1 block, six t=4 blocks over three stride-2 stages, a 1x1 head."""
    settings = [(1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 48, 2, 2)]
    scaled = [(t, _channels(c, width), n, s) for t, c, n, s in settings]
    return SmallMobileNetV2(_channels(16, width), scaled, _channels(128, width), int(num_classes), float(dropout))


def tiny_mobilenet_v2(num_classes: int = 10, width: float = 1.0) -> SmallMobileNetV2:
    """10 convolutions, 8-16 channels: for fast tests (one identity residual, one stride-2 stage)."""
    settings = [(1, 8, 1, 1), (2, 8, 1, 1), (2, 12, 1, 2)]
    scaled = [(t, _channels(c, width), n, s) for t, c, n, s in settings]
    return SmallMobileNetV2(_channels(8, width), scaled, _channels(16, width), int(num_classes))


class BasicBlock(nn.Module):
    """Two 3x3 Conv-BN units, the second without activation, then the shortcut add and a ReLU.

    The shortcut is the identity where shapes allow, else a strided 1x1 Conv-BN (a fixed barrier
    for merging). Each ReLU is its own module (torchvision's ResNet shares one), so that every
    activation the tracer finds is a module of its own.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = nn.Sequential()  # the identity, where shapes allow
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.downsample(x))


class SmallResNet(nn.Module):
    def __init__(self, stem: int, stages: Sequence[Tuple[int, int, int]], num_classes: int) -> None:
        super().__init__()
        layers: List[nn.Module] = [nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True)]
        in_ch = stem
        for out_ch, repeats, stride in stages:
            for index in range(repeats):
                layers.append(BasicBlock(in_ch, out_ch, stride if index == 0 else 1))
                in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


def digits_resnet(num_classes: int = 10, width: float = 1.0) -> SmallResNet:
    """15 convolutions, ResNet-14 for 32x32: a stride-1 stem and three stages of two basic blocks
    (16, 32, 64 channels; the second and third begin with a stride-2 block whose shortcut is a 1x1 conv)."""
    stages = [(16, 2, 1), (32, 2, 2), (64, 2, 2)]
    scaled = [(_channels(c, width), n, s) for c, n, s in stages]
    return SmallResNet(_channels(16, width), scaled, int(num_classes))
