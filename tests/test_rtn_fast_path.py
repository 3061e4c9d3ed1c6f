"""The fast RTN path (issue 21: >= 1 GB/s) stores exactly what the float64 whole-tensor formulas store: codes from
:func:`monoquant.functional.quantize_rows` (float64 on cached row chunks), one finiteness scan per weight, slot
extremes computed once by the MinMax observer, and the one-pass INT4 packing."""

import hashlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import monoquant as mq
from monoquant import functional as F
from monoquant.packing import pack_int4
from monoquant.qtypes import PerChannel, PerGroup, PerTensor, QType

SPECS = [mq.Int8(), mq.Int8(symmetric=False), mq.Int8(granularity="tensor"), mq.Int4(group_size=128),
         mq.Int4(group_size=32, symmetric=True), mq.Int4(group_size=64)]

# sha256 (first 16 hex digits) of the stored buffers written by monoquant at commit 59c2f2e (float64 codes of
# the whole weight in 1M-value chunks, before this path existed), for the weight built in _golden_weight()
GOLDEN = {"int8-sym-channel": "ec3f7af685a77576", "int8-affine-channel": "5c9f1571ce7c7d43",
          "int8-sym-tensor": "0dad9e4fa4a72e1f", "int4-affine-g128": "7ef116882166b8ad",
          "int4-sym-g32": "4de4705f388fa1e0", "int4-affine-g64": "3b0891c97f596363"}


def _golden_weight() -> torch.Tensor:
    w = torch.randn(384, 512, generator=torch.Generator().manual_seed(0)) * 0.05
    w[::7] *= 30  # rows with larger ranges
    return w


def _digest(stored) -> str:
    h = hashlib.sha256()
    for t in stored:
        if t is not None:
            h.update(str(t.dtype).encode())
            h.update(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe(s.resolve_group_size(512)))
def test_stored_bytes_equal_those_of_the_float64_whole_tensor_path_on_a_fixed_seed(spec):
    g = spec.resolve_group_size(512)
    assert _digest(spec.quantize(_golden_weight(), g)) == GOLDEN[spec.describe(g)]


def _reference_codes(w, scale, zero, qtype, granularity):
    view = F.group_view(w, granularity)
    return F.quantize(view, F.expand_qparam(scale, granularity), F.expand_qparam(zero, granularity),
                      qtype).reshape(w.shape)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), groups=st.integers(1, 4), group=st.sampled_from([2, 4, 32]),
       bits=st.sampled_from([4, 8]), symmetric=st.booleans(), kind=st.sampled_from(["tensor", "channel", "group"]),
       chunk=st.integers(1, 300), ties=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_quantize_rows_equals_quantize_including_exact_ties(rows, groups, group, bits, symmetric, kind, chunk, ties,
                                                            seed):
    g = torch.Generator().manual_seed(seed)
    cols = groups * group
    qtype = QType(bits, symmetric=symmetric)
    granularity = {"tensor": PerTensor(), "channel": PerChannel(0), "group": PerGroup(group)}[kind]
    w = torch.randn(rows, cols, generator=g)
    mn, mx = F.minmax(w, granularity)
    scale, zero = F.qparams_from_minmax(mn, mx, qtype)
    scale = scale.float().double()  # as IntegerFormat.qparams: the stored float32 scale
    if ties:  # values exactly halfway between two codes, where half-to-even decides (power-of-two scales: exact)
        scale = 2.0 ** torch.randint(-8, 2, scale.shape, generator=g).double()
        k = torch.randint(-8, 8, (rows, cols), generator=g).double() + 0.5
        s = F.group_view(torch.ones(rows, cols, dtype=torch.float64), granularity) * F.expand_qparam(
            scale, granularity)
        w = (k * s.reshape(rows, cols)).float()
        assert torch.equal(w.double() / s.reshape(rows, cols), k)  # exact ties in float32
    want = _reference_codes(w, scale, zero, qtype, granularity)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "QUANTIZE_CHUNK", chunk)
        got = F.quantize_rows(w, scale, zero, qtype, granularity, torch.int16)
    assert torch.equal(got.long(), want)


