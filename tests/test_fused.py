"""The compiled fused kernel (and the PyTorch fallback when it cannot be built) against the float64 reference."""

import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import monoquant as mq
from monoquant import call_plans, fused, hardware, kernels, schemes
from monoquant import functional as F_
from monoquant.nn.activation import ActivationQuantizer

needs_ext = pytest.mark.skipif(not fused.available(), reason=f"no compiled kernel here: {fused.load_error()}")


def layer(k: int, n: int, spec, seed: int = 0) -> mq.QuantLinear:
    g = torch.Generator().manual_seed(seed)
    group = spec.group_size if spec.kind == "int4" else None
    q = mq.QuantLinear(k, n, spec=spec, group_size=group)
    q.set_stored(schemes.quantize_weight(spec, torch.randn(n, k, generator=g) * 0.1, group))
    q.bias.copy_(torch.randn(n, generator=g))
    return q


def reference(q: mq.QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """``x W^T + b`` in float64 with ``W`` from :func:`monoquant.schemes.dequantize_weight`."""
    w = schemes.dequantize_weight(q.spec, q.stored, q.in_features, q.group_size, torch.float64)
    return F.linear(x.double(), w, q.bias.double())


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))


specs = st.one_of(
    st.builds(lambda g, s: mq.Int4(group_size=g, symmetric=s), st.sampled_from([3, 7, 16, 32, 64, 96, 128]),
              st.booleans()),
    st.builds(lambda s, gran: mq.Int8(symmetric=s, granularity=gran), st.booleans(),
              st.sampled_from(["channel", "tensor"])),
)


@needs_ext
@settings(max_examples=60, deadline=None)
@given(spec=specs, groups=st.integers(1, 9), n=st.integers(1, 70), rows=st.integers(1, 19),
       seed=st.integers(0, 2**16))
def test_fused_kernel_matches_reference_on_odd_shapes(spec, groups, n, rows, seed):
    """Any group, odd K, N not a multiple of the tiles, row counts across the SIMD tile sizes (1..8) and beyond."""
    k = groups * (spec.group_size if spec.kind == "int4" else 331)  # INT8: K up to 2979, several column chunks
    q = layer(k, n, spec, seed)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed + 1))
    with kernels.pin("fused_cpu"), torch.no_grad():
        y = q(x)
    assert q.last_kernel == "fused_cpu" and y.dtype == torch.float32 and y.shape == (rows, n)
    # float32 rounding of a dot product is bounded by the sum of |terms|, not by the (possibly cancelling) result
    w = schemes.dequantize_weight(q.spec, q.stored, q.in_features, q.group_size, torch.float64)
    magnitude = x.double().abs() @ w.abs().t() + q.bias.double().abs()
    assert torch.all((y.double() - reference(q, x)).abs() <= 1e-4 * magnitude + 1e-12)


@needs_ext
@pytest.mark.parametrize("spec", [mq.Int4(group_size=128), mq.Int4(group_size=32, symmetric=True), mq.Int8(),
                                  mq.Int8(symmetric=False)], ids=lambda s: s.describe())
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40])
def test_fused_kernel_simd_path_matches_reference(spec, rows):
    """Shapes the SIMD loop takes whole (K a multiple of 32, chunked over columns, blocks of output rows)."""
    q = layer(4096, 80, spec)
    x = torch.randn(2, rows, 4096)
    with kernels.pin("fused_cpu"), torch.no_grad():
        y = q(x)
    assert q.last_kernel == "fused_cpu" and y.shape == (2, rows, 80)
    assert rel_err(y.reshape(-1, 80), reference(q, x.reshape(-1, 4096))) <= 1e-5


@needs_ext
def test_fused_kernel_keeps_the_input_dtype():
    q = layer(256, 32, mq.Int4(group_size=64))
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        with kernels.pin("fused_cpu"), torch.no_grad():
            y = q(torch.randn(2, 256, dtype=dtype))
        assert q.last_kernel == "fused_cpu" and y.dtype == dtype


@needs_ext
def test_fused_kernel_rejects_wrong_buffers_with_a_message():
    q = layer(64, 16, mq.Int4(group_size=32))
    with pytest.raises(RuntimeError, match="group_size must divide K"):
        fused.int4_linear(torch.randn(1, 64), q.qweight, q.scale, q.zero_point, 48)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        fused.int4_linear(torch.randn(1, 64).double(), q.qweight, q.scale, q.zero_point, 32)


