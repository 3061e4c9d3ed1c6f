"""NF4 weights (monoquant/formats/nf4.py): codes against a reference quantizer written here, dequantization by
table lookup, packing, files and state dicts, and the kernel table never running NF4 through int4pack."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from torch import nn

import monoquant as mq
from monoquant import kernels
from monoquant.formats.nf4 import NF4_VALUES, NF4Weight, codebook_tensor
from monoquant.packing import pack_int4, unpack_int4

VALUES64 = torch.tensor(NF4_VALUES, dtype=torch.float64)


def reference_quantize(w: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (int64 ``[N, K]``) and float32 scales of ``w`` the slow, obvious way: per group of ``g`` columns, the
    absmax rounded to float32 (1.0 for an all-zero group); each weight's code is the index of the NF4 value nearest
    to ``w / scale`` in float64. Ties (a value exactly halfway between two codes) go to the lower code, because
    ``argmin`` returns the first minimum."""
    n, k = w.shape
    grouped = w.double().reshape(n, k // g, g)
    absmax = grouped.abs().amax(-1)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax)).float()
    x = grouped / scale.double().unsqueeze(-1)
    codes = (x.unsqueeze(-1) - VALUES64).abs().argmin(-1)
    return codes.reshape(n, k), scale


def reference_dequantize(codes: torch.Tensor, scale: torch.Tensor, g: int) -> torch.Tensor:
    """``NF4_VALUES[code] * scale`` in float64 (exact: both factors are float32)."""
    n, k = codes.shape
    return (VALUES64[codes].reshape(n, k // g, g) * scale.double().unsqueeze(-1)).reshape(n, k)


def test_code_values_are_the_bitsandbytes_derivation():
    # bitsandbytes create_normal_map(offset=0.9677083, use_extra_value=True), with Phi^-1(p) = sqrt(2) erfinv(2p-1)
    offset = 0.9677083
    assert offset == pytest.approx((1 - 1 / 30 + 1 - 1 / 32) / 2, abs=1e-7)

    def ppf(p: torch.Tensor) -> torch.Tensor:
        return math.sqrt(2) * torch.erfinv(2 * p.double() - 1)

    positive = ppf(torch.linspace(offset, 0.5, 9)[:-1])
    negative = -ppf(torch.linspace(offset, 0.5, 8)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).float().sort().values
    values = values / values.max()
    assert torch.equal(values, torch.tensor(NF4_VALUES, dtype=torch.float32))
    assert len(NF4_VALUES) == 16 and NF4_VALUES[0] == -1.0 and NF4_VALUES[7] == 0.0 and NF4_VALUES[15] == 1.0
    assert all(float(torch.tensor(v, dtype=torch.float32)) == v for v in NF4_VALUES)  # exact in float32


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), groups=st.integers(1, 3), g=st.sampled_from([32, 64, 96]),
       seed=st.integers(0, 2**16), log_scale=st.floats(-20, 20), dtype=st.sampled_from([torch.float32, torch.float64]),
       zero_rows=st.booleans())
def test_codes_and_scales_equal_the_reference_quantizer(rows, groups, g, seed, log_scale, dtype, zero_rows):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, g * groups, generator=gen, dtype=torch.float64) * math.exp(log_scale)).to(dtype)
    if zero_rows:
        w[0] = 0.0  # all-zero groups: scale 1, every code the exact 0.0 (code 7)
    stored = mq.NF4(group_size=g).quantize(w, g)
    codes, scale = reference_quantize(w, g)
    assert isinstance(stored, NF4Weight)
    assert torch.equal(unpack_int4(stored.qweight, w.shape[1]).long(), codes)
    assert stored.scale.dtype == torch.float32 and torch.equal(stored.scale, scale)
    assert torch.equal(stored.codebook, codebook_tensor())
    if zero_rows:
        assert set(codes[0].tolist()) == {7} and torch.equal(scale[0], torch.ones(groups))
    deq = mq.NF4(group_size=g).dequantize(stored, w.shape[1], g, torch.float64)
    assert torch.equal(deq, reference_dequantize(codes, scale, g))


