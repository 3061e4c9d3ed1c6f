"""The AVX512-VNNI W8A8 kernel (``w8a8_vnni``, :func:`monoquant.fused.w8a8_vnni_linear`): the whole INT8-activation
linear layer in one compiled call. It must give the numbers of the other integer paths bit for bit (the exact int32
sums, rescaled in the same float32 order), on any shape, for dynamic and static, affine and symmetric activations,
float32 and bf16 inputs."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import monoquant as mq
from monoquant import functional as F
from monoquant import fused, hardware, kernels
from monoquant.formats import int8 as int8_format

needs_vnni = pytest.mark.skipif(
    not (fused.available() and hardware.cpu_has_avx512_vnni() and fused.has_vnni()),
    reason="needs an AVX512-VNNI CPU and the compiled kernels built for it")


def _w8a8(k: int, n: int, act: mq.Int8, *, bias: bool = True, seed: int = 0, calibrate: bool = False,
          weight: torch.Tensor | None = None) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(k, n, bias=bias))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(n, k, generator=g) if weight is None else weight)
        if bias:
            model[0].bias.copy_(torch.randn(n, generator=g))
    data = [torch.randn(8, k, generator=g) * 2 + 0.3] if calibrate else None
    mq.quantize_(model, mq.QuantConfig(mq.Int8(), activations=act, skip=mq.SkipRules.none()),
                 calibration_data=data, on_failure="ignore")
    return model


def _run(model: nn.Module, x: torch.Tensor, kernel: str) -> torch.Tensor:
    with kernels.pin(kernel), torch.no_grad():
        y = model(x)
    assert model[0].last_kernel == kernel
    return y


ACTS = st.sampled_from([mq.Int8(dynamic=True), mq.Int8(symmetric=True, dynamic=True), mq.Int8(),
                        mq.Int8(symmetric=True)])


@needs_vnni
@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 900), n=st.integers(1, 150), rows=st.integers(1, 200), act=ACTS, bf16=st.booleans(),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_vnni_equals_the_exact_int32_gemm_and_rescale(k, n, rows, act, bf16, bias, seed):
    """Every shape (K not a multiple of 4 or of the 384-column block, N not of 64, rows not of the 6-row tile or of
    a task), every activation mode, float32 and bf16 inputs: bit-identical to the compiled int16-pair GEMM +
    rescale pass."""
    model = _w8a8(k, n, act, bias=bias, seed=seed, calibrate=not act.dynamic)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed + 1)) * 3
    x = x.bfloat16() if bf16 else x
    y, ref = _run(model, x, "w8a8_vnni"), _run(model, x, "w8a8_fused")
    assert y.dtype == x.dtype and y.shape == (rows, n)
    assert torch.equal(y, ref)


@needs_vnni
@pytest.mark.parametrize("act", [mq.Int8(dynamic=True), mq.Int8(symmetric=True, dynamic=True)])
def test_vnni_matches_the_float64_reference(act):
    """Against the reference it stands for: fake-quantized input times the dequantized weight in float64, equal up
    to the float32 rounding of the rescale (the integer sums themselves are exact)."""
    model = _w8a8(384, 200, act)
    x = torch.randn(70, 384) * 2
    y = _run(model, x, "w8a8_vnni")
    q = model[0]
    xq = q.input_quantizer.fake_quantize(x).double()
    ref = torch.nn.functional.linear(xq, q.dequantize_weight(torch.float64), q.bias.double())
    torch.testing.assert_close(y.double(), ref, rtol=2e-6, atol=1e-5)


@needs_vnni
def test_vnni_sums_that_pass_int32_while_accumulating_still_come_out_exact():
    """The unsigned codes (up to 255) times weight codes of +-127 over K = 70000 sum past 2**31 inside the kernel;
    int32 wraps, and the zero-point term brings the result back into range exactly: equal to the float64 path of
    the same integers (``w8a8_sim``), and finite."""
    k = 70000
    weight = torch.full((3, k), 1.0)
    weight[1] = -1.0
    weight[2, ::2] = -1.0
    model = _w8a8(k, 3, mq.Int8(dynamic=True), weight=weight)
    x = torch.rand(2, k) + 1.0  # positive rows: affine codes near 255 (the zero-point at 0)
    y = _run(model, x, "w8a8_vnni")
    q = model[0]
    ref = int8_format._w8a8(q.quant_weight, x, q.input_quantizer, q.bias, "sim")
    assert torch.isfinite(y).all() and torch.equal(y, ref)


@needs_vnni
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
def test_vnni_codes_near_half_integers_are_the_divisions(symmetric, bf16):
    """The kernel multiplies by the reciprocal of the scale and divides only near a rounding boundary: inputs at
    (j + 1/2) s and a few float32 steps either side (where x * (1/s) and x / s can round to different integers) give
    the codes of the division, bit for bit against the int16-pair GEMM path, for static and dynamic scales."""
    torch.manual_seed(5)
    for act in (mq.Int8(symmetric=symmetric), mq.Int8(symmetric=symmetric, dynamic=True)):
        model = _w8a8(96, 70, act, calibrate=not act.dynamic)
        s = model[0].input_quantizer.scale.float() if not act.dynamic else torch.tensor(0.037)
        halves = (torch.arange(-40, 40) + 0.5).float() * s
        near = torch.stack([torch.nextafter(halves, halves + d * torch.sign(halves)) if d else halves
                            for d in (-1, 0, 1)]).reshape(-1)
        for _ in range(2):  # also the steps past the first neighbour
            near = torch.cat([near, torch.nextafter(near, near * 2)])
        x = near[torch.randperm(near.numel())][: 96 * 9].reshape(9, 96)
        if act.dynamic:  # each row's range anchored so that its own scale is (within float rounding) s
            x[:, 0], x[:, 1] = (-127 if symmetric else -128) * s, 127 * s
        x = x.bfloat16() if bf16 else x
        if act.dynamic:
            assert torch.allclose(model[0].input_quantizer.qparams(x)[0], s, rtol=1e-2 if bf16 else 1e-6)
        assert torch.equal(_run(model, x, "w8a8_vnni"), _run(model, x, "w8a8_fused"))


@needs_vnni
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_vnni_rows_with_an_inf_or_nan_come_out_nan_and_the_others_untouched(bad):
    """Dynamic qparams: the kernel itself makes a row holding an inf or NaN all NaN (no Python pass afterwards); the
    other rows equal the int16-pair GEMM path's."""
    model = _w8a8(64, 40, mq.Int8(dynamic=True))
    x = torch.randn(7, 64)
    x[2, 5] = bad
    y = _run(model, x, "w8a8_vnni")
    assert torch.isnan(y[2]).all()
    rest = [0, 1, 3, 4, 5, 6]
    assert torch.equal(y[rest], _run(model, x[rest], "w8a8_fused"))


