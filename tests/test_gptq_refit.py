"""Least-squares scale refit after GPTQ: exact, never worse, and on by default."""

import pytest
import torch
from _gptq_reference import refit_group_scales as reference_refit_group_scales
from hypothesis import example, given, settings
from hypothesis import strategies as st

import monoquant as mq
from monoquant import gptq, schemes
from monoquant.errors import ConfigError
from monoquant.gptq import _row_errors, gptq_quantize, output_sqnr, refit_group_scales


def _inputs(rows: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    return (torch.randn(rows, k, generator=g) @ mix) * torch.linspace(0.2, 3.0, k)


def _codes(spec, stored, k, group):
    """Integer codes and (scale, zero) ``[N, G]`` of a stored weight, read back through dequantize."""
    n = stored.scale.shape[0]
    scale = stored.scale.reshape(n, -1).double()
    zero = (torch.zeros_like(scale) if stored.zero_point is None else stored.zero_point.reshape(n, -1).double())
    deq = schemes.dequantize_weight(spec, stored, k, group, torch.float64).reshape(n, scale.shape[1], -1)
    codes = torch.round(deq / scale.unsqueeze(-1) + zero.unsqueeze(-1)).reshape(n, k)
    return codes.long(), scale, zero.long()


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 12), groups=st.integers(1, 4), group=st.sampled_from([16, 32]), seed=st.integers(0, 99))
@example(rows=5, groups=4, group=16, seed=61)  # scales 6e-7 relative from lstsq's, the same error to 1e-12
def test_refit_solves_each_rows_least_squares_exactly_and_never_raises_the_error(rows, groups, group, seed):
    k = groups * group
    x = _inputs(4 * k, k, seed).double()
    h = x.T @ x / x.shape[0]
    w = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    spec = mq.Int4(group_size=group)
    codes, scale, zero = _codes(spec, schemes.quantize_weight(spec, w.float(), group), k, group)
    new = refit_group_scales(w, h, codes, scale, zero, group)
    centred = (codes - zero.repeat_interleave(group, 1)).double()
    before = _row_errors(w, centred * scale.repeat_interleave(group, 1), h)
    after = _row_errors(w, centred * new.repeat_interleave(group, 1), h)
    assert (after <= before * (1 + 1e-9) + 1e-12).all()
    for r in range(rows):  # the explicit least squares over the calibration rows: ||x w^T - x (B s)^T||
        basis = torch.zeros(k, groups, dtype=torch.float64)
        for gi in range(groups):
            basis[gi * group:(gi + 1) * group, gi] = centred[r, gi * group:(gi + 1) * group]
        best = torch.linalg.lstsq(x @ basis, x @ w[r]).solution
        best_error = _row_errors(w[r:r + 1], (basis @ best)[None], h)
        if (best > 0).all() and best_error < before[r]:
            # the minimum itself to 1e-9 (the scales agree to ~1e-6 relative: the least squares is solved once
            # per row from H, whose float rounding moves the minimiser along a flat valley, not its error)
            assert after[r] <= best_error * (1 + 1e-9) + 1e-12
            torch.testing.assert_close(new[r], best, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(("spec", "group", "min_gain_db"), [
    (mq.Int4(group_size=32), 32, 0.05), (mq.Int4(group_size=64, symmetric=True), 64, 0.05),
    (mq.Int8(), None, 0.005),  # one scale per 256-weight row: little to refit
])
def test_gptq_with_refit_has_lower_output_error_and_keeps_the_codes(spec, group, min_gain_db):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    x = _inputs(2048, 256, 4)
    h = x.T @ x / x.shape[0]
    plain = gptq_quantize(spec, w, h, group, act_order=True, static_groups=True)
    refit = gptq_quantize(spec, w, h, group, act_order=True, static_groups=True, refit_scales=True)
    assert torch.equal(plain.qweight, refit.qweight)
    assert plain.zero_point is None or torch.equal(plain.zero_point, refit.zero_point)
    assert not torch.equal(plain.scale, refit.scale)
    sqnr = [output_sqnr(w, schemes.dequantize_weight(spec, s, 256, group, torch.float64), h) for s in (plain, refit)]
    assert sqnr[1] > sqnr[0] + min_gain_db


def test_refit_leaves_a_single_per_tensor_scale_alone():
    w = torch.randn(16, 64)
    x = _inputs(512, 64, 1)
    h = x.T @ x / 512
    spec = mq.Int8(granularity="tensor")
    a = gptq_quantize(spec, w, h, None, refit_scales=True)
    b = gptq_quantize(spec, w, h, None)
    assert a.scale.shape == () and torch.equal(a.scale, b.scale) and torch.equal(a.qweight, b.qweight)


def test_refit_and_sequential_are_gptq_options_validated_and_stored_in_headers():
    for field in ("refit_scales", "sequential"):
        with pytest.raises(ConfigError, match=field):
            mq.Int4(**{field: True})  # method='rtn'
        with pytest.raises(ConfigError, match=field):
            mq.Int8(method="gptq", **{field: "yes"})
    spec = mq.Int4(method="gptq", refit_scales=False, sequential=True)
    assert type(spec).from_dict(spec.to_dict()) == spec


def _rtn_inputs(rows: int, groups: int, group: int, dead: list[int], seed: int):
    """A float32 weight, its round-to-nearest codes and qparams, and a float32 Hessian whose ``dead`` groups of
    inputs were always zero."""
    k = groups * group
    x = _inputs(2 * k + 8, k, seed)
    for gi in dead:
        x[:, gi * group:(gi + 1) * group] = 0
    w = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed + 1)) * 0.02
    spec = mq.Int4(group_size=group)
    codes, scale, zero = _codes(spec, schemes.quantize_weight(spec, w, group), k, group)
    return w, x.T @ x / x.shape[0], codes, scale.float(), zero


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 300), groups=st.integers(1, 6), group=st.sampled_from([16, 32, 64]),
       chunk=st.integers(1, 160), dead=st.sets(st.integers(0, 5), max_size=2), seed=st.integers(0, 2**16))
