import pytest

from tests.latency.helpers import trace_tiny_mobilenet


@pytest.fixture(scope="module")
def tiny_traced():
    """The zoo's tiny mobilenet_v2 traced at 16x16 (seeded weights), once per test module."""
    return trace_tiny_mobilenet()
