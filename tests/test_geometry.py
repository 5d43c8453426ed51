"""Cropping rule of merged kernels against brute force over every possible crop."""

from __future__ import annotations

from typing import Set

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dpcompress.graph.geometry import crop_taps


def outputs(kernel: int, stride: int, padding: int, size: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def taps_meeting_input(kernel: int, stride: int, padding: int, size: int) -> Set[int]:
    """Taps t that read a real input pixel (not padding) for some output."""
    n = outputs(kernel, stride, padding, size)
    return {t for t in range(kernel) for o in range(n) if 0 <= o * stride + t - padding < size}


def exact_crop(kernel: int, stride: int, padding: int, size: int, lead: int, trail: int) -> bool:
    """Dropping lead/trail taps with padding ``padding - lead`` on both sides gives the same outputs."""
    if lead > padding or lead + trail >= kernel:
        return False
    dropped = set(range(lead)) | set(range(kernel - trail, kernel))
    same_count = outputs(kernel - lead - trail, stride, padding - lead, size) == outputs(kernel, stride, padding, size)
    return same_count and not dropped & taps_meeting_input(kernel, stride, padding, size)


@settings(max_examples=400, deadline=None)
@given(kernel=st.integers(1, 24), stride=st.integers(1, 5), padding=st.integers(0, 12), size=st.integers(1, 20))
def test_crop_taps_is_the_largest_exact_crop(kernel: int, stride: int, padding: int, size: int) -> None:
    assume(outputs(kernel, stride, padding, size) >= 1)
    lead, trail = crop_taps(kernel, stride, padding, size)
    if not taps_meeting_input(kernel, stride, padding, size):
        assert (lead, trail) == (0, 0)  # the output is bias alone: left as it is
        return
    assert exact_crop(kernel, stride, padding, size, lead, trail)
    best = max(a + b for a in range(kernel) for b in range(kernel)
               if exact_crop(kernel, stride, padding, size, a, b))
    assert lead + trail == best


def test_kernel_overhanging_both_ends_keeps_only_what_the_outputs_read() -> None:
    # mobilenet_v2 at 64x64: a 299-tap merged kernel of stride 32 on a 64-pixel input (2 outputs)
    # needs 64 + 32 taps, one value of padding on both sides.
    lead, trail = crop_taps(299, 32, 149, 64)
    assert 299 - lead - trail == 96 and 149 - lead == 32
    assert crop_taps(3, 1, 1, 7) == (0, 0)  # an ordinary conv keeps its kernel
    assert crop_taps(3, 1, 1, 1) == (1, 1)  # a 3x3 conv on a 1x1 input is a 1x1 conv


def test_crop_taps_rejects_an_input_with_no_output() -> None:
    with pytest.raises(ValueError, match="no output"):
        crop_taps(7, 1, 1, 3)