@needs_ext
@settings(max_examples=80, deadline=None)
@given(spec=specs, groups=st.integers(1, 9), n=st.integers(1, 40), data=st.data(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), scaled=st.booleans(),
       scale_factor=st.sampled_from([1.0, 1e-30, 3e-39, 1e30]), seed=st.integers(0, 2**16))
def test_compiled_dequantize_is_bit_identical(spec, groups, n, data, dtype, scaled, scale_factor, seed):
    """The one-pass compiled dequantize equals the format's PyTorch passes bit for bit: any group, odd K, a slice
    of rows, float32 and bf16 (round to nearest even of the float32 product), tiny, subnormal and huge scales."""
    k = groups * (spec.group_size if spec.kind == "int4" else 37)
    q = layer(k, n, spec, seed)
    q.scale.mul_(scale_factor)
    row_start = data.draw(st.integers(0, n - 1))
    rows = data.draw(st.integers(1, n - row_start))
    out = torch.full((rows, k), float("nan"), dtype=dtype)
    spec.fused_dequantize(out, q.qweight, q.scale, q.zero_point, q.group_size, row_start, scaled)
    ref = torch.empty(rows, k, dtype=dtype)
    q.spec.dequantize_into(ref, q.stored, row_start, q.spec.dequant_params(q.stored, dtype), q.group_size,
                           scaled=scaled)
    assert torch.equal(out.view(torch.int16) if dtype == torch.bfloat16 else out.view(torch.int32),
                       ref.view(torch.int16) if dtype == torch.bfloat16 else ref.view(torch.int32))


@needs_ext
@pytest.mark.parametrize("spec", [mq.Int4(group_size=128), mq.Int8(symmetric=False)], ids=lambda s: s.describe())
def test_layers_dequantize_with_the_compiled_pass_and_without_it_alike(spec, monkeypatch):
    q = layer(4096, 48, spec)
    x = torch.randn(300, 4096)
    with torch.no_grad(), kernels.pin("dequant"):
        compiled = [q.dequantize_weight(torch.bfloat16), q.dequantize_weight(torch.float32), q(x)]
    monkeypatch.setitem(fused._STATE, "module", None)
    assert q.spec.compiled_dequantize_into(torch.empty(1, 4096), q.stored, 0, q.group_size) is None
    with torch.no_grad(), kernels.pin("dequant"):
        fallback = [q.dequantize_weight(torch.bfloat16), q.dequantize_weight(torch.float32), q(x)]
    for a, b in zip(compiled, fallback):
        assert torch.equal(a, b)


@needs_ext
@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 20), n=st.integers(1, 40), k=st.integers(1, 300), seed=st.integers(0, 2**16),
       extreme=st.booleans())
def test_w8a8_gemm_is_exact(m, n, k, seed, extreme):
    """Every int32 sum exact, for row counts across the 1..6-row tiles, panels cut short and odd K; ``extreme``
    fills both sides with -128, the largest products."""
    g = torch.Generator().manual_seed(seed)
    if extreme:
        a, w = torch.full((m, k), -128, dtype=torch.int8), torch.full((n, k), -128, dtype=torch.int8)
    else:
        a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
        w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    acc = fused.w8a8_gemm(a, fused.w8a8_pack(w), n)
    assert acc.dtype == torch.int32 and torch.equal(acc.long(), a.long() @ w.long().t())


@needs_ext
def test_w8a8_gemm_rejects_what_it_cannot_do_exactly():
    with pytest.raises(RuntimeError, match="2\\^17"):
        fused.w8a8_pack(torch.zeros(1, fused.W8A8_MAX_K + 1, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="int8"):
        fused.w8a8_pack(torch.zeros(2, 4, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="disagree"):
        fused.w8a8_gemm(torch.zeros(1, 6, dtype=torch.int8), fused.w8a8_pack(torch.zeros(2, 4, dtype=torch.int8)), 2)


@needs_ext
@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 12), k=st.integers(1, 70), symmetric=st.booleans(), per_row=st.booleans(),
       ties=st.booleans(), seed=st.integers(0, 2**16))
