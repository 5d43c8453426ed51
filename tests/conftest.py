import functools

import pytest


@functools.lru_cache(maxsize=None)
def _torchvision_traced(spec: str, size: int):
    from tests.bn_calibration import calibrate_batchnorm, randomize_batchnorm_affine
    from dpcompress.models import build_model
    from dpcompress.graph.trace import trace_model

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
