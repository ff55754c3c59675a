"""Property tests of the format kernel against the slow reference written from the spec."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import format_reference as ref
from vbxfx.format import project_weight, quantize_int8
from vbxfx.format.structured import fits_blocks, project_blocks

# Values that make ties, zeros, equal and opposite magnitudes likely.
_small_ints = st.integers(min_value=-4, max_value=4).map(float)
# Magnitudes below 1e-6 are zeroed: within one block, weights below ~2**-60 of the largest
# square to zero and tie (a documented limit; int8 quantization makes them 0 anyway).
_floats = st.floats(min_value=-2, max_value=2, allow_nan=False, width=32).map(
    lambda v: 0.0 if abs(v) < 1e-6 else v)
_values = st.one_of(_small_ints, _floats, st.sampled_from([0.0, 0.5, -0.5, 1.0, -1.0]))
blocks = st.lists(_values, min_size=8, max_size=8)
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _project(block, repeat, pairing=True):
    w = torch.tensor([block], dtype=torch.float32).t().contiguous()   # [8, 1]
    return project_blocks(w, repeat, pairing=pairing)[:, 0].tolist()


def _err(a, b):
    return float(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


@pytest.mark.parametrize("repeat", [1, 2])
@pytest.mark.parametrize("pairing", [True, False])
@SETTINGS
@given(block=blocks)
def test_projection_fits_reference_checker(block, repeat, pairing):
    assert ref.fits(_project(block, repeat, pairing), repeat)


@pytest.mark.parametrize("repeat", [1, 2])
@SETTINGS
@given(block=blocks)
def test_projection_is_optimal_against_brute_force(block, repeat):
    got = _err(block, _project(block, repeat))
    best = ref.brute_force_error(block, repeat)
    assert got == pytest.approx(best, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("repeat", [1, 2])
@SETTINGS
@given(block=blocks, h=st.lists(st.sampled_from([0.1, 0.5, 1.0, 2.0, 7.0]), min_size=8, max_size=8))
def test_importance_weighted_projection_is_optimal_and_fits(block, h, repeat):
    w = torch.tensor([block], dtype=torch.float32).t().contiguous()
    hw = torch.tensor([h], dtype=torch.float32).t().contiguous()
    out = project_blocks(w, repeat, importance=hw)[:, 0].tolist()
    assert ref.fits(out, repeat)
    got = float(np.sum(np.asarray(h) * (np.asarray(block, np.float64) - np.asarray(out)) ** 2))
    assert got == pytest.approx(ref.brute_force_error(block, repeat, h), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("repeat", [1, 2])
@SETTINGS
@given(block=blocks)
def test_projection_is_idempotent(block, repeat):
    once = _project(block, repeat)
    assert _project(once, repeat) == once


@pytest.mark.parametrize("repeat", [1, 2])
@SETTINGS
@given(block=blocks)
def test_fitting_block_is_unchanged(block, repeat):
    if ref.fits(block, repeat):
        assert _project(block, repeat) == [float(np.float32(v)) for v in block]


@pytest.mark.parametrize("repeat", [1, 2, 4])
@SETTINGS
@given(block=blocks)
def test_fast_checker_agrees_with_reference(block, repeat):
    w = torch.tensor([block], dtype=torch.float32).t().contiguous()
    assert bool(fits_blocks(w, repeat)[0]) == ref.fits(block, repeat)


@pytest.mark.parametrize("repeat", [1, 2])
@SETTINGS
@given(block=blocks)
def test_pairing_never_worse_than_magnitude(block, repeat):
    assert _err(block, _project(block, repeat)) <= _err(block, _project(block, repeat, False)) + 1e-6


@pytest.mark.parametrize("repeat", [1, 2])
@SETTINGS
@given(data=st.data())
def test_fits_after_int8_quantization_and_folded_batchnorm(data, repeat):
    out_ch = data.draw(st.integers(1, 4))
    in_ch = data.draw(st.sampled_from([1, 3, 8, 17]))
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_ch, in_ch, 3, 3, generator=g)
    w[torch.rand(w.shape, generator=g) < 0.2] = 0.0
    p = project_weight(w, repeat)
    # a folded BatchNorm: one scale per output channel, negative ones included
    scale = torch.tensor(data.draw(st.lists(
        st.floats(min_value=-3, max_value=3, allow_nan=False).filter(lambda s: abs(s) > 1e-3),
        min_size=out_ch, max_size=out_ch)), dtype=torch.float32)
    for weight in (p, p * scale.view(-1, 1, 1, 1)):
        q, _ = quantize_int8(weight)
        blocks_q = torch.nn.functional.pad(q.permute(0, 2, 3, 1).reshape(-1, in_ch).float(),
                                           (0, -in_ch % 8)).reshape(-1, 8)
        for b in blocks_q.tolist():
            assert ref.fits(b, repeat), b


@pytest.mark.parametrize("repeat", [1, 2])
@pytest.mark.parametrize("scale", [2.0 ** -120, 2.0 ** -60, 2.0 ** 60])
def test_tiny_and_huge_blocks_project_exactly_like_unit_ones(repeat, scale):
    torch.manual_seed(repeat)
    w = torch.randn(8, 64)
    w[:, ::3] = project_blocks(w[:, ::3].contiguous(), repeat)      # some blocks already fit
    base = project_blocks(w, repeat)
    torch.testing.assert_close(project_blocks(w * scale, repeat), base * scale, rtol=0, atol=0)