def test_quantize_rows_equals_the_float32_ops(m, k, symmetric, per_row, ties, seed):
    """Division, round half to even (``ties``: inputs exactly halfway between codes), zero-point, clamp (inputs
    beyond the range) and shift, bit for bit against the PyTorch ops ``ActivationQuantizer.quantize`` runs."""
    g = torch.Generator().manual_seed(seed)
    qt = mq.QType(bits=8, symmetric=symmetric)
    scale = (torch.rand(m if per_row else 1, 1, generator=g) * 0.1 + 1e-3).float()
    zero = torch.zeros_like(scale, dtype=torch.int32) if symmetric else torch.randint(0, 256, scale.shape,
                                                                                      generator=g, dtype=torch.int32)
    if ties:
        x = ((torch.randint(-300, 300, (m, k), generator=g) + 0.5) * scale).float()
    else:
        x = torch.randn(m, k, generator=g) * 300 * scale
    shift = 0 if symmetric else 128
    codes = fused.quantize_rows(x, scale.reshape(-1).contiguous(), None if symmetric else zero.reshape(-1),
                                qt.qmin, qt.qmax, shift)
    ref = torch.div(x, scale).round_()
    if not symmetric:
        ref += zero
    ref = ref.clamp_(qt.qmin, qt.qmax).sub_(shift).to(torch.int8)
    assert torch.equal(codes, ref)


@needs_ext
@settings(max_examples=80, deadline=None)
@given(m=st.integers(1, 12), k=st.integers(1, 70), symmetric=st.booleans(), seed=st.integers(0, 2**16),
       rows=st.sampled_from(["normal", "positive", "negative", "zero", "constant", "tiny", "huge", "ties"]),
       bf16=st.booleans())
