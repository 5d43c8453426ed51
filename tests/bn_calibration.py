"""Give random-init models realistic BatchNorm statistics, so outputs have meaningful magnitudes.

A freshly initialised network has running_mean 0 and running_var 1 in every BatchNorm,
so activations can shrink or blow up layer after layer. Structure, latency and merge
checks use random weights; calibrating the statistics on random inputs keeps their
outputs well scaled (and gives the BatchNorm folds something non-trivial to do).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


def randomize_batchnorm_affine(model: nn.Module, seed: int = 0) -> None:
    """Draw BatchNorm weights and biases at random (instead of 1 and 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=generator))


def calibrate_batchnorm(model: nn.Module, input_shape: Sequence[int], batches: int = 2, seed: int = 0) -> nn.Module:
    """Set every BatchNorm's running statistics from random inputs; returns the model in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    generator = torch.Generator().manual_seed(seed)
    shape = (max(int(input_shape[0]), 4), *input_shape[1:])
    model.train()
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(*shape, generator=generator, dtype=dtype))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return model.eval()