@needs_vnni
@pytest.mark.parametrize("rows", [1, 5, 97, 300, 2048, 2053])
def test_vnni_row_scales_equal_the_quantizers_and_splits_do_not_change_the_output(rows):
    """The kernel returns the per-row scales the quantizer computes; one thread, two or three (tasks split by rows
    into the same number of chunks per thread, or by panels for few rows) give the same output, the int16-pair
    GEMM path's."""
    model = _w8a8(130, 150, mq.Int8(dynamic=True))
    q = model[0]
    x = torch.randn(rows, 130)
    w = q.quant_weight
    stored = w.stored
    packed = fused.w8a8_vnni_pack(stored.qweight)
    rowsum = stored.qweight.sum(1, dtype=torch.int32)
    act = q.input_quantizer
    args = (x, packed, 150, rowsum, stored.scale.float(), q.bias.float(), act.qtype.qmin, act.qtype.qmax, False,
            F.SCALE_EPS)
    y, scale = fused.w8a8_vnni_linear(*args)
    assert torch.equal(scale, act.qparams(x)[0].reshape(-1))
    assert torch.equal(y, _run(model, x, "w8a8_fused"))
    threads = torch.get_num_threads()
    for t in (1, 3):
        try:
            torch.set_num_threads(t)
            y1, _ = fused.w8a8_vnni_linear(*args)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(y, y1)


@needs_vnni
@settings(max_examples=15, deadline=None)
@given(k=st.integers(1, 300), n=st.integers(1, 130), rows=st.integers(1, 300), symmetric=st.booleans(),
       seed=st.integers(0, 2**16))