def test_all_finite_scans_a_weight_once_inside_quantize_and_again_after_it_changes(monkeypatch):
    w = torch.nn.Parameter(torch.randn(64, 32))
    calls = []
    real = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t, *a, **k: calls.append(1) or real(t, *a, **k))
    assert F.all_finite(w) and F.all_finite(w)
    assert len(calls) == 2  # outside the context every call scans (a write through .data moves no version counter)
    with F.remembering_finite_checks():
        assert F.all_finite(w) and F.all_finite(w)
        assert len(calls) == 3
        with torch.no_grad():
            w[3, 5] = float("nan")  # in place: the version counter moves
        assert not F.all_finite(w)
        w.data = torch.full((64, 32), 2.0)  # rebound storage
        assert F.all_finite(w) and len(calls) == 5
    w.data[0, 0] = float("inf")
    assert not F.all_finite(w)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            t = torch.zeros(5, 7, dtype=dtype)
            t[4, 6] = bad
            assert not F.all_finite(t)
    assert F.all_finite(torch.empty(0, 3)) and F.all_finite(torch.arange(5))


def test_quantize_scans_each_weight_once(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    scanned = []
    real = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t, *a, **k: scanned.append(t.is_floating_point()) or real(t, *a, **k))
    mq.quantize_(model, mq.Int4(group_size=32), progress=False)
    assert scanned.count(True) == 2  # the float weights, once each (the other scan: pack_int4's range check)


@pytest.mark.parametrize("spec", [mq.Int8(), mq.Int4(group_size=32)])
def test_a_model_built_under_inference_mode_quantizes_like_any_other(spec):
    """Inference tensors have no version counter: their finiteness is checked every time, never remembered."""
    torch.manual_seed(0)
    with torch.inference_mode():
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    reference = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    reference.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    mq.quantize_(model, spec, progress=False)
    mq.quantize_(reference, spec, progress=False)
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)
    with torch.inference_mode():
        bad = torch.nn.Linear(64, 64)
        bad.weight[0, 0] = float("nan")
    with pytest.raises(mq.NonFiniteWeightError, match="NaN or Inf"):
        mq.quantize_(torch.nn.Sequential(bad), spec, progress=False)


def test_a_weight_made_non_finite_after_a_check_is_still_refused():
    layer = torch.nn.Linear(32, 16)
    assert F.all_finite(layer.weight)
    with torch.no_grad():
        layer.weight[0, 0] = float("inf")
    with pytest.raises(mq.NonFiniteWeightError, match="NaN or Inf"):
        mq.QuantLinear.from_float(layer, mq.Int8())


@pytest.mark.parametrize("granularity", [PerChannel(0), PerGroup(16)])
def test_minmax_observer_slot_extremes_equal_the_general_path(granularity):
    x = torch.randn(12, 64) * torch.linspace(0.1, 5, 12).unsqueeze(1)
    fast = mq.MinMaxObserver().configure(QType(8, symmetric=True), granularity)
    fast(x)
    fast(x * 2)
    (mn1, mx1), (mn2, mx2) = F.minmax(x, granularity), F.minmax(x * 2, granularity)
    mn, mx = torch.minimum(mn1, mn2), torch.maximum(mx1, mx2)
    assert torch.equal(fast.min_val, mn) and torch.equal(fast.max_val, mx)
    assert float(fast._batch_range[0]) == float((x * 2).min()) and float(fast._batch_range[1]) == float((x * 2).max())
    with pytest.warns(mq.NonFiniteInputWarning):  # +-inf: the general path (replaced by 0) still runs
        y = x.clone()
        y[2, 3] = float("inf")
        inf_obs = mq.MinMaxObserver().configure(QType(8, symmetric=True), granularity)
        inf_obs(y)
    y[2, 3] = 0.0
    want = mq.MinMaxObserver().configure(QType(8, symmetric=True), granularity)
    want(y)
    assert torch.equal(inf_obs.min_val, want.min_val) and torch.equal(inf_obs.max_val, want.max_val)
    y[2, 3] = float("nan")
    with pytest.raises(mq.CalibrationError, match="NaN"):
        mq.MinMaxObserver().configure(QType(8, symmetric=True), granularity)(y)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 40), dtype=st.sampled_from([torch.uint8, torch.int16, torch.int64]),
       transposed=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_pack_int4_equals_the_strided_formula(rows, cols, dtype, transposed, seed):
    q = torch.randint(0, 16, (cols, rows) if transposed else (rows, cols),
                      generator=torch.Generator().manual_seed(seed)).to(dtype)
    q = q.t() if transposed else q  # a non-contiguous input (made contiguous first)
    padded = torch.nn.functional.pad(q.to(torch.uint8), (0, cols % 2))
    assert torch.equal(pack_int4(q), padded[:, 0::2] | (padded[:, 1::2] << 4))
