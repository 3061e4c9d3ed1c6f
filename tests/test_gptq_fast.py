"""The fast GPTQ and MSE clipping search against monoquant 0.2's (``tests/_gptq_reference.py``) on fixed seeds:
the same clipping choices exactly, the same Cholesky factor to rounding, GPTQ codes equal but for rounding-level
ties and the layer's output SQNR within 0.05 dB."""

import dataclasses

import pytest
import torch
from _gptq_reference import ReferenceMSEObserver
from _gptq_reference import _inverse_cholesky as reference_inverse_cholesky
from _gptq_reference import gptq_quantize as reference_gptq_quantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import monoquant as mq
from monoquant import fused, gptq, observers
from monoquant.qtypes import PerChannel, PerGroup, PerTensor, QType

GRANULARITIES = [PerGroup(128), PerGroup(32), PerChannel(), PerTensor()]


def _weight(rows, cols, seed, outliers=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    if outliers:  # a few large weights, so the best clipping ratio is not always 1
        w.view(-1)[torch.randint(0, w.numel(), (max(1, w.numel() // 500),), generator=g)] *= 8
    return w


def _qparams(observer, qtype, granularity, w):
    observer.configure(qtype, granularity)
    observer(w)
    return observer.calculate_qparams()


@pytest.fixture(params=["compiled", "pytorch"])
def search_path(request, monkeypatch):
    """Run the clipping search with the compiled kernel, or with the PyTorch ops as without a compiler."""
    if request.param == "compiled":
        if not fused.available():
            pytest.skip(f"compiled kernel unavailable: {fused.load_error()}")
    else:
        monkeypatch.setattr(fused, "available", lambda: False)
    return request.param


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # the
# fixture only picks the search path, the same for every example
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 24), groups=st.integers(1, 3),
       granularity=st.sampled_from(GRANULARITIES), symmetric=st.booleans(), bits=st.sampled_from([4, 8]))
def test_clipping_search_chooses_what_the_reference_chooses(search_path, seed, rows, groups, granularity,
                                                            symmetric, bits):
    w = _weight(rows, 128 * groups, seed)
    qtype = QType(bits, symmetric=symmetric)
    got = _qparams(mq.MSEObserver(), qtype, granularity, w)
    want = _qparams(ReferenceMSEObserver(), qtype, granularity, w)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_clipping_search_accumulates_batches_like_the_reference(search_path):
    qtype = QType(4, symmetric=False)
    fast, slow = mq.MSEObserver().configure(qtype, PerGroup(32)), ReferenceMSEObserver().configure(qtype, PerGroup(32))
    for seed in range(3):
        w = _weight(16, 64, seed)
        fast(w), slow(w)
    assert torch.equal(fast.errors, slow.errors) or torch.allclose(fast.errors, slow.errors, rtol=1e-12, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(fast.calculate_qparams(), slow.calculate_qparams()))


def test_pytorch_search_in_bounded_chunks_equals_one_chunk(monkeypatch):
    monkeypatch.setattr(fused, "available", lambda: False)
    qtype, w = QType(4, symmetric=False), _weight(40, 256, 7)
    whole = _qparams(mq.MSEObserver(), qtype, PerGroup(32), w)
    monkeypatch.setattr(observers, "CLIP_SEARCH_ELEMENTS", 100)  # fewer than one slot times the candidates
    chunked = _qparams(mq.MSEObserver(), qtype, PerGroup(32), w)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def _hessian(k, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = (torch.randn(4 * k, k, generator=g) @ mix) * torch.linspace(0.2, 3.0, k)
    x[:, 3] = 0  # a dead input
    return x.T @ x / x.shape[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_inverse_cholesky_equals_the_reference(seed):
    h = _hessian(192, seed)
    got, want = gptq._inverse_cholesky(h, 0.01), reference_inverse_cholesky(h, 0.01)
    assert got.dtype == torch.float32  # the precision GPTQ uses it in (0.2 cast its float64 factor to float32)
    assert float((got.double() - want).abs().max()) < 1e-5 * float(want.abs().max())
    assert torch.equal(got, got.triu())



@pytest.mark.parametrize("seed", [0, 1])
def test_inverse_cholesky_in_processing_order_equals_the_permuted_reference(seed):
    """The factor of ``h[order][:, order]`` gathered inside (act-order) is the reference's of the permuted matrix."""
    h = _hessian(192, seed)
    order = torch.randperm(192, generator=torch.Generator().manual_seed(seed))
    got, want = gptq._inverse_cholesky(h, 0.01, order), reference_inverse_cholesky(h[order][:, order], 0.01)
    assert float((got.double() - want).abs().max()) < 1e-5 * float(want.abs().max())


def test_inverse_cholesky_falls_back_to_float64_when_float32_is_not_positive_definite(monkeypatch):
    h = _hessian(192, 0)
    want = reference_inverse_cholesky(h, 0.01)
    calls = []

    def float32_fails(a, **kwargs):  # what LAPACK reports when rounding breaks positive definiteness
        calls.append(a.dtype)
        return torch.full_like(a, float("nan")), torch.tensor(7, dtype=torch.int32)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", float32_fails)
    got = gptq._inverse_cholesky(h, 0.01)
    assert calls == [torch.float32]
    assert float((got.double() - want).abs().max()) < 1e-5 * float(want.abs().max())

OPTION_SETS = [
    dict(act_order=True, static_groups=True, refit_scales=True),  # the defaults of method="gptq"
    dict(act_order=False, static_groups=False, refit_scales=False),
    dict(act_order=True, static_groups=False, refit_scales=True),
]
SPECS = [(mq.Int4(group_size=32, method="gptq"), 32), (mq.Int4(group_size=64, symmetric=True, method="gptq"), 64),
         (mq.Int8(method="gptq"), None)]


@pytest.mark.parametrize(("spec", "group"), SPECS)
@pytest.mark.parametrize("options", OPTION_SETS)
@pytest.mark.parametrize("seed", [0, 3])
def test_gptq_equals_the_reference_on_fixed_seeds(spec, group, options, seed):
    if group is None and not options["static_groups"]:
        options = {**options, "static_groups": True}
    w, h = _weight(96, 320 if group == 64 else 288, seed), None
    h = _hessian(w.shape[1], seed)
    got = gptq.gptq_quantize(spec, w, h, group, **options)
    # the reference with 0.2's clipping search too, so nothing of the new code is in it
    want = reference_gptq_quantize(dataclasses.replace(spec, observer=ReferenceMSEObserver()), w, h, group, **options)
    same_codes = float((got.qweight == want.qweight).double().mean())
    assert same_codes > 0.995  # only rounding-level ties may flip (blocked updates sum in another order)
    sqnr = [gptq.output_sqnr(w, spec.dequantize(s, w.shape[1], group, torch.float64), h) for s in (got, want)]
    assert sqnr[0] == pytest.approx(sqnr[1], abs=0.05)
    if options["static_groups"] and not options["refit_scales"]:  # qparams from the same clipping search
        assert torch.equal(got.scale, want.scale)
