import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import monoquant as mq
from monoquant import functional as F
from monoquant import fused, hardware, kernels


@pytest.fixture(autouse=True)
def w8a8_arithmetic():
    """These tests check the INT8-activation arithmetic, which the static table runs; measured, a layer whose INT8
    execution is slower than its float one runs ``float_acts`` instead (tests in test_tuner / test_conv_kernels)."""
    with kernels.tuning(False):
        yield


def _calibrated_linear(cfg, k=64, n=48, batches=3):
    model = nn.Sequential(nn.Linear(k, n))
    data = [torch.randn(6, k) * 2 + 0.3 for _ in range(batches)]
    mq.quantize_(model, mq.QuantConfig(cfg[0], activations=cfg[1], skip=mq.SkipRules.none()), calibration_data=data,
                 on_failure="ignore")
    return model[0], data


def _reference(q, x):
    """Float64 reference: fake-quantized input times the dequantized weight."""
    aq = q.input_quantizer
    x2d = x.reshape(-1, x.shape[-1])
    if aq.dynamic:
        mn, mx = F.minmax(x2d.float(), mq.PerChannel(0))
        s, z = F.qparams_from_minmax(mn, mx, aq.qtype)
        xq = F.fake_quantize(x2d.double(), s.float().double()[:, None], z[:, None], aq.qtype)
    else:
        xq = F.fake_quantize(x2d.double(), aq.scale.double(), aq.zero_point, aq.qtype)
    return TF.linear(xq, q.dequantize_weight(torch.float64), q.bias.double())


@pytest.mark.parametrize("act", [mq.Int8(), mq.Int8(symmetric=True), mq.Int8(dynamic=True),
                                 mq.Int8(symmetric=True, dynamic=True)])