def test_dynamic_quantize_rows_equals_the_observer_qparams_and_codes(m, k, symmetric, seed, rows, bf16):
    """Per-row min/max, the float64 qparams (eps floor, zero-point rounding) and the codes, bit for bit against
    what ``ActivationQuantizer.qparams`` + ``quantize`` compute, on rows that hit each branch; a bf16 input read
    as it is gives what its float32 copy gives."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x = {"normal": x, "positive": x.abs(), "negative": -x.abs(), "zero": x * 0, "constant": x * 0 + 0.37,
         "tiny": x * 1e-42, "huge": x * 1e30, "ties": torch.round(x * 10) + 0.5}[rows].float()
    if bf16:
        x = x.bfloat16().float()  # the reference sees exactly the values the bf16 kernel reads
    act = ActivationQuantizer(mq.Int8(symmetric=symmetric, dynamic=True))
    codes, scale, zero = fused.dynamic_quantize_rows(x.bfloat16() if bf16 else x, act.qtype.qmin, act.qtype.qmax,
                                                     symmetric, F_.SCALE_EPS)
    ref_codes, ref_scale, ref_zero = act.quantize(x)
    shift = 0 if symmetric else 128
    assert torch.equal(scale, ref_scale.reshape(-1)) and torch.equal(zero, ref_zero.reshape(-1).to(torch.int32))
    assert torch.equal(codes, ref_codes.sub(shift).to(torch.int8))


@needs_ext
@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 9), n=st.integers(1, 40), x_rows=st.booleans(), w_cols=st.booleans(),
       with_bias=st.booleans(), with_zero=st.booleans(), bf16_out=st.booleans(), seed=st.integers(0, 2**16))
def test_rescale_rows_equals_the_float32_ops(m, n, x_rows, w_cols, with_bias, with_zero, bf16_out, seed):
    """The zero-point term (int32, as the in-place rank-1 update it replaces), the scales, the bias and the bf16
    rounding of the output, bit for bit against the PyTorch ops."""
    g = torch.Generator().manual_seed(seed)
    acc = torch.randint(-2**30, 2**30, (m, n), generator=g, dtype=torch.int32)
    xs = torch.rand(m if x_rows else 1, 1, generator=g) * 1e-3
    ws = torch.rand(n if w_cols else 1, generator=g) * 1e-2
    bias = torch.randn(n, generator=g) if with_bias else None
    zero = torch.randint(-128, 128, (m,), generator=g, dtype=torch.int32) if with_zero else None
    rowsum = torch.randint(-2**22, 2**22, (n,), generator=g, dtype=torch.int32) if with_zero else None
    y = fused.rescale_rows(acc, xs.reshape(-1).contiguous(), ws, bias, zero, rowsum, bf16_out)
    ref = acc.clone()
    if with_zero:
        ref.addr_(zero, rowsum, alpha=-1)
    ref = ref.to(torch.float32).mul_(xs).mul_(ws)
    if bias is not None:
        ref.add_(bias)
    assert torch.equal(y, ref.bfloat16() if bf16_out else ref)


@needs_ext
@pytest.mark.parametrize("symmetric", [False, True])
def test_w8a8_on_bf16_inputs_equals_its_float32_inputs_rounded(symmetric):
    """A bf16 input is quantized as read and the output written as bf16 in the rescale pass: the same numbers as
    the float32 copy of the input through the same kernel, rounded to bf16 at the end."""
    lin = torch.nn.Sequential(torch.nn.Linear(96, 40))
    mq.quantize_(lin, mq.QuantConfig(mq.Int8(), activations=mq.Int8(symmetric=symmetric, dynamic=True),
                                     skip=mq.SkipRules.none()))
    x = torch.randn(7, 96).bfloat16()
    ran = set()
    for name in ("w8a8_fused", "w8a8_int_mm", "w8a8_onednn", "w8a8_vnni"):  # the last three: VNNI, AMX, AVX512-VNNI
        with kernels.pin(name), torch.no_grad():
            y, ref = lin(x), lin(x.float())
        if lin[0].last_kernel == name:
            ran.add(name)
            assert y.dtype == torch.bfloat16 and torch.equal(y, ref.bfloat16()), name
    assert "w8a8_fused" in ran


def test_without_a_compiler_the_pytorch_kernels_run(monkeypatch):
    """The fallback: when the extension cannot be built, fused_cpu is never chosen and results are unchanged."""
    monkeypatch.setitem(fused._STATE, "module", None)
    monkeypatch.setitem(fused._STATE, "error", "forced by the test")
    assert not fused.available() and fused.load_error() == "forced by the test"
    for spec in (mq.Int4(group_size=32), mq.Int8(symmetric=False)):
        q = layer(96, 24, spec)
        x = torch.randn(3, 96)
        with torch.no_grad():
            y = q(x)
        assert q.last_kernel in ("dequant", "dequant_bf16")
        assert rel_err(y, reference(q, x)) <= 1e-2  # bf16 where the CPU has fast bf16
        with kernels.pin("fused_cpu"), torch.no_grad():
            q(x)
        assert q.last_kernel != "fused_cpu"  # a pin never runs an ineligible kernel


def test_disabled_by_environment(monkeypatch):
    monkeypatch.delitem(fused._STATE, "module", raising=False)
    monkeypatch.delitem(fused._STATE, "error", raising=False)
    monkeypatch.setenv("MONOQUANT_NO_EXT", "1")
    assert fused.load() is None and fused.load_error() == "disabled by MONOQUANT_NO_EXT"


def test_cpu_identity_names_model_and_simd_flags():
    ident = fused.cpu_identity()
    assert ident.endswith("]") and "[" in ident
    with open("/proc/cpuinfo") as f:
        text = f.read()
    if "avx2" in text.split():
        assert "avx2" in ident.split("[")[1]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


@needs_ext
@pytest.mark.skipif("avx2" not in _cpu_flags() or "avx512f" not in _cpu_flags(),
                    reason="the AVX2 path is what this CPU builds natively (or it cannot run it)")
def test_the_avx2_build_matches_the_reference_on_an_avx512_machine():
    """An AVX-512 machine normally builds and tests only the AVX-512 path; build the AVX2 one too (what an
    AVX2-only CPU runs) and check its matmul and dequantize in a fresh process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, MONOQUANT_EXT_ARCH="haswell")
    script = Path(__file__).with_name("_avx2_check.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "avx2 ok" in done.stdout, done.stdout + done.stderr


needs_onednn = pytest.mark.skipif(not (fused.available() and hardware.HAS["onednn_qlinear"]
                                       and hardware.cpu_has_amx()),
                                  reason="needs oneDNN's int8 matmul op and a CPU with AMX")


@needs_onednn
@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 300), n=st.integers(1, 40), rows=st.integers(1, 40), symmetric=st.booleans(),
       bf16=st.booleans(), seed=st.integers(0, 2**16))
