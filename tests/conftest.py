"""Fixtures every test can use. Helpers shared by several test modules live in modules of their own at
tests/ (models_for_tests, random_plans, merge_checks, conv_specs, pruning_instances, cli_helpers, ...);
test modules import from those, never from each other."""

import functools

import pytest

from tests.cli_helpers import workdir  # noqa: F401 (a fixture: a folder holding a model file and a plan)


@functools.lru_cache(maxsize=None)
def _torchvision_traced(spec: str, size: int):
    import torch

    from tests.bn_calibration import calibrate_batchnorm, randomize_batchnorm_affine
    from dpcompress.models import build_model
    from dpcompress.graph.trace import trace_model

    # Seeded, so that the weights, and with them the float64 round-off the merge tests bound, do not depend
    # on which tests ran first: efficientnet_b0's pruned merge is off its reference by 1e-12 to 7e-8 of its
    # scale (the bound is 1e-7) depending on the weights drawn.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model(f"torchvision:{spec}")
    randomize_batchnorm_affine(model)
    calibrate_batchnorm(model, (4, 3, size, size))
    return trace_model(model, (1, 3, size, size), spec=f"torchvision:{spec}")


@pytest.fixture(scope="session")
def torchvision_traced():
    """Trace a torchvision model (random weights, calibrated BatchNorm) once per session, at 64x64."""
    return lambda name, size=64: _torchvision_traced(name, size)


@pytest.fixture(scope="session")
def torchvision_chain(torchvision_traced):
    return lambda name, size=64: torchvision_traced(name, size).chain
