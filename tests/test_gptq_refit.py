"""Least-squares scale refit after GPTQ: exact, never worse, and on by default."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import monoquant as mq
from monoquant import schemes
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
