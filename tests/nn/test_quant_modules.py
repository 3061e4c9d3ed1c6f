"""Every weight scheme x module type: dequantized weights equal an independent float64 reference quantizer,
and ``forward`` matches ``F.linear`` / ``F.conv*`` (via the float module) on the dequantized weight."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import monoquant as mq

EPS = torch.finfo(torch.float32).eps


def reference_quantize(w: torch.Tensor, bits: int, symmetric: bool, group: int | None) -> torch.Tensor:
    """Round-to-nearest-even fake quantization of a weight, in float64, written from the documented formulas.

    ``group=None``: one scale per output row; ``group=0``: one for the whole tensor; else one per ``group``
    consecutive values of the flattened row. Scales are rounded to float32 (what is stored) before use.
    """
    w2 = w.detach().double().reshape(w.shape[0], -1)
    rows, cols = w2.shape
    if group == 0:
        v = w2.reshape(1, 1, -1)
    elif group is None:
        v = w2.reshape(rows, 1, cols)
    else:
        v = w2.reshape(rows, cols // group, group)
    lo = v.amin(dim=-1, keepdim=True)
    hi = v.amax(dim=-1, keepdim=True)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (torch.maximum(lo.abs(), hi.abs()) / qmax).clamp_min(EPS).float().double()
        q = torch.clamp(torch.round(v / scale), -qmax - 1, qmax)
        out = q * scale
    else:
        qmax = 2**bits - 1
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale64 = ((hi - lo) / qmax).clamp_min(EPS)
        zero = torch.clamp(torch.round(-lo / scale64), 0, qmax)
        scale = scale64.float().double()
        q = torch.clamp(torch.round(v / scale) + zero, 0, qmax)
        out = (q - zero) * scale
    return out.reshape(w.shape)


SCHEMES = [
    pytest.param(mq.Int8(), (8, True, None), id="int8-sym-channel"),
    pytest.param(mq.Int8(symmetric=False), (8, False, None), id="int8-affine-channel"),
    pytest.param(mq.Int8(granularity="tensor"), (8, True, 0), id="int8-sym-tensor"),
    pytest.param(mq.Int8(granularity="tensor", symmetric=False), (8, False, 0), id="int8-affine-tensor"),
    pytest.param(mq.Int4(group_size=32), (4, False, 32), id="int4-affine-g32"),
    pytest.param(mq.Int4(group_size=64), (4, False, 64), id="int4-affine-g64"),
    pytest.param(mq.Int4(group_size=128), (4, False, 128), id="int4-affine-g128"),
    pytest.param(mq.Int4(group_size=256), (4, False, 256), id="int4-affine-g256"),
    pytest.param(mq.Int4(group_size=128, symmetric=True), (4, True, 128), id="int4-sym-g128"),
    pytest.param(mq.Int4(group_size=32, symmetric=True), (4, True, 32), id="int4-sym-g32"),
    pytest.param(mq.Float16(), torch.float16, id="float16"),
    pytest.param(mq.BFloat16(), torch.bfloat16, id="bfloat16"),
]

# (factory, input shape): every flattened input size is a multiple of 256 except the depthwise conv (9)
MODULES = [
    pytest.param(lambda: nn.Linear(512, 48), (5, 512), id="linear"),
    pytest.param(lambda: nn.Linear(512, 32, bias=False), (2, 3, 512), id="linear-nobias-3d"),
    pytest.param(lambda: nn.Conv1d(128, 32, 2, stride=2, padding=1), (2, 128, 11), id="conv1d-stride-pad"),
    pytest.param(lambda: nn.Conv1d(128, 16, 2, padding="same", padding_mode="reflect", bias=False),
                 (2, 128, 9), id="conv1d-same-reflect-nobias"),
    pytest.param(lambda: nn.Conv2d(64, 32, 2, stride=(2, 1), dilation=2, padding=(1, 2), padding_mode="circular"),
                 (2, 64, 9, 8), id="conv2d-dilation-circular"),
    pytest.param(lambda: nn.Conv2d(128, 32, 2, groups=2, padding=1, padding_mode="reflect"), (1, 128, 6, 7),
                 id="conv2d-groups-reflect"),
    pytest.param(lambda: nn.Conv2d(64, 64, 3, groups=64, padding="same"), (2, 64, 7, 7), id="conv2d-depthwise-same"),
    pytest.param(lambda: nn.Conv3d(32, 16, 2, padding=1, padding_mode="replicate", bias=False), (1, 32, 4, 5, 3),
                 id="conv3d-replicate-nobias"),
]


def _quantize(module: nn.Module, spec: mq.WeightSpec, compute_dtype=None) -> mq.QuantModule:
    cls = mq.QuantLinear if isinstance(module, nn.Linear) else getattr(mq, "Quant" + type(module).__name__)
    return cls.from_float(module, mq.QuantConfig(spec, compute_dtype=compute_dtype))


def _expected_weight(module: nn.Module, spec, ref) -> torch.Tensor:
    if isinstance(ref, torch.dtype):
        return module.weight.detach().to(ref).double()
    bits, symmetric, group = ref
    if group not in (None, 0):
        group = spec.resolve_group_size(module.weight[0].numel())
    return reference_quantize(module.weight, bits, symmetric, group)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("make, shape", MODULES)
@pytest.mark.parametrize("spec, ref", SCHEMES)
def test_dequantized_weight_equals_reference_and_forward_matches(make, shape, spec, ref):
    module = make().eval()
    q = _quantize(module, spec)
    expected = _expected_weight(module, spec, ref)
    assert torch.equal(q.dequantize_weight(torch.float64), expected)
    assert torch.equal(q.dequantize_weight(), expected.float())  # float32: (q - z) * s rounds once, exactly
    assert q.weight.shape == module.weight.shape and q.weight.dtype == torch.float32

    ref_module = copy.deepcopy(module).double()
    with torch.no_grad():
        ref_module.weight.copy_(expected)
    x = torch.randn(shape)
    with torch.no_grad():
        want = ref_module(x.double())
        y = q(x)
        assert y.dtype == x.dtype and y.shape == want.shape
        assert _rel_err(y, want) <= 1e-2, q.last_kernel  # default kernels may compute in bf16
        q32 = _quantize(module, spec, compute_dtype=torch.float32)
        y32 = q32(x)
        # float32 compute: the float path, for a conv possibly through another float32 algorithm
        assert q32.last_kernel in ("dequant", "dequant_conv", "dequant_conv_channels_last", "dequant_conv_im2col")
        assert _rel_err(y32, want) <= 1e-5


@pytest.mark.parametrize("make, shape", MODULES[:3])
def test_non_power_of_two_group_size(make, shape):
    module = make()
    k = module.weight[0].numel()  # 512 or 256
    spec = mq.Int4(group_size=k // 2 if k % 3 else 96)
    q = _quantize(module, spec)
    assert q.group_size == spec.group_size
    assert torch.equal(q.dequantize_weight(torch.float64), reference_quantize(module.weight, 4, False, q.group_size))


def test_group_size_96_on_480_inputs_uses_fallback_kernel():
    lin = nn.Linear(480, 32)
    q = _quantize(lin, mq.Int4(group_size=96))
    assert q.group_size == 96 and q.scale.shape == (32, 5)
    assert torch.equal(q.dequantize_weight(torch.float64), reference_quantize(lin.weight, 4, False, 96))
    x = torch.randn(3, 480)
    with torch.no_grad():
        y = q(x)
        want = torch.nn.functional.linear(x.double(), q.dequantize_weight(torch.float64), q.bias.double())
    assert q.last_kernel in ("fused_cpu", "dequant_bf16", "dequant")  # not int4pack_cpu
    assert _rel_err(y, want) <= 1e-2


@pytest.mark.parametrize("spec", [mq.Int8(), mq.Int4(group_size=32)], ids=["int8", "int4"])
def test_stored_buffers_dtypes_and_shapes(spec):
    q = _quantize(nn.Linear(96, 16), spec)
    names = {n: (tuple(b.shape), b.dtype) for n, b in q.named_buffers()}
    if isinstance(spec, mq.Int4):
        assert names == {"qweight": ((16, 48), torch.uint8), "scale": ((16, 3), torch.float32),
                         "zero_point": ((16, 3), torch.uint8), "bias": ((16,), torch.float32)}
    else:
        assert names == {"qweight": ((16, 96), torch.int8), "scale": ((16,), torch.float32),
                         "bias": ((16,), torch.float32)}
    assert not list(q.parameters())  # no float copy of the weight anywhere


def test_to_float_round_trip_and_repr():
    lin = nn.Linear(64, 32)
    q = _quantize(lin, mq.Int4(group_size=32))
    f = q.to_float()
    assert type(f) is nn.Linear and torch.equal(f.weight, q.dequantize_weight()) and torch.equal(f.bias, lin.bias)
    conv = nn.Conv2d(8, 4, 2, padding="same", padding_mode="reflect")
    qc = _quantize(conv, mq.Int8())
    fc = qc.to_float()
    assert type(fc) is nn.Conv2d and fc.padding == "same" and fc.padding_mode == "reflect"
    with torch.no_grad():
        x = torch.randn(1, 8, 5, 5)
        assert _rel_err(qc(x), fc(x)) <= 1e-6  # default conv path computes in the input's dtype
    assert "scheme=int4-affine-g32" in repr(q)
    assert "padding_mode=reflect" in repr(qc)


def test_from_float_wrong_type_and_meta_errors():
    with pytest.raises(mq.ConfigError, match="expects Linear"):
        mq.QuantLinear.from_float(nn.Conv1d(2, 2, 1), mq.Int8())
    with pytest.raises(mq.ConfigError, match="meta device"):
        mq.QuantLinear.from_float(nn.Linear(4, 4, device="meta"), mq.Int8())
    with pytest.raises(mq.ConfigError, match="no INT4 group size fits an input size of 262"):
        mq.QuantLinear.from_float(nn.Linear(262, 4), mq.Int4(group_size=128))
    bad = nn.Linear(4, 4)
    with torch.no_grad():
        bad.weight[1, 2] = float("inf")
    with pytest.raises(mq.NonFiniteWeightError, match="layer fc1"):
        mq.QuantLinear.from_float(bad, mq.Int8(), name="fc1")


@pytest.mark.parametrize("bias", [True, False])
def test_dtype_conversion_moves_the_float_dtype_with_or_without_bias(bias):
    q = mq.QuantLinear.from_float(nn.Linear(64, 32, bias=bias), mq.Int8())
    q.half()
    assert q.float_dtype == torch.float16 and q.weight.dtype == torch.float16
    assert q.to_float().weight.dtype == torch.float16
    assert q.qweight.dtype == torch.int8 and q.scale.dtype == torch.float32  # stored buffers keep theirs
    q.to(torch.device("cpu"))  # a device move leaves the dtype alone
    assert q.float_dtype == torch.float16
    q.to(torch.bfloat16)
    assert q.float_dtype == torch.bfloat16 and q.dequantize_weight().dtype == torch.bfloat16


def test_meta_built_quantized_model_can_be_materialised_with_to_empty_and_loaded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    cfg = mq.QuantConfig(mq.Int4(group_size=32), activations=mq.Int8(), skip=mq.SkipRules.none())
    mq.quantize_(model, cfg, calibration_data=[torch.randn(8, 64) for _ in range(2)], on_failure="ignore")
    x = torch.randn(4, 64)
    with torch.device("meta"):
        twin = copy.deepcopy(model).to("meta")
    twin.to_empty(device="cpu")
    assert twin[0].scale.dtype == torch.float32 and twin[0].input_quantizer.scale.device.type == "cpu"
    twin.load_state_dict(model.state_dict())
    assert torch.equal(twin(x), model(x))