def test_w8a8_onednn_equals_the_compiled_integer_gemm(k, n, rows, symmetric, bf16, seed):
    """oneDNN's int8 matmul (float32 sums, exact below 2**24) gives the same numbers as the exact int32 GEMM."""
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Sequential(torch.nn.Linear(k, n))
    with torch.no_grad():
        lin[0].weight.copy_(torch.randn(n, k, generator=g))
    mq.quantize_(lin, mq.QuantConfig(mq.Int8(), activations=mq.Int8(symmetric=symmetric, dynamic=True),
                                     skip=mq.SkipRules.none()))
    x = torch.randn(rows, k, generator=g) * 3
    x = x.bfloat16() if bf16 else x
    with torch.no_grad():
        with kernels.pin("w8a8_fused"):
            ref = lin(x)
        with kernels.pin("w8a8_onednn"):
            y = lin(x)
    assert lin[0].last_kernel == "w8a8_onednn" and torch.equal(y, ref)


@needs_onednn
def test_w8a8_onednn_declines_weights_whose_sums_could_pass_float32s_exact_integers():
    """``128 * max_n sum_k |w[n, k]| >= 2**24`` (K = 1040 codes of -128): the sums might round, so it is not
    eligible; with 40 of the codes zeroed it is."""
    lin = torch.nn.Sequential(torch.nn.Linear(1040, 16))
    with torch.no_grad():
        lin[0].weight.fill_(-1.0)
    mq.quantize_(lin, mq.QuantConfig(mq.Int8(), activations=mq.Int8(dynamic=True), skip=mq.SkipRules.none()))
    assert 128 * 128 * 1040 >= 2**24
    with kernels.pin("w8a8_onednn"), torch.no_grad():
        lin(torch.randn(3, 1040))
    assert lin[0].last_kernel != "w8a8_onednn"
    with torch.no_grad():
        lin[0].quant_weight.stored.qweight[:, 1000:] = 0  # 128 * 128 * 1000 < 2**24
        lin[0].quant_weight.clear_cache()
    with kernels.pin("w8a8_onednn"), torch.no_grad():
        lin(torch.randn(3, 1040))
    assert lin[0].last_kernel == "w8a8_onednn"


def _fused_call(q: mq.QuantLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The compiled float32 kernel of ``q``'s format called directly on ``x`` ``[rows, K]``."""
    s = q.stored
    if q.spec.kind == "int4":
        return fused.int4_linear(x, s.qweight, s.scale, s.zero_point, q.group_size, bias)
    return fused.int8_linear(x, s.qweight, s.scale, s.zero_point, bias)


@needs_ext
@settings(max_examples=60, deadline=None)
@given(spec=specs, groups=st.integers(1, 6), n=st.integers(1, 150), rows=st.integers(1, 64),
       seed=st.integers(0, 2**16))
def test_the_kernel_adds_the_bias_as_one_rounding_and_splits_over_threads_without_changing_a_bit(spec, groups, n,
                                                                                                  rows, seed):
    """Rows 1..64, odd K and N, any group: the bias added inside the kernel equals ``y.add_(bias)`` on its output bit
    for bit, the result is within float32 rounding of the float64 reference, and one thread gives the same bits as
    several (the split is over output rows, each output summed in the same order)."""
    k = groups * (spec.group_size if spec.kind == "int4" else 67)
    q = layer(k, n, spec, seed)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed + 1))
    y = _fused_call(q, x, q.bias)
    assert torch.equal(y, _fused_call(q, x, None).add_(q.bias))
    w = schemes.dequantize_weight(q.spec, q.stored, q.in_features, q.group_size, torch.float64)
    magnitude = x.double().abs() @ w.abs().t() + q.bias.double().abs()
    assert torch.all((y.double() - reference(q, x)).abs() <= 1e-4 * magnitude + 1e-12)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _fused_call(q, x, q.bias)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, y)


@needs_ext
@pytest.mark.parametrize("spec", [mq.Int4(group_size=128), mq.Int4(group_size=32, symmetric=True), mq.Int8(),
                                  mq.Int8(symmetric=False)], ids=lambda s: s.describe())
@pytest.mark.parametrize("rows", [1, 2, 16, 64])
def test_a_layer_large_enough_to_split_gives_the_same_bits_on_one_and_two_threads(spec, rows):
    """1024 -> 256 (the digits CNN's fc size, wider): at these rows the work is split into tasks on two threads and
    runs on one thread without the split; both equal, and the bias and a bad bias are handled."""
    q = layer(1024, 256, spec)
    x = torch.randn(rows, 1024, generator=torch.Generator().manual_seed(rows))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = _fused_call(q, x, q.bias)
        torch.set_num_threads(1)
        one = _fused_call(q, x, q.bias)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert rel_err(two, reference(q, x)) <= 1e-5
    with pytest.raises(RuntimeError, match="bias must be contiguous float32"):
        _fused_call(q, x, q.bias[:-1])