def test_vnni_on_a_bf16_model_takes_its_bf16_bias_as_is(k, n, rows, symmetric, seed):
    """A bf16 model (bf16 bias, bf16 input): the kernel widens the bias itself, and the output equals the int16-pair
    GEMM path's and the kernel's own with the bias widened beforehand."""
    model = _w8a8(k, n, mq.Int8(symmetric=symmetric, dynamic=True), seed=seed).to(torch.bfloat16)
    q = model[0]
    assert q.bias.dtype == torch.bfloat16
    x = (torch.randn(rows, k, generator=torch.Generator().manual_seed(seed + 1)) * 3).bfloat16()
    y = _run(model, x, "w8a8_vnni")
    assert torch.equal(y, _run(model, x, "w8a8_fused"))
    stored, act = q.quant_weight.stored, q.input_quantizer
    args = (fused.w8a8_vnni_pack(stored.qweight), n, stored.qweight.sum(1, dtype=torch.int32), stored.scale.float())
    rest = (act.qtype.qmin, act.qtype.qmax, symmetric, F.SCALE_EPS)
    assert torch.equal(fused.w8a8_vnni_linear(x, *args, q.bias, *rest)[0],
                       fused.w8a8_vnni_linear(x, *args, q.bias.float(), *rest)[0])


@needs_vnni
def test_vnni_pack_layout():
    """Panels of 64 output rows, 4 consecutive columns of a row together, the codes + 128 as uint8 (vpdpbusd's
    unsigned operand), padding 0."""
    w = torch.randint(-128, 128, (70, 9), dtype=torch.int8)
    packed = fused.w8a8_vnni_pack(w)
    assert packed.shape == (2, 3, 64, 4) and packed.dtype == torch.uint8
    padded = torch.zeros(128, 12, dtype=torch.uint8)
    padded[:70, :9] = (w.to(torch.int32) + 128).to(torch.uint8)
    assert torch.equal(packed, padded.view(2, 64, 3, 4).transpose(1, 2))


@needs_vnni
def test_vnni_rejects_what_it_cannot_compute():
    w = torch.randint(-127, 128, (8, 16), dtype=torch.int8)
    packed, rowsum = fused.w8a8_vnni_pack(w), w.sum(1, dtype=torch.int32)
    ones = torch.ones(8)
    with pytest.raises(RuntimeError, match="w8a8_vnni_pack"):
        fused.w8a8_vnni_linear(torch.randn(2, 12), packed, 8, rowsum, ones, None, 0, 255, False, 1e-7)
    with pytest.raises(RuntimeError, match="contiguous float32 or bf16"):
        fused.w8a8_vnni_linear(torch.randn(2, 16).double(), packed, 8, rowsum, ones, None, 0, 255, False, 1e-7)


@needs_vnni
def test_vnni_op_passes_opcheck():
    """The custom op's schema and fake implementation agree with the compiled kernel (what torch.compile sees)."""
    w = torch.randint(-127, 128, (20, 36), dtype=torch.int8)
    packed, rowsum = fused.w8a8_vnni_pack(w), w.sum(1, dtype=torch.int32)
    op = torch.ops.monoquant.w8a8_vnni_linear.default
    torch.library.opcheck(op, (torch.randn(5, 36), packed, 20, rowsum, torch.rand(20), torch.randn(20), 0, 255,
                               False, 1e-7, None, None))
    torch.library.opcheck(op, (torch.randn(5, 36).bfloat16(), packed, 20, rowsum, torch.rand(1), None, -128, 127,
                               True, 1e-7, torch.tensor([0.05]), None))
    torch.library.opcheck(torch.ops.monoquant.w8a8_vnni_pack.default, (w,))


def test_vnni_is_a_candidate_only_where_the_cpu_and_the_build_have_vnni(monkeypatch):
    """Without AVX512-VNNI (or without a build that has the kernel) it is never offered; the layer's output stays
    what the other integer paths give."""
    model = _w8a8(256, 512, mq.Int8(dynamic=True))
    q = model[0]
    x = torch.randn(40, 256)
    expected = hardware.cpu_has_avx512_vnni() and fused.available() and fused.has_vnni()
    names = kernels._activation_candidates(q, x.device, 40, False)
    assert ("w8a8_vnni" in names) == expected
    y = _run(model, x, "w8a8_fused")
    monkeypatch.setattr(hardware, "cpu_has_avx512_vnni", lambda: False)
    assert "w8a8_vnni" not in kernels._activation_candidates(q, x.device, 40, False)
    with kernels.pin("w8a8_vnni"), kernels.tuning(False), torch.no_grad():  # the static table's integer kernel
        y_without = model(x)
    assert q.last_kernel in ("w8a8_int_mm", "w8a8_fused") and torch.equal(y, y_without)