def test_w8a8_int_mm_is_bit_identical_to_simulated_and_matches_reference(act, monkeypatch):
    monkeypatch.setattr(kernels, "cpu_has_int_dot", lambda: True)  # only chosen with VNNI/AMX; correct anywhere
    monkeypatch.setattr(hardware, "cpu_has_avx512_vnni", lambda: False)  # else the whole-layer w8a8_vnni comes first
    q, _ = _calibrated_linear((mq.Int8(), act))
    x = torch.randn(2, 5, 64) * 2
    y = q(x)
    assert q.last_kernel == "w8a8_int_mm" and y.shape == (2, 5, 48) and y.dtype == torch.float32
    if fused.available():  # the compiled int16-pair GEMM: the same integers
        with kernels.pin("w8a8_fused"):
            y_fused = q(x)
        assert q.last_kernel == "w8a8_fused" and torch.equal(y, y_fused)
    monkeypatch.setitem(kernels._HAS, "int_mm", False)
    monkeypatch.setitem(fused._STATE, "module", None)
    y_sim = q(x)
    assert q.last_kernel == "w8a8_sim"
    assert torch.equal(y, y_sim)
    torch.testing.assert_close(y.double().reshape(10, 48), _reference(q, x), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("weights", [mq.Int8(), mq.Int4(group_size=32)])
@pytest.mark.parametrize("int_mm", [True, False])
def test_dynamic_activations_accept_an_empty_batch(weights, int_mm, monkeypatch):
    monkeypatch.setitem(kernels._HAS, "int_mm", int_mm and kernels._HAS["int_mm"])
    q, _ = _calibrated_linear((weights, mq.Int8(dynamic=True)))
    for shape in [(0, 64), (2, 0, 64)]:
        y = q(torch.randn(*shape))
        assert y.shape == (*shape[:-1], 48) and y.dtype == torch.float32
    mn, mx = F.minmax(torch.empty(0, 64), mq.PerChannel(0))
    assert mn.shape == mx.shape == (0,)
    assert F.group_view(torch.empty(0, 64), mq.PerGroup(32)).shape == (0, 2, 32)


def test_static_qparams_come_from_the_observer():
    q, data = _calibrated_linear((mq.Int8(), mq.Int8(observer=mq.MinMaxObserver())))
    lo = min(float(d.min()) for d in data)
    hi = max(float(d.max()) for d in data)
    assert float(q.input_quantizer.scale) == pytest.approx((hi - lo) / 255, rel=1e-6)
    assert int(q.input_quantizer.zero_point) == round(-lo / ((hi - lo) / 255))
    assert q.input_quantizer.scale.dtype == torch.float32


def test_the_default_activation_observer_is_the_outlier_robust_histogram():
    torch.manual_seed(0)
    q, data = _calibrated_linear((mq.Int8(), mq.Int8()))
    reference = mq.HistogramObserver().configure(mq.QType(8, symmetric=False), mq.PerTensor())
    for d in data:
        reference(d)
    scale, zero = reference.calculate_qparams()
    assert float(q.input_quantizer.scale) == float(scale.float()) and int(q.input_quantizer.zero_point) == int(zero)


@pytest.mark.parametrize("weights", [mq.Int4(group_size=32), mq.Int8(symmetric=False), mq.Float16()])
@pytest.mark.parametrize("dynamic", [False, True])
def test_other_weights_with_int8_activations_are_simulated(weights, dynamic):
    q, _ = _calibrated_linear((weights, mq.Int8(dynamic=dynamic)))
    x = torch.randn(4, 64)
    y = q(x)
    assert q.last_kernel == "act_sim"
    xq = q.input_quantizer.fake_quantize(x)
    inner = kernels.choose_linear_kernel(q, x.device, 4, False, weights_only=True)
    assert torch.equal(y, kernels._LINEAR[inner](q, xq))
    torch.testing.assert_close(y.double(), _reference(q, x), rtol=2e-2, atol=2e-2)  # bf16 weight kernels


def test_dynamic_scales_are_per_token():
    q, _ = _calibrated_linear((mq.Int8(), mq.Int8(dynamic=True)))
    x = torch.randn(3, 64)
    x[1] *= 100  # a loud token must not coarsen the others
    y = q(x)
    ref_quiet = q(x[[0]])
    assert torch.equal(y[0], ref_quiet[0])


def test_conv_with_static_activations_uses_fake_quantized_input():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1))
    data = [torch.randn(2, 4, 6, 6) for _ in range(2)]
    mq.quantize_(model, mq.QuantConfig(mq.Int8(), activations=mq.Int8(), skip=mq.SkipRules.none()),
                 calibration_data=data, on_failure="ignore")
    conv = model[0]
    x = torch.randn(1, 4, 6, 6)
    xq = conv.input_quantizer.fake_quantize(x)
    ref = TF.conv2d(xq, conv.dequantize_weight(), conv.bias, padding=1)
    torch.testing.assert_close(conv(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv, shape", [(nn.Conv1d(4, 8, 3), (4, 10)), (nn.Conv2d(4, 8, 3), (4, 6, 6))])
def test_conv_dynamic_activations_are_per_sample_for_unbatched_and_empty_inputs(conv, shape):
    model = nn.Sequential(conv)
    mq.quantize_(model, mq.QuantConfig(mq.Int8(), activations=mq.Int8(dynamic=True), skip=mq.SkipRules.none()))
    x = torch.randn(*shape)
    x[0] *= 50  # a loud channel: per-channel scales (the old unbatched behaviour) would differ from per-sample
    assert torch.equal(model(x), model(x[None])[0])
    y = model(torch.randn(0, *shape))
    assert y.shape[0] == 0 and y.shape[1] == 8


def test_half_model_and_state_dict_keep_activation_qparams():
    q, _ = _calibrated_linear((mq.Int8(), mq.Int8()))
    sd = q.state_dict()
    assert {"input_quantizer.scale", "input_quantizer.zero_point", "input_quantizer.frozen"} <= set(sd)
    scale = q.input_quantizer.scale.clone()
    q.half()
    assert q.input_quantizer.scale.dtype == torch.float32 and torch.equal(q.input_quantizer.scale, scale)


def test_int_mm_shape_rules():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert kernels.int_mm_shape_ok(cpu, 1, 5, 7)
    assert not kernels.int_mm_shape_ok(cuda, 16, 64, 64)
    assert kernels.int_mm_shape_ok(cuda, 17, 64, 64)
    assert not kernels.int_mm_shape_ok(cuda, 32, 60, 64)


def test_gradients_take_the_simulated_path():
    q, _ = _calibrated_linear((mq.Int8(), mq.Int8()))
    x = torch.randn(2, 64, requires_grad=True)
    q(x).sum().backward()
    assert q.last_kernel == "act_sim" and x.grad is not None


@pytest.mark.parametrize("k", [8, 12, 24, 40])
def test_int8pack_is_not_chosen_for_inputs_it_would_crash_on(k):
    # torch 2.13's _weight_int8pack_mm segfaults unless K % 16 == 0; W8A8 layers fall back on the same table
    q = mq.QuantLinear.from_float(nn.Linear(k, 16), mq.Int8())
    assert kernels.choose_linear_kernel(q, torch.device("cpu"), 2, False) != "int8pack_cpu"
    assert q(torch.randn(2, k)).shape == (2, 16)


@pytest.mark.parametrize("act", [mq.Int8(), mq.Int8(symmetric=True, dynamic=True), mq.Int8(dynamic=True)])
@pytest.mark.parametrize("kernel", ["w8a8_int_mm", "w8a8_fused", "w8a8_vnni", "w8a8_sim", "act_sim"])
def test_integer_paths_turn_non_finite_input_rows_into_nan_rows(act, kernel, monkeypatch):
    """A NaN or inf cannot be an INT8 code: those rows' outputs are NaN (as in float), the other rows unchanged;
    the float simulation (``act_sim``) agrees, so the output does not depend on the kernel a machine picks."""
    monkeypatch.setattr(kernels, "cpu_has_int_dot", lambda: True)
    if kernel == "w8a8_fused" and not fused.available():
        pytest.skip("no compiled kernel here")
    if kernel == "w8a8_vnni" and not (hardware.cpu_has_avx512_vnni() and fused.available() and fused.has_vnni()):
        pytest.skip("no AVX512-VNNI CPU or no compiled VNNI kernel here")
    if kernel == "w8a8_sim":
        monkeypatch.setitem(kernels._HAS, "int_mm", False)
        monkeypatch.setitem(fused._STATE, "module", None)
    q, _ = _calibrated_linear((mq.Int8(), act))
    x = torch.randn(5, 64)
    with kernels.pin(kernel):
        clean = q(x)
        x[1, 3], x[3, 0] = float("nan"), float("inf")
        y = q(x)
    assert q.last_kernel == kernel
    assert torch.isnan(y[[1, 3]]).all() and torch.isfinite(y[[0, 2, 4]]).all()
    assert torch.equal(y[[0, 2, 4]], clean[[0, 2, 4]])