def test_refit_in_per_group_products_equals_the_float64_refit(rows, groups, group, chunk, dead, seed):
    # the float32 products per chunk of rows and per group (any chunk, a last chunk cut short, dead groups) give
    # the scales of the float64 refit of tests/_gptq_reference.py to float32 rounding
    w, h, codes, scale, zero = _rtn_inputs(rows, groups, group, sorted(d for d in dead if d < groups), seed)
    got = refit_group_scales(w, h, codes, scale, zero, group, chunk=chunk)
    want = reference_refit_group_scales(w, h, codes, scale, zero, group)
    assert got.dtype == scale.dtype and got.shape == scale.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)
    kept = (want == scale).all(-1)  # rows the refit leaves alone (a dead group, or no lower error) stay exact
    assert torch.equal(got[kept], scale[kept])


@settings(max_examples=30, deadline=None)
@given(groups=st.integers(1, 3), rows=st.integers(1, 40), k=st.integers(1, 70), block=st.integers(1, 80),
       seed=st.integers(0, 2**16))
def test_quadratic_trace_from_the_upper_blocks_equals_the_full_product(groups, rows, k, block, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(groups, rows, k, generator=g)
    x = torch.randn(groups, 2 * k, k, generator=g)
    h = x.transpose(1, 2) @ x
    h = (h + h.transpose(1, 2)) / 2  # exactly symmetric
    want = float(((a.double() @ h.double()) * a.double()).sum())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gptq, "TRACE_BLOCK", block)
        assert gptq._quadratic_trace(a, h) == pytest.approx(want, rel=1e-5)


def test_gptq_refit_equals_the_float64_refit_of_its_own_codes():
    # end to end on a fixed seed: the refit changes no code, and its scales are the float64 refit's of those codes
    spec = mq.Int4(group_size=32)
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(5))
    x = _inputs(1024, 256, 6)
    x[:, 64:96] = 0  # a dead group
    h = x.T @ x / x.shape[0]
    plain = gptq_quantize(spec, w, h, 32, act_order=True, static_groups=True)
    refit = gptq_quantize(spec, w, h, 32, act_order=True, static_groups=True, refit_scales=True)
    assert torch.equal(plain.qweight, refit.qweight) and torch.equal(plain.zero_point, refit.zero_point)
    codes, scale, zero = _codes(spec, plain, 256, 32)
    want = reference_refit_group_scales(w, h, codes, scale, zero, 32).to(refit.scale.dtype)
    torch.testing.assert_close(refit.scale.reshape(want.shape), want, rtol=1e-4, atol=0)