@needs_ext
@pytest.mark.parametrize("spec", [mq.Int4(group_size=64), mq.Int8(symmetric=False)], ids=["int4", "int8"])
def test_the_per_shape_plan_of_fused_cpu_passes_the_bias_and_keeps_the_input_shape(monkeypatch, spec):
    """Measured ``fused_cpu`` (bias added in the kernel) run from the remembered plan: equal to the first call and
    to the kernel's output with the bias added outside, for 2-D and 3-D inputs; a bias that needs a gradient is
    added outside the kernel, so the output gets one."""
    from _fake_timing import timing_by_name

    timing_by_name(monkeypatch, {"fused_cpu": 0.1}, [])
    q = layer(256, 48, spec)
    for x in (torch.randn(3, 256), torch.randn(2, 5, 256)):
        with torch.no_grad():
            first = q(x)
            assert q.last_kernel == "fused_cpu"
            assert (x.shape, x.dtype) in q.quant_weight.cache[call_plans.KEY]
            second = q(x)  # from the plan
        assert q.last_kernel == "fused_cpu" and second.shape == (*x.shape[:-1], 48)
        assert torch.equal(first, second)
        assert torch.equal(second.reshape(-1, 48), _fused_call(q, x.reshape(-1, 256), None).add_(q.bias))
    q.bias.requires_grad_(True)
    x = torch.randn(3, 256)
    y = q(x)
    assert y.requires_grad
    assert torch.equal(y.detach(), _fused_call(q, x, None).add_(q.bias.detach()))


@needs_ext
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 9), co=st.integers(1, 40), h=st.integers(1, 11), w=st.integers(1, 21),
       kh=st.integers(1, 3), kw=st.integers(1, 5), ph=st.integers(0, 2), pw=st.integers(0, 2), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_direct_conv2d_is_the_float_conv_within_float32_rounding_and_the_same_bits_on_any_thread_count(
        n, c, co, h, w, kh, kw, ph, pw, bias, seed):
    """The compiled direct conv against the float64 conv: any image and kernel size (positions across the vector
    tiles of 1-4 vectors, their last one partial), output channels across the blocks of 16 and their tiles, zero
    padding; within float32 rounding of the sum of |terms|. Each output is summed by one task in one order, so one
    and two threads give the same bits."""
    assume(h + 2 * ph >= kh and w + 2 * pw >= kw)
    g = torch.Generator().manual_seed(seed)
    x, weight = torch.randn(n, c, h, w, generator=g), torch.randn(co, c, kh, kw, generator=g)
    b = torch.randn(co, generator=g) if bias else None
    y = fused.direct_conv2d(x, weight, b, ph, pw)
    ref = F.conv2d(x.double(), weight.double(), None if b is None else b.double(), padding=(ph, pw))
    terms = F.conv2d(x.double().abs(), weight.double().abs(), None if b is None else b.double().abs(),
                     padding=(ph, pw))
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert ((y.double() - ref).abs() <= terms * (c * kh * kw + 1) * 2**-23 + 1e-30).all()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        assert torch.equal(fused.direct_conv2d(x, weight, b, ph, pw), y)
    finally:
        torch.set_num_threads(threads)


@needs_ext
def test_direct_conv2d_rejects_what_it_cannot_compute_with_a_message():
    x, w = torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)
    for bad, message in (((x.transpose(2, 3), w, None, 1, 1), "x must be contiguous float32"),
                         ((x.double(), w, None, 1, 1), "x must be contiguous float32"),
                         ((x, w[:, :2].contiguous(), None, 1, 1), "weight must be contiguous float32"),
                         ((x, w, torch.randn(3), 1, 1), "bias must be contiguous float32 [CO]"),
                         ((x, torch.randn(4, 3, 9, 9), None, 1, 1), "kernel is larger than the padded input"),
                         ((x, w, None, -1, 0), "padding must not be negative")):
        with pytest.raises(RuntimeError, match=re.escape(message)):
            fused.direct_conv2d(*bad)
