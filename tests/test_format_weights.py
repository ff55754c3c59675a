"""Whole-weight API of the format kernel: spec examples, shapes, dtypes, errors, encodings."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import format_reference as ref
from vbxfx import FormatError
from vbxfx.format import (apply_encoding, encode_unstructured, encode_weight, explain_violation,
                          fits, from_blocks, hardware_macs, pattern_coefficients,
                          project_unstructured, project_weight, projection_error, quantize_int8,
                          to_blocks, unstructured_macs, weight_repeat)


def _as_weight(block):
    return torch.tensor([block], dtype=torch.float32)          # Linear [1, 8]


@pytest.mark.parametrize("block, r1, r2", [
    ([5, 3, 3, -5, 2, 4, -4, 2], False, True),
    ([5, 3, 3, -5, 2, 4, 4, 2], False, False),
    ([5, 0, -5, 0, 0, 3, 0, 3], False, True),
    ([5, 0, -5, 0, 0, 3, 0, -3], True, True),
    ([5, 4, 0, 0, 0, 0, 0, 0], False, True),
])
def test_spec_worked_examples_fit(block, r1, r2):
    w = _as_weight(block)
    assert fits(w, 1, quantize=False) is r1
    assert fits(w, 2, quantize=False) is r2
    assert weight_repeat(w, quantize=False) == (1 if r1 else 2 if r2 else 4)


def test_spec_worked_example_projection():
    w = _as_weight([0.5, -0.4, 0.1, 0.35, 0.3, 0, -0.2, -0.3])
    torch.testing.assert_close(project_weight(w, 2),
                               _as_weight([0.5, -0.375, 0, 0.375, 0.3, 0, -0.2, -0.3]))
    torch.testing.assert_close(project_weight(w, 2, pairing=False),
                               _as_weight([0.5, -0.4, 0, 0, 0.3, 0, 0, -0.3]))
    assert projection_error(w, 2, relative=False) == pytest.approx(0.01125, abs=1e-7)
    assert projection_error(w, 2, pairing=False, relative=False) == pytest.approx(0.1725, abs=1e-7)


def test_layout_roundtrip_and_order():
    w = torch.randn(4, 5, 3, 2)
    b = to_blocks(w)
    assert b.shape == (4 * 3 * 2, 8)
    # block of (o=1, ky=2, kx=0) holds w[1, :, 2, 0] then zero padding
    torch.testing.assert_close(b[1 * 6 + 2 * 2 + 0, :5], w[1, :, 2, 0])
    assert torch.all(b[:, 5:] == 0)
    torch.testing.assert_close(from_blocks(b, w.shape), w)


@pytest.mark.parametrize("shape", [(6, 1, 3, 3), (6, 3, 3, 3), (4, 5, 1, 1), (3, 17, 3, 3),
                                   (7, 17), (5, 3), (2, 64, 3, 3), (10, 1)])
@pytest.mark.parametrize("repeat", [1, 2])
def test_odd_channel_counts_conv_and_linear(shape, repeat):
    torch.manual_seed(sum(shape))
    w = torch.randn(shape)
    p = project_weight(w, repeat)
    assert p.shape == w.shape and p.dtype == w.dtype
    assert weight_repeat(p) <= repeat
    assert weight_repeat(p, quantize=False) <= repeat
    for block in to_blocks(p).tolist():
        assert ref.fits(block, repeat)
    # pairing never loses to plain N:4 magnitude pruning
    assert projection_error(w, repeat) <= projection_error(w, repeat, pairing=False) + 1e-7


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_precision_results_still_fit(dtype):
    torch.manual_seed(0)
    w = torch.randn(8, 24, 3, 3).to(dtype)
    for repeat in (1, 2):
        p = project_weight(w, repeat)
        assert p.dtype == dtype and p.device == w.device
        assert weight_repeat(p, quantize=False) <= repeat
        assert weight_repeat(p) <= repeat


def test_repeat_4_is_a_copy():
    w = torch.randn(3, 8)
    p = project_weight(w, 4)
    torch.testing.assert_close(p, w)
    assert p.data_ptr() != w.data_ptr()


@pytest.mark.parametrize("bad, match", [
    (torch.randn(3, 4, 5), "rank 3"),
    (torch.randn(4), "rank 1"),
    (torch.zeros(0, 8), "empty"),
    (torch.tensor([[1.0, float("nan")]]), "NaN/Inf"),
    (torch.tensor([[1.0, float("inf")]]), "NaN/Inf"),
    (torch.ones(2, 8, dtype=torch.int32), "floating"),
    ([[1.0, 2.0]], "torch.Tensor"),
])
def test_bad_weights_are_clear_value_errors(bad, match):
    with pytest.raises(FormatError, match=match):
        project_weight(bad, 2)
    with pytest.raises(ValueError):
        weight_repeat(bad)


@pytest.mark.parametrize("repeat", [0, 3, 8, 2.0, "2", True, None])
def test_bad_repeat(repeat):
    with pytest.raises(FormatError, match=r"repeat must be one of \(1, 2, 4\)"):
        project_weight(torch.randn(2, 8), repeat)


def test_weight_repeat_uses_int8_quantization():
    # 0.50 vs 0.501 are different floats but the same int8 value in a channel of max 0.501
    w = _as_weight([0.5, 0, -0.501, 0, 0, 0, 0, 0])
    assert weight_repeat(w, quantize=False) == 2
    assert weight_repeat(w) == 1
    q, scale = quantize_int8(w)
    assert q.tolist() == [[127, 0, -127, 0, 0, 0, 0, 0]]


def test_explain_violation_locates_the_block():
    w = torch.zeros(3, 16, 3, 3)
    w[2, 8:10, 1, 2] = torch.tensor([4.0, 5.0])          # P0 of block 1 holds two nonzeros
    assert explain_violation(w, 2) is None
    v = explain_violation(w, 1)
    assert (v.out_channel, v.ky, v.kx, v.block, v.first_in_channel) == (2, 1, 2, 1, 8)
    assert "P0" in v.rule and "two nonzeros" in v.rule
    assert "out channel 2, ky 1, kx 2, block 1" in str(v)


def test_explain_violation_names_the_rule():
    v = explain_violation(_as_weight([5, 0, -5, 0, 0, 3, 0, 3]), 1, quantize=False)
    assert "opposite" in v.rule and "same" in v.rule
    v = explain_violation(_as_weight([5, 3, 3, -5, 2, 4, 4, 2]), 2, quantize=False)
    assert "rows A and B" in v.rule


def test_hardware_macs_pads_input_channels():
    assert hardware_macs(64, 3, 49, 112 * 112, 4) == 64 * 49 * 8 * 112 * 112
    assert hardware_macs(64, 3, 49, 112 * 112, 2) == 64 * 49 * 8 * 112 * 112 // 2
    assert hardware_macs(10, 17, 1, 1, 1) == 10 * 24 // 4


# ------------------------------------------------------------------------------ encoding

@pytest.mark.parametrize("repeat", [1, 2])
@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), shape=st.sampled_from([(4, 8, 3, 3), (3, 13, 1, 1), (5, 19)]))
def test_encoding_roundtrip(repeat, seed, shape):
    torch.manual_seed(seed)
    w = project_weight(torch.randn(shape), repeat)
    enc = encode_weight(w, repeat)
    assert torch.equal(enc.mask, w != 0)
    torch.testing.assert_close(apply_encoding(w, enc), w, rtol=0, atol=0)
    flat, idx, sign = w.flatten(), enc.pair_index.flatten(), enc.pair_sign.flatten()
    paired = idx >= 0
    # partners are mutual, equal in magnitude, with the stated sign relation
    assert torch.equal(idx[idx[paired]], paired.nonzero().flatten())
    assert torch.equal(flat[paired].abs(), flat[idx[paired]].abs())
    assert torch.equal(torch.sign(flat[paired]) * torch.sign(flat[idx[paired]]), sign[paired].float())
    assert torch.all(sign[~paired] == 0)
    # projecting any other weight onto the pattern fits the repeat
    other = apply_encoding(torch.randn(shape), enc)
    assert weight_repeat(other, quantize=False) <= repeat
    a, b, gidx = pattern_coefficients(enc)
    torch.testing.assert_close(a * other + b * other.flatten()[gidx].view_as(other), other)


def test_encoding_of_spec_example_pairs_rows():
    enc = encode_weight(_as_weight([5, 3, 3, -5, 2, 4, -4, 2]))
    assert enc.repeat == 2 and enc.num_pairs == 4 and enc.paired_fraction == 1.0
    assert enc.pair_index.tolist() == [[3, 2, 1, 0, 7, 6, 5, 4]]


def test_encoding_rejects_a_weight_that_does_not_fit():
    with pytest.raises(FormatError, match="does not fit repeat 1"):
        encode_weight(_as_weight([5, 4, 0, 0, 0, 0, 0, 0]), 1)


def test_apply_encoding_shape_mismatch():
    enc = encode_weight(_as_weight([5, 0, 0, 0, 0, 0, 0, 0]), 1)
    with pytest.raises(FormatError, match="does not match"):
        apply_encoding(torch.randn(2, 8), enc)


# -------------------------------------------------------------------------- unstructured

@pytest.mark.parametrize("shape", [(16, 9, 3, 3), (10, 7), (8, 2), (4, 1, 1, 1), (6, 33)])
@pytest.mark.parametrize("compression", [0.0, 0.5, 0.66, 0.75, 0.9, 1.0])
def test_unstructured_budget_and_never_worse_than_magnitude(shape, compression):
    torch.manual_seed(len(shape) * 100 + shape[0])
    w = torch.randn(shape)
    budget = round((1 - compression) * w.numel())
    paired = project_unstructured(w, compression)
    plain = project_unstructured(w, compression, pairing=False)
    assert unstructured_macs(paired, quantize=False) <= budget
    assert unstructured_macs(paired) <= budget
    assert int((plain != 0).sum()) <= budget
    err = lambda p: float((w - p).square().sum())  # noqa: E731
    assert err(paired) <= err(plain) + 1e-6


def test_unstructured_pairing_helps_at_high_compression():
    torch.manual_seed(0)
    w = torch.randn(64, 64, 3, 3)
    err = lambda p: float((w - p).square().sum()) / float(w.square().sum())  # noqa: E731
    assert err(project_unstructured(w, 0.75)) < 0.8 * err(project_unstructured(w, 0.75, pairing=False))


def test_unstructured_macs_counts_odd_even_pairs():
    w = _as_weight([3, -3, 0, 3, 2, 1, -2, 2]).reshape(1, 8)
    # magnitude 3: evens {0}, odds {1, 3} -> 1 pair; magnitude 2: evens {4, 6}, odds {7} -> 1 pair
    assert unstructured_macs(w, quantize=False) == 7 - 2
    enc = encode_unstructured(w)
    assert enc.format == "ucomp" and enc.num_pairs == 2
    torch.testing.assert_close(apply_encoding(w, enc), w, rtol=0, atol=0)
    # same magnitude at two even indices cannot pair
    assert unstructured_macs(_as_weight([2, 0, 2, 0, 0, 0, 0, 0]), quantize=False) == 2


def test_unstructured_encoding_of_projection_matches_mac_count():
    torch.manual_seed(3)
    p = project_unstructured(torch.randn(12, 10, 3, 3), 0.7)
    enc = encode_unstructured(p)
    assert int(enc.mask.sum()) - enc.num_pairs == unstructured_macs(p, quantize=False)


@pytest.mark.parametrize("compression", [-0.1, 1.5, float("nan"), "0.5", None])
def test_unstructured_bad_compression(compression):
    with pytest.raises(FormatError, match=r"compression must be a fraction"):
        project_unstructured(torch.randn(4, 8), compression)
