"""The compiled fused kernel (and the PyTorch fallback when it cannot be built) against the float64 reference."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import monoquant as mq
from monoquant import fused, kernels, schemes

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
