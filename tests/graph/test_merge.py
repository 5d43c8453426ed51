"""Merge math against running the convs one after another (float64, padding applied once at the input)."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dpcompress.graph import merge
from dpcompress.graph.chain import Chain, ConvUnit, Residual
from dpcompress.graph.geometry import (block_geometry, compose_connectivity, composed_connectivity, composition_cost,
                                       connectivity, crop_taps, largest_exact_groups)
from tests.conv_specs import (FEWER, SETTINGS, Spec, conv_chains, conv_specs, divisors, min_input, random_input,
                              run_sequence, total_padding)


def structural_groups(specs: Sequence[Spec]) -> int:
    mask = connectivity(specs[0].in_channels, specs[0].out_channels, specs[0].groups)
    for spec in specs[1:]:
        mask = compose_connectivity(mask, connectivity(spec.in_channels, spec.out_channels, spec.groups))
    return largest_exact_groups(mask)


@SETTINGS
@given(specs=conv_chains(), extra=st.tuples(st.integers(0, 4), st.integers(0, 4)), seed=st.integers(0, 1000))
def test_composed_conv_equals_sequence(specs: List[Spec], extra: Tuple[int, int], seed: int) -> None:
    height, width = min_input(specs, 0) + extra[0], min_input(specs, 1) + extra[1]
    x = random_input(specs[0].in_channels, height, width, seed)
    expected = run_sequence(specs, x)
    merged = merge.compose_all([s.affine() for s in specs])
    got = merge.apply(merged, x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert merged.padding == total_padding(specs)
    stride = (int(np.prod([s.stride[0] for s in specs])), int(np.prod([s.stride[1] for s in specs])))
    assert merged.stride == stride
    assert merged.groups == structural_groups(specs)
    # Shape formula: out = floor((H + 2P - K) / S) + 1 matches the sequential run.
    for axis, size in ((0, height), (1, width)):
        out = (size + 2 * merged.padding[axis] - merged.kernel[axis]) // merged.stride[axis] + 1
        assert out == expected.shape[2 + axis]


@SETTINGS
@given(first=st.data())
def test_pairwise_compose_kernel_formula(first: st.DataObject) -> None:
    a = first.draw(conv_specs(first.draw(st.sampled_from([1, 2, 4]))))
    b = first.draw(conv_specs(a.out_channels))
    merged = merge.compose(a.affine(), b.affine())
    for axis in range(2):
        assert merged.kernel[axis] == a.extent(axis) + a.stride[axis] * (b.extent(axis) - 1)
        assert merged.padding[axis] == a.padding[axis] + a.stride[axis] * b.padding[axis]
    assert merged.weight.dtype == torch.float64


@SETTINGS
@given(channels=st.integers(1, 12), length=st.integers(2, 4), data=st.data())
def test_depthwise_chain_stays_depthwise(channels: int, length: int, data: st.DataObject) -> None:
    specs = []
    for _ in range(length):
        spec = data.draw(conv_specs(channels, out_channels=channels))
        specs.append(Spec(spec.weight[:, :1].contiguous() if spec.groups != channels else spec.weight, spec.bias,
                          spec.stride, spec.padding, spec.dilation, channels))
    merged = merge.compose_all([s.affine() for s in specs])
    assert merged.groups == channels
    assert merged.weight.shape[:2] == (channels, 1)
    x = random_input(channels, min_input(specs, 0) + 1, min_input(specs, 1) + 2, 0)
    torch.testing.assert_close(merge.apply(merged, x), run_sequence(specs, x), rtol=1e-10, atol=1e-10)


def test_depthwise_multiplier_then_grouped_keeps_groups() -> None:
    generator = torch.Generator().manual_seed(0)
    multiplier = Spec(torch.randn(8, 1, 3, 3, generator=generator, dtype=torch.float64), None, (1, 1), (1, 1),
                      (1, 1), 4)
    grouped = Spec(torch.randn(4, 4, 3, 3, generator=generator, dtype=torch.float64), None, (2, 2), (1, 1),
                   (1, 1), 2)
    merged = merge.compose(multiplier.affine(), grouped.affine())
    assert merged.groups == 2 == structural_groups([multiplier, grouped])
    x = random_input(4, 9, 10, 1)
    torch.testing.assert_close(merge.apply(merged, x), run_sequence([multiplier, grouped], x))


def test_overlapping_groups_become_dense() -> None:
    # 2 groups of 3 then 3 groups of 2: middle group {2, 3} reads both input halves.
    generator = torch.Generator().manual_seed(0)
    a = Spec(torch.randn(6, 3, 1, 1, generator=generator, dtype=torch.float64), None, (1, 1), (0, 0), (1, 1), 2)
    b = Spec(torch.randn(6, 2, 1, 1, generator=generator, dtype=torch.float64), None, (1, 1), (0, 0), (1, 1), 3)
    merged = merge.compose(a.affine(), b.affine())
    assert merged.groups == 1
    x = random_input(6, 3, 3, 2)
    torch.testing.assert_close(merge.apply(merged, x), run_sequence([a, b], x))


@settings(max_examples=300, deadline=None)
@given(mid=st.sampled_from([1, 2, 3, 4, 6, 8, 12]), data=st.data())
def test_composed_connectivity_equals_channel_product(mid: int, data: st.DataObject) -> None:
    first_groups = data.draw(st.sampled_from(divisors(mid)))
    second_groups = data.draw(st.sampled_from(divisors(mid)))
    in_channels = first_groups * data.draw(st.integers(1, 3))
    out_channels = second_groups * data.draw(st.integers(1, 3))
    expected = compose_connectivity(connectivity(in_channels, mid, first_groups),
                                    connectivity(mid, out_channels, second_groups))
    got = composed_connectivity(in_channels, mid, out_channels, first_groups, second_groups)
    np.testing.assert_array_equal(got, expected)


@st.composite
def residual_chains(draw) -> Tuple[List[Spec], List[Spec], List[Spec]]:
    """pre convs, a stride-1 residual body f (in == out, identity tap inside its kernel), post convs."""
    channels = draw(st.sampled_from([1, 2, 3, 4]))
    pre = []
    for _ in range(draw(st.integers(0, 2))):
        pre.append(draw(conv_specs(channels)))
        channels = pre[-1].out_channels
    body = []
    mid = channels
    length = draw(st.integers(1, 3))
    for i in range(length):
        spec = draw(conv_specs(mid, out_channels=channels if i == length - 1 else None, stride_one=True))
        # Keep the body's padding left of its kernel's end so the identity tap is a kernel tap.
        spec.padding = (min(spec.padding[0], spec.extent(0) - 1), min(spec.padding[1], spec.extent(1) - 1))
        body.append(spec)
        mid = spec.out_channels
    post = []
    for _ in range(draw(st.integers(0, 2))):
        post.append(draw(conv_specs(channels)))
        channels = post[-1].out_channels
    return pre, body, post


@SETTINGS
@given(chain=residual_chains(), extra=st.tuples(st.integers(0, 3), st.integers(0, 3)), seed=st.integers(0, 1000))
def test_identity_absorption_equals_residual(chain, extra: Tuple[int, int], seed: int) -> None:
    pre, body, post = chain
    specs = pre + body + post
    height, width = min_input(specs, 0) + extra[0], min_input(specs, 1) + extra[1]
    x = random_input(specs[0].in_channels, height, width, seed)
    # The padding-reordered network: pad by the whole run's padding once, run every conv
    # unpadded, and add the shortcut cropped by the residual body's own padding.
    ph, pw = total_padding(specs)
    z = F.pad(x, (pw, pw, ph, ph))
    for spec in pre:
        z = spec.run_unpadded(z)
    fz = z
    for spec in body:
        fz = spec.run_unpadded(fz)
    ch, cw = total_padding(body)
    y = fz + z[:, :, ch:ch + fz.shape[2], cw:cw + fz.shape[3]]
    for spec in post:
        y = spec.run_unpadded(y)

    body_merged = merge.add_identity(merge.compose_all([s.affine() for s in body]))
    merged = merge.compose_all([s.affine() for s in pre] + [body_merged] + [s.affine() for s in post])
    got = merge.apply(merged, x)
    assert got.shape == y.shape
    torch.testing.assert_close(got, y, rtol=1e-10, atol=1e-10)


def _unit(position: int, spec: Spec, in_hw: Tuple[int, int], linked: bool) -> Tuple[ConvUnit, Tuple[int, int]]:
    out_hw = tuple((in_hw[a] + 2 * spec.padding[a] - spec.extent(a)) // spec.stride[a] + 1 for a in range(2))
    unit = ConvUnit(
        position=position, name=f"conv{position}", in_channels=spec.in_channels, out_channels=spec.out_channels,
        kernel=tuple(spec.weight.shape[2:]), stride=spec.stride, padding=spec.padding, dilation=spec.dilation,
        groups=spec.groups, bias=spec.bias is not None,
        in_shape=(1, spec.in_channels, *in_hw), out_shape=(1, spec.out_channels, *out_hw), linked=linked,
    )
    return unit, out_hw  # type: ignore[return-value]


@SETTINGS
@given(chain=residual_chains(), extra=st.tuples(st.integers(0, 3), st.integers(0, 3)))
def test_matches_block_geometry(chain, extra: Tuple[int, int]) -> None:
    pre, body, post = chain
    specs = pre + body + post
    in_hw = (min_input(specs, 0) + extra[0], min_input(specs, 1) + extra[1])
    hw = in_hw
    units = []
    for position, spec in enumerate(specs, start=1):
        unit, hw = _unit(position, spec, hw, linked=position > 1)
        units.append(unit)
    residual = Residual(len(pre), len(pre) + len(body))
    geometry = block_geometry(Chain(model=None, input_shape=units[0].in_shape, units=units, residuals=[residual]),
                              0, len(specs))
    body_merged = merge.add_identity(merge.compose_all([s.affine() for s in body]))
    composed = merge.compose_all([s.affine() for s in pre] + [body_merged] + [s.affine() for s in post])
    assert composed.kernel == geometry.composed_kernel
    merged = merge.crop_to_input(composed, in_hw)  # small inputs: often cropped
    assert merged.kernel == geometry.kernel
    assert merged.stride == geometry.stride
    assert merged.padding == geometry.padding
    assert merged.groups == geometry.groups
    assert (merged.in_channels, merged.out_channels) == (geometry.in_channels, geometry.out_channels)


@SETTINGS
@given(data=st.data(), seed=st.integers(0, 1000))
def test_crop_to_input_keeps_the_output(data: st.DataObject, seed: int) -> None:
    spec = data.draw(conv_specs(data.draw(st.sampled_from([1, 2, 4]))))
    spec.padding = (data.draw(st.integers(0, 6)), data.draw(st.integers(0, 6)))
    size = tuple(max(1, spec.extent(a) - 2 * spec.padding[a]) + data.draw(st.integers(0, 4)) for a in range(2))
    conv = spec.affine()
    x = random_input(conv.in_channels, size[0], size[1], seed)
    cropped = merge.crop_to_input(conv, size)
    torch.testing.assert_close(merge.apply(cropped, x), merge.apply(conv, x), rtol=1e-10, atol=1e-10)
    for axis in range(2):
        lead, trail = crop_taps(conv.kernel[axis], conv.stride[axis], conv.padding[axis], size[axis])
        assert cropped.kernel[axis] == conv.kernel[axis] - lead - trail
        assert cropped.padding[axis] == conv.padding[axis] - lead


@FEWER
@given(specs=conv_chains(), extra=st.tuples(st.integers(0, 2), st.integers(0, 2)), seed=st.integers(0, 1000))
def test_cropped_composition_equals_sequence(specs: List[Spec], extra: Tuple[int, int], seed: int) -> None:
    height, width = min_input(specs, 0) + extra[0], min_input(specs, 1) + extra[1]
    x = random_input(specs[0].in_channels, height, width, seed)
    composed = merge.compose_all([s.affine() for s in specs])
    merged = merge.crop_to_input(composed, (height, width))
    torch.testing.assert_close(merge.apply(merged, x), run_sequence(specs, x), rtol=1e-10, atol=1e-10)


def test_cropping_a_kernel_larger_than_its_input() -> None:
    # Four 3x3 convs of stride 2 compose to a 31x31 kernel; on a 5x6 input it needs far fewer taps.
    generator = torch.Generator().manual_seed(7)
    specs = [Spec(torch.randn(3, 3, 3, 3, generator=generator, dtype=torch.float64),
                  torch.randn(3, generator=generator, dtype=torch.float64), (2, 2), (1, 1), (1, 1), 1)
             for _ in range(4)]
    composed = merge.compose_all([s.affine() for s in specs])
    merged = merge.crop_to_input(composed, (5, 6))
    assert composed.kernel == (31, 31) and max(merged.kernel) <= 6
    x = random_input(3, 5, 6, 8)
    torch.testing.assert_close(merge.apply(merged, x), run_sequence(specs, x), rtol=1e-10, atol=1e-10)


@FEWER
@given(specs=conv_chains(min_len=1))
def test_composition_cost_predicts_compose_all(specs: List[Spec]) -> None:
    convs = [s.affine() for s in specs]
    cost = composition_cost(convs)
    merged = merge.compose_all(convs)
    assert (cost.kernel, cost.groups) == (merged.kernel, merged.groups)
    # The last step holds at least the result; a single conv composes nothing.
    assert cost.bytes >= 8 * merged.weight.numel() if len(convs) > 1 else cost.bytes == 0


def test_add_identity_rejects_what_it_cannot_absorb() -> None:
    weight = torch.randn(4, 4, 3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="stride 1"):
        merge.add_identity(merge.AffineConv.from_conv(weight, None, 2, 1))
    with pytest.raises(ValueError, match="in == out"):
        merge.add_identity(merge.AffineConv.from_conv(torch.randn(6, 4, 3, 3), None, 1, 1))
    with pytest.raises(ValueError, match="outside"):
        merge.add_identity(merge.AffineConv.from_conv(weight, None, 1, (3, 1)))


def test_add_identity_keeps_groups_and_adds_one_tap() -> None:
    weight = torch.randn(6, 2, 3, 5, dtype=torch.float64)
    conv = merge.AffineConv.from_conv(weight, None, 1, (1, 2), 1, 3)
    absorbed = merge.add_identity(conv)
    assert absorbed.groups == 3
    identity = torch.zeros(6, 6, 3, 5, dtype=torch.float64)
    identity[torch.arange(6), torch.arange(6), 1, 2] = 1
    expected = merge.dense_weight(conv.weight, 3) + identity
    torch.testing.assert_close(merge.dense_weight(absorbed.weight, 3), expected, rtol=0, atol=0)


def test_from_conv_rejects_string_padding() -> None:
    with pytest.raises(ValueError, match="same"):
        merge.AffineConv.from_conv(torch.randn(4, 4, 3, 3), None, 1, "same")


def test_compose_rejects_channel_mismatch() -> None:
    a = merge.AffineConv.from_conv(torch.randn(4, 3, 1, 1), None)
    b = merge.AffineConv.from_conv(torch.randn(2, 5, 1, 1), None)
    with pytest.raises(ValueError, match="channels"):
        merge.compose(a, b)


@SETTINGS
@given(spec=st.data(), affine=st.booleans(), seed=st.integers(0, 1000))
def test_fold_batchnorm_equals_conv_then_bn(spec: st.DataObject, affine: bool, seed: int) -> None:
    conv = spec.draw(conv_specs(spec.draw(st.sampled_from([1, 2, 4]))))
    generator = torch.Generator().manual_seed(seed)
    channels = conv.out_channels
    mean = torch.randn(channels, generator=generator, dtype=torch.float64)
    var = torch.rand(channels, generator=generator, dtype=torch.float64) * 2 + 0.01
    gamma = torch.randn(channels, generator=generator, dtype=torch.float64) if affine else None
    beta = torch.randn(channels, generator=generator, dtype=torch.float64) if affine else None
    eps = 1e-3
    x = random_input(conv.in_channels, min_input([conv], 0) + 2, min_input([conv], 1) + 1, seed)
    expected = F.batch_norm(run_sequence([conv], x), mean, var, gamma, beta, training=False, eps=eps)
    weight, bias = merge.fold_batchnorm(conv.weight, conv.bias, mean, var, gamma, beta, eps)
    folded = Spec(weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    torch.testing.assert_close(run_sequence([folded], x), expected, rtol=1e-10, atol=1e-10)


def test_fold_batchnorm_matches_module_in_float32() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1, bias=False)
    norm = torch.nn.BatchNorm2d(5, eps=1e-2)
    norm.running_mean.normal_()
    norm.running_var.uniform_(0.5, 2)
    norm.weight.data.normal_()
    norm.bias.data.normal_()
    norm.eval()
    weight, bias = merge.fold_batchnorm(conv.weight, conv.bias, norm.running_mean, norm.running_var,
                                        norm.weight, norm.bias, norm.eps)
    assert weight.dtype == bias.dtype == torch.float32
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(F.conv2d(x, weight, bias, padding=1), norm(conv(x)))


@SETTINGS
@given(data=st.data())
def test_dense_regroup_round_trip(data: st.DataObject) -> None:
    conv = data.draw(conv_specs(data.draw(st.sampled_from([1, 2, 3, 4, 6]))))
    dense = merge.dense_weight(conv.weight, conv.groups)
    assert dense.shape == (conv.out_channels, conv.in_channels, *conv.weight.shape[2:])
    torch.testing.assert_close(merge.regroup(dense, conv.groups), conv.weight, rtol=0, atol=0)
    # The dense conv computes the same thing as the grouped one.
    x = random_input(conv.in_channels, min_input([conv], 0), min_input([conv], 1) + 1, 0)
    dense_spec = Spec(dense, conv.bias, conv.stride, conv.padding, conv.dilation, 1)
    torch.testing.assert_close(run_sequence([dense_spec], x), run_sequence([conv], x))


def test_regroup_rejects_weights_across_groups() -> None:
    dense = torch.zeros(4, 4, 1, 1)
    dense[0, 3] = 1.0
    with pytest.raises(ValueError, match="across groups"):
        merge.regroup(dense, 2)
    assert merge.regroup(dense, 1).shape == (4, 4, 1, 1)


def test_undilate_places_taps_apart() -> None:
    weight = torch.arange(1.0, 7.0).reshape(1, 1, 2, 3)
    dense = merge.undilate(weight, (3, 2))
    assert dense.shape == (1, 1, 4, 5)
    assert torch.count_nonzero(dense) == 6
    torch.testing.assert_close(dense[0, 0, ::3, ::2], weight[0, 0])


def test_to_conv2d_equals_apply() -> None:
    generator = torch.Generator().manual_seed(3)
    conv = merge.AffineConv(torch.randn(6, 2, 5, 3, generator=generator), torch.randn(6, generator=generator),
                            (2, 1), (2, 1), 3)
    module = merge.to_conv2d(conv)
    x = torch.randn(1, 6, 11, 9, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(module(x), merge.apply(conv, x))
    assert module.padding == (2, 1) and module.groups == 3 and module.weight.dtype == torch.float32


def test_compose_all_returns_input_dtype_and_keeps_float64_inside() -> None:
    generator = torch.Generator().manual_seed(4)
    specs = [Spec(torch.randn(4, 4, 3, 3, generator=generator, dtype=torch.float64), None, (1, 1), (1, 1),
                  (1, 1), 1) for _ in range(3)]
    convs32 = [s.affine().to(torch.float32) for s in specs]
    merged32 = merge.compose_all(convs32)
    assert merged32.weight.dtype == merged32.bias.dtype == torch.float32
    # Composed in float64 and rounded once at the end: bit-equal to rounding the float64 result.
    merged64 = merge.compose_all([c.to(torch.float64) for c in convs32])
    torch.testing.assert_close(merged32.weight, merged64.weight.float(), rtol=0, atol=0)
    torch.testing.assert_close(merged32.bias, merged64.bias.float(), rtol=0, atol=0)
    assert merge.compose_all([s.affine() for s in specs], dtype=torch.float16).weight.dtype == torch.float16


def test_large_depthwise_compose_is_cheap_and_exact() -> None:
    # 2048 channels, kernels reaching 15: depthwise stays per-channel, no dense C x C kernel.
    generator = torch.Generator().manual_seed(5)
    channels = 2048
    a = Spec(torch.randn(channels, 1, 7, 7, generator=generator, dtype=torch.float64), None, (2, 2), (3, 3),
             (1, 1), channels)
    b = Spec(torch.randn(channels, 1, 5, 5, generator=generator, dtype=torch.float64),
             torch.randn(channels, generator=generator, dtype=torch.float64), (1, 1), (2, 2), (1, 1), channels)
    merged = merge.compose(a.affine(), b.affine())
    assert merged.weight.shape == (channels, 1, 15, 15) and merged.groups == channels
    x = random_input(channels, 17, 16, 6)[:1]
    torch.testing.assert_close(merge.apply(merged, x), run_sequence([a, b], x), rtol=1e-10, atol=1e-10)
