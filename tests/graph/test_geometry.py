"""Cropping rule of merged kernels against brute force over every possible crop; merged geometry with
pruned convs; pruning options against brute force over every pruned set."""

from __future__ import annotations

import itertools
from typing import Dict, Set, Tuple

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dpcompress.graph.chain import Chain, ConvUnit, Residual
from dpcompress.graph.geometry import MAX_PRUNING_OPTIONS, block_geometry, crop_taps, pruning_options


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


def test_pruned_convs_are_identity_in_the_merged_geometry(torchvision_chain) -> None:
    resnet = torchvision_chain("resnet18")
    assert block_geometry(resnet, 1, 5).composed_kernel == (9, 9)
    assert block_geometry(resnet, 1, 5, (3, 5)).composed_kernel == (5, 5)
    assert block_geometry(resnet, 5, 7, (7,)).kernel == (3, 3)  # the stride-2 conv stays
    whole = block_geometry(resnet, 1, 2, (2,))
    assert whole.identity and (whole.in_channels, whole.kernel, whole.groups, whole.bias) == (64, (1, 1), 64, False)
    with pytest.raises(ValueError, match="cannot be pruned"):
        block_geometry(resnet, 5, 7, (6,))
    with pytest.raises(ValueError, match="not in block"):
        block_geometry(resnet, 1, 3, (4,))


def brute_force_options(chain: Chain, start: int, end: int) -> Dict[tuple, Tuple[int, ...]]:
    """Every subset of the block's reducible convs, by merged conv: the one pruning the fewest convs,
    then the fewest weights, then the latest convs."""
    reducible = [p for p in range(start + 1, end + 1) if chain.unit(p).reducible]

    def weights(p: int) -> int:
        u = chain.unit(p)
        return u.out_channels * u.in_channels // u.groups * u.kernel[0] * u.kernel[1]

    best: Dict[tuple, Tuple[int, ...]] = {}
    for n in range(len(reducible) + 1):
        for pruned in itertools.combinations(reducible, n):
            cost = (n, sum(map(weights, pruned)), tuple(-p for p in reversed(pruned)))
            key = block_geometry(chain, start, end, pruned).conv_key
            if key not in best or cost < best[key][0]:
                best[key] = (cost, pruned)
    return {key: pruned for key, (_, pruned) in best.items()}


def grouped_chain() -> Chain:
    """Six convs on 8 channels at 6x6: grouped, depthwise, dense and 1x1 convs, all reducible but the
    stride-2 fifth; an identity residual over convs 2 and 3."""
    def unit(position: int, kernel: int, groups: int, stride: int = 1, size: int = 6) -> ConvUnit:
        out = (size + 2 * (kernel // 2) - kernel) // stride + 1
        return ConvUnit(position=position, name=f"c{position}", in_channels=8, out_channels=8,
                        kernel=(kernel, kernel), stride=(stride, stride), padding=(kernel // 2, kernel // 2),
                        dilation=(1, 1), groups=groups, bias=False, in_shape=(1, 8, size, size),
                        out_shape=(1, 8, out, out), batchnorm=f"b{position}", linked=position > 1)
    units = [unit(1, 3, 2), unit(2, 3, 8), unit(3, 1, 4), unit(4, 5, 1), unit(5, 3, 4, stride=2), unit(6, 3, 2, size=3)]
    return Chain(model=None, input_shape=(1, 8, 6, 6), units=units, residuals=[Residual(1, 3)])


def test_pruning_options_list_one_set_per_merged_conv_as_brute_force_does(torchvision_chain) -> None:
    for chain in (grouped_chain(), torchvision_chain("resnet18")):
        for start, end in chain.valid_blocks():
            options = pruning_options(chain, start, end)
            expected = brute_force_options(chain, start, end)
            assert options[0] == ()
            if len(expected) <= MAX_PRUNING_OPTIONS + 1:
                assert sorted(options) == sorted(expected.values()), (start, end)
            else:
                assert len(options) == MAX_PRUNING_OPTIONS + 1 and set(options) <= set(expected.values())


def test_pruning_options_are_distinct_and_few(torchvision_chain) -> None:
    for name in ("mobilenet_v2", "regnet_x_400mf"):
        chain = torchvision_chain(name)
        reducible = set(chain.reducible_positions())
        for start, end in chain.valid_blocks():
            options = pruning_options(chain, start, end)
            assert options[0] == () and len(options) <= MAX_PRUNING_OPTIONS + 1
            assert all(set(o) <= reducible and all(start < p <= end for p in o) for o in options)
            keys = [block_geometry(chain, start, end, o).conv_key for o in options]
            assert len(set(keys)) == len(keys), (name, start, end)
