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
