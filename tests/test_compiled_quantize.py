"""The compiled round-to-nearest weight codes and GPTQ column loop (``fused.quantize_weight_rows``,
``fused.gptq_columns``, issue 21) against the PyTorch ops they replace: the same bytes, exact ties included."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import monoquant as mq
from monoquant import functional as F
from monoquant import fused, gptq
from monoquant.qtypes import PerChannel, PerGroup, PerTensor, QType

pytestmark = pytest.mark.skipif(not fused.available(), reason=f"compiled kernels unavailable: {fused.load_error()}")

GRANULARITIES = {"tensor": PerTensor(), "channel": PerChannel(0), "group": PerGroup(32)}


def _compiled_codes(w, scale, zero, qtype, granularity, dtype):
    rows, cols = w.shape
    group = granularity.size if isinstance(granularity, PerGroup) else cols
    slots = (rows, cols // group)

    def per_slot(p):
        return p.double().reshape(1, 1).expand(slots).contiguous() if isinstance(granularity, PerTensor) else \
            p.double().reshape(slots).contiguous()

    out = torch.empty(rows, cols, dtype=dtype)
    return fused.quantize_weight_rows(w, per_slot(scale), None if qtype.symmetric else per_slot(zero), group,
                                      qtype.qmin, qtype.qmax, out)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), groups=st.integers(1, 12), bits=st.sampled_from([4, 8]), symmetric=st.booleans(),
       kind=st.sampled_from(sorted(GRANULARITIES)), values=st.sampled_from(["random", "ties", "near ties", "tiny"]),
       seed=st.integers(0, 2**31 - 1))
def test_compiled_weight_codes_equal_quantize_rows(rows, groups, bits, symmetric, kind, values, seed):
    g = torch.Generator().manual_seed(seed)
    cols, granularity, qtype = groups * 32, GRANULARITIES[kind], QType(bits, symmetric=symmetric)
    w = torch.randn(rows, cols, generator=g)
    scale, zero = F.qparams_from_minmax(*F.minmax(w, granularity), qtype)
    scale = scale.float().double()
    if values in ("ties", "near ties"):  # x / scale exactly halfway between two codes, or one float32 step beside it
        scale = 2.0 ** torch.randint(-8, 2, scale.shape, generator=g).double()
        s = (F.group_view(torch.ones(rows, cols, dtype=torch.float64), granularity)
             * F.expand_qparam(scale, granularity)).reshape(rows, cols)
        k = torch.randint(-8, 8, (rows, cols), generator=g).double() + 0.5
        w = (k * s).float()
        if values == "near ties":
            w = torch.where(torch.rand(rows, cols, generator=g) < 0.5, w.nextafter(w + 1), w.nextafter(w - 1))
    elif values == "tiny":  # the smallest scale: x / scale up to ~1e7, where one unit in the last place is large
        scale = torch.full_like(scale, F.SCALE_EPS)
        w = w * 1e-6
    dtype = torch.int8 if bits == 4 or symmetric else torch.uint8
    want = F.quantize_rows(w, scale, zero, qtype, granularity, torch.int16)
    got = _compiled_codes(w, scale, zero, qtype, granularity, dtype)
    assert torch.equal(got.short(), want)


@pytest.mark.parametrize("spec", [mq.Int4(group_size=64), mq.Int4(group_size=32, symmetric=True), mq.Int8(),
                                  mq.Int8(symmetric=False), mq.Int8(granularity="tensor")],
                         ids=lambda s: s.describe(s.resolve_group_size(256)))
def test_quantize_stores_the_same_bytes_with_and_without_the_compiled_codes(spec, monkeypatch):
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    w[::5] *= 20
    group = spec.resolve_group_size(256)
    compiled = spec.quantize(w, group)
    monkeypatch.setattr(fused, "available", lambda: False)
    plain = spec.quantize(w, group)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(compiled, plain))


def _hessian(k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * k, k, generator=g) @ (torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k))
    x[:, 5] = 0  # a dead input
    return x.T @ x / x.shape[0]


OPTION_SETS = [dict(act_order=True, static_groups=True, refit_scales=True),
               dict(act_order=False, static_groups=False, refit_scales=False),
               dict(act_order=True, static_groups=False, refit_scales=False)]


@pytest.mark.parametrize(("spec", "group"), [(mq.Int4(group_size=32, method="gptq"), 32),
                                             (mq.Int4(group_size=64, symmetric=True, method="gptq"), 64),
                                             (mq.Int8(method="gptq"), None)])
@pytest.mark.parametrize("options", OPTION_SETS)
def test_compiled_gptq_column_loop_equals_the_pytorch_one(spec, group, options, monkeypatch):
    if group is None:
        options = {**options, "static_groups": True}
    k = 320  # two full blocks and a partial one; sub-blocks of 16
    w = torch.randn(72, k, generator=torch.Generator().manual_seed(2)) * 0.02
    h = _hessian(k, 2)
    compiled = gptq.gptq_quantize(spec, w, h, group, **options)
    monkeypatch.setattr(fused, "available", lambda: False)
    plain = gptq.gptq_quantize(spec, w, h, group, **options)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(compiled, plain))