def test_exact_midpoints_take_the_lower_code_and_extremes_the_end_codes():
    # with a 1.0 in the group the scale is exactly 1, so w / scale hits each midpoint exactly
    v = VALUES64
    mids = ((v[1:] + v[:-1]) / 2).tolist()
    row = torch.tensor([1.0, -1.0, *mids, *NF4_VALUES] + [0.0] * (64 - 2 - 15 - 16), dtype=torch.float64)
    stored = mq.NF4().quantize(row.unsqueeze(0), 64)
    codes = unpack_int4(stored.qweight, 64)[0].tolist()
    assert codes[:2] == [15, 0]
    assert codes[2:17] == list(range(15))  # midpoint between codes i and i+1 -> i
    assert codes[17:33] == list(range(16))  # every code value maps to itself
    assert torch.equal(reference_quantize(row.unsqueeze(0), 64)[0][0], torch.tensor(codes))


def test_packed_layout_is_int4s_low_nibble_even_column():
    # codes 15, 0, 7, 8 (1.0, -1.0, 0.0, 0.0796) then 7 (0.0) for the rest of the group
    w = torch.zeros(1, 32)
    w[0, :4] = torch.tensor([1.0, -1.0, 0.0, NF4_VALUES[8]])
    stored = mq.NF4().quantize(w, 32)
    assert stored.qweight.tolist()[0][:3] == [0x0F, 0x87, 0x77]
    assert torch.equal(stored.qweight, pack_int4(reference_quantize(w, 32)[0]))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), k=st.sampled_from([1, 7, 33, 63, 64, 96, 127, 128, 192, 320]),
       g=st.sampled_from([32, 64, 128, 256]), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_quant_linear_dequantizes_to_the_reference_for_any_shape(n, k, g, bias, seed):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    spec = mq.NF4(group_size=g)
    group = spec.resolve_group_size(k)
    if group is None:  # e.g. 127 or 33 inputs with g=32: no group of 32 or more divides them
        assert spec.unfit_reason(k) is not None
        return
    q = mq.QuantLinear.from_float(lin, spec)
    assert q.group_size == group and k % group == 0 and group <= max(g, k)
    codes, scale = reference_quantize(lin.weight.detach(), group)
    ref = reference_dequantize(codes, scale, group)
    assert q.qweight.shape == (n, (k + 1) // 2) and q.scale.shape == (n, k // group)
    assert torch.equal(q.dequantize_weight(torch.float64), ref)
    assert torch.equal(q.dequantize_weight(torch.float32), ref.float())  # product of two float32s, rounded once
    # half precision: the code value and the scale are each rounded to the dtype, then their product
    for dtype in (torch.bfloat16, torch.float16):
        half = (VALUES64.to(dtype)[codes].reshape(n, k // group, group) * scale.to(dtype).unsqueeze(-1)).reshape(n, k)
        assert torch.equal(q.dequantize_weight(dtype), half)
    # chunks of rows (how the chunked kernels call it) give the same rows as the whole weight
    whole = q.dequantize_weight(torch.float32, flat=True)
    for start in range(0, n, 3):
        out = torch.empty(min(3, n - start), k)
        assert torch.equal(q.dequantize_into(out, start), whole[start:start + 3])


def test_spec_fields_names_and_validation():
    spec = mq.NF4()
    assert spec == mq.NF4(group_size=64) and hash(spec) == hash(mq.NF4(group_size=64))
    assert spec.kind == "nf4" and spec.bits == 4 and spec.describe() == "nf4-g64" and spec.describe(32) == "nf4-g32"
    assert spec.buffer_names() == ("qweight", "scale", "codebook")
    assert spec.kernels() == () and spec.supports_gptq is False
    assert spec.to_dict() == {"kind": "nf4", "group_size": 64}
    assert mq.spec_from_dict({"kind": "nf4", "group_size": 32}) == mq.NF4(group_size=32)
    assert mq.FORMATS["nf4"] is mq.NF4 and "NF4" in mq.__all__ and mq.formats.NF4 is mq.NF4
    assert spec.layout != mq.Int4().layout
    for bad in (0, -64, 64.0, True, "64"):
        with pytest.raises(mq.ConfigError, match="group size must be a positive integer"):
            mq.NF4(group_size=bad)
    with pytest.raises(TypeError, match="method"):
        mq.NF4(method="gptq")  # no method field: NF4 is always round-to-nearest with the absmax scale
    with pytest.raises(mq.ConfigError, match="takes no observer"):
        spec.quantize(torch.randn(2, 64), 64, mq.MinMaxObserver())
    with pytest.raises(mq.SerializationError, match="group_size"):
        mq.spec_from_dict({"kind": "nf4", "group_size": "64"})
    with pytest.raises(mq.SerializationError, match=r"unknown field\(s\) \['symmetric'\]"):
        mq.spec_from_dict({"kind": "nf4", "group_size": 64, "symmetric": True})
    assert not mq.QuantConfig(mq.NF4()).needs_calibration


def test_group_size_resolution_and_unfit_layers_are_reported():
    spec = mq.NF4(group_size=64)
    assert [spec.resolve_group_size(k) for k in (128, 40, 96, 100, 134)] == [64, 40, 32, 50, None]
    assert "pass NF4(group_size=...)" in spec.unfit_reason(134) and spec.unfit_reason(96) is None
    model = nn.Sequential(nn.Linear(134, 64), nn.ReLU(), nn.Linear(64, 8))  # 134 = 2 x 67: no group from 32 to 64
    report = mq.quantize_(model, mq.QuantConfig(spec, skip=mq.SkipRules.none()), thresholds=None, progress=False)
    assert type(model[0]) is nn.Linear and type(model[2]) is mq.QuantLinear
    assert "no divisor between 32 and 64 to use as the NF4 group size" in report.row("0").reason
    assert report.row("2").scheme == "nf4-g64"


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(128, 64)
        self.conv = nn.Conv1d(4, 8, 5, padding=2)
        self.head = nn.Linear(128, 33, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc(x)).reshape(x.shape[0], 4, 16)
        return self.head(self.conv(h).flatten(1))


def _quantized() -> nn.Module:
    model = _Net().eval()
    mq.quantize_(model, mq.QuantConfig(mq.NF4(), skip=mq.SkipRules.none()), thresholds=None, progress=False)
    return model


def test_quantize_report_and_bytes():
    model = _Net().eval()
    report = mq.quantize_(model, mq.QuantConfig(mq.NF4(), skip=mq.SkipRules.none()), thresholds=None,
                          progress=False)
    assert [r.scheme for r in report.quantized] == ["nf4-g64", "nf4-g20", "nf4-g64"]  # conv: 4 * 5 = 20 inputs
    # fc: 64 x 64 bytes of codes, 64 x 2 float32 scales, 64 bytes of codebook, 64 float32 biases, and the float32
    # weight a layer this small keeps for its float path (kernels.FLOAT_WEIGHT_CACHE_BYTES)
    assert model.fc.storage_bytes() == 64 * 64 + 64 * 2 * 4 + 64 + 64 * 4 + 128 * 64 * 4
    assert "nf4-g64" in str(report)


def test_file_round_trip_is_bit_exact_and_the_header_names_nf4(tmp_path):
    model = _quantized()
    path = tmp_path / "m.safetensors"
    mq.save(model, path)
    with safe_open(str(path), framework="pt") as f:
        modules = json.loads(f.metadata()["modules"])
        # self-describing: a plain safetensors reader gets the code values from the file
        assert torch.equal(f.get_tensor("fc.codebook"), torch.tensor(NF4_VALUES))
    assert modules["fc"]["spec"] == {"kind": "nf4", "group_size": 64} and modules["fc"]["scheme"] == "nf4-g64"
    assert modules["conv"]["group_size"] == 20 and modules["head"]["layout"] == mq.NF4.layout
    for device in ("cpu", "meta"):
        with torch.device(device):
            fresh = _Net().eval()
        mq.load(fresh, path)
        assert fresh.fc.spec == mq.NF4() and fresh.conv.scheme() == "nf4-g20"
        for k, v in model.state_dict().items():
            assert torch.equal(fresh.state_dict()[k], v) and fresh.state_dict()[k].dtype == v.dtype, k
        x = torch.randn(5, 128)
        assert torch.equal(fresh(x), model(x))


def test_half_model_keeps_codebook_and_scales_and_round_trips(tmp_path):
    model = _quantized().half()
    assert model.fc.codebook.dtype == torch.float32 and torch.equal(model.fc.codebook, codebook_tensor())
    assert model.fc.scale.dtype == torch.float32 and model.fc.bias.dtype == torch.float16
    mq.save(model, tmp_path / "h.safetensors")
    fresh = mq.load(_Net().eval().half(), tmp_path / "h.safetensors")
    x = torch.randn(5, 128, dtype=torch.float16)
    assert torch.equal(fresh(x), model(x))


def test_state_dict_load_infers_nf4_not_int4():
    model = _quantized()
    state = copy.deepcopy(model.state_dict())
    with torch.device("meta"):
        fresh = _Net().eval()
    mq.load(fresh, state)
    assert [fresh.fc.spec, fresh.conv.spec, fresh.head.spec] == [mq.NF4(), mq.NF4(group_size=20), mq.NF4()]
    x = torch.randn(3, 128)
    assert torch.equal(fresh(x), model(x))
    # symmetric INT4 has the same qweight and scale: only the codebook tells them apart, both ways
    buffers = {n: state["fc." + n] for n in ("qweight", "scale", "codebook")}
    assert mq.NF4.infer(buffers, 128) == (mq.NF4(), 64)
    assert mq.Int4.infer(buffers, 128) is None
    int4_buffers = {n: buffers[n] for n in ("qweight", "scale")}
    assert mq.Int4.infer(int4_buffers, 128) == (mq.Int4(group_size=64, symmetric=True), 64)
    assert mq.NF4.infer(int4_buffers, 128) is None
    # a codebook that is not NF4's is no known format: refused, naming the layer
    state["fc.codebook"] = torch.zeros(16)
    with pytest.raises(mq.SerializationError, match=r"fc\.qweight .* no monoquant weight format"):
        mq.load(_Net().eval(), state)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_like_every_format(bad):
    model = _Net().eval()
    with torch.no_grad():
        model.head.weight[3, 4] = bad
    with pytest.raises(mq.NonFiniteWeightError, match=r"layer 'head' has NaN or Inf"):
        mq.quantize_(model, mq.QuantConfig(mq.NF4(), skip=mq.SkipRules.none()), progress=False)
    assert type(model.fc) is nn.Linear  # nothing changed
    with pytest.raises(mq.NonFiniteWeightError, match="NaN or Inf"):
        mq.NF4().quantize(model.head.weight, 64)


@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16, torch.float32])
def test_nf4_never_runs_int4pack_and_equals_f_linear_with_its_dequantized_weight(compute_dtype):
    torch.manual_seed(0)
    lin = nn.Linear(256, 64)  # a shape int4pack takes: N % 16 == 0, K % 128 == 0, group 64
    nf4 = mq.QuantLinear.from_float(lin, mq.QuantConfig(mq.NF4(group_size=64), compute_dtype=compute_dtype))
    int4 = mq.QuantLinear.from_float(lin, mq.QuantConfig(mq.Int4(group_size=64), compute_dtype=compute_dtype))
    for device in (torch.device("cpu"), torch.device("cuda")):
        for rows in (1, 16, 4096):
            assert "int4pack" not in kernels.choose_linear_kernel(nf4, device, rows, needs_grad=False)
    if kernels._HAS["int4pack_cpu"] and compute_dtype != torch.float32:  # the same layer as INT4 would take it
        assert kernels.choose_linear_kernel(int4, torch.device("cpu"), 1, needs_grad=False) == "int4pack_cpu"
    for rows in (1, 7):
        x = torch.randn(rows, 256)
        y = nf4(x)
        assert nf4.last_kernel in ("dequant", "dequant_bf16")
        dtype = compute_dtype or (torch.float32 if nf4.last_kernel == "dequant" else torch.bfloat16)
        w = nf4.dequantize_weight(dtype, flat=True)
        assert torch.equal(y, F.linear(x.to(dtype), w, nf4.bias.to(dtype)).to(x.dtype))
