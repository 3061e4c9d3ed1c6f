"""The kernel table, and each kernel's numbers against ``F.linear`` on the dequantized weight."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import monoquant as mq
from monoquant import kernels, tuner
from monoquant.formats.int4 import INT4PACK_CPU
from monoquant.formats.int8 import INT8PACK_CPU


def rel_err(y, ref):
    return float((y.double() - ref.double()).norm() / ref.double().norm())


def q_linear(k, n, spec, **cfg):
    return mq.QuantLinear.from_float(nn.Linear(k, n), mq.QuantConfig(spec, **cfg))


@pytest.fixture
def no_fast_bf16(monkeypatch):
    monkeypatch.setattr(kernels, "cpu_has_fast_bf16", lambda: False)


@pytest.fixture
def fast_bf16(monkeypatch):
    monkeypatch.setattr(kernels, "cpu_has_fast_bf16", lambda: True)


CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def static_table():
    """These tests check the static table and each kernel's numbers on layers small enough that, measured, they
    would run ``F.linear`` on their kept float weight (the tuner's tests are in test_tuner.py)."""
    with kernels.tuning(False):
        yield


@pytest.mark.parametrize("fused_on", [False, True], ids=["no_compiler", "fused"])
@pytest.mark.parametrize("bf16", [False, True])
def test_table_on_cpu(monkeypatch, bf16, fused_on):
    monkeypatch.setattr(kernels, "cpu_has_fast_bf16", lambda: bf16)
    monkeypatch.setattr(kernels.fused, "available", lambda: fused_on)
    big = "dequant_bf16" if bf16 else "dequant"
    small = "fused_cpu" if fused_on else big  # where the packed kernels do not apply, up to FUSED_MAX_ROWS
    lim4, lim8 = INT4PACK_CPU.max_rows, INT8PACK_CPU.max_rows
    cases = [
        (q_linear(256, 32, mq.Int4(group_size=128)), 1, False, "int4pack_cpu"),
        (q_linear(256, 32, mq.Int4(group_size=128)), lim4, False, "int4pack_cpu"),
        (q_linear(256, 32, mq.Int4(group_size=128)), lim4 + 1, False, big),
        (q_linear(256, 32, mq.Int4(group_size=128)), 1, True, big),  # input needs grad
        (q_linear(256, 24, mq.Int4(group_size=128)), 1, False, small),  # N % 16 != 0
        (q_linear(256, 24, mq.Int4(group_size=128)), kernels.FUSED_MAX_ROWS, False, small),
        (q_linear(256, 24, mq.Int4(group_size=128)), kernels.FUSED_MAX_ROWS + 1, False, big),
        (q_linear(480, 32, mq.Int4(group_size=96)), 1, False, small),  # group the packed kernel can't do
        (q_linear(256, 32, mq.Int4(), compute_dtype=torch.float32), 1, False, "dequant"),
        (q_linear(256, 32, mq.Int4(), compute_dtype=torch.float32), 9, False, "dequant"),
        (q_linear(256, 24, mq.Int8()), lim8, False, "int8pack_cpu"),
        (q_linear(256, 24, mq.Int8(granularity="tensor")), 1, False, "int8pack_cpu"),
        (q_linear(256, 24, mq.Int8()), lim8 + 1, False, big),
        (q_linear(256, 24, mq.Int8(symmetric=False)), 1, False, small),
        (q_linear(256, 24, mq.Int8(), compute_dtype=torch.float32), 1, False, "dequant"),
        (q_linear(256, 24, mq.Float16()), 1, False, big),
        (q_linear(256, 24, mq.Int8(), compute_dtype=torch.float16), 1, False, "dequant"),
        (q_linear(256, 32, mq.Int4(), compute_dtype=torch.bfloat16), 1, False, "int4pack_cpu"),
        (q_linear(256, 32, mq.Int4(), compute_dtype=torch.bfloat16), 64, False, big),
    ]
    got = [kernels.choose_linear_kernel(q, CPU, rows, grad) for q, rows, grad, _ in cases]
    assert got == [want for *_, want in cases]


def _check(q, x, tol):
    with torch.no_grad():
        y = q(x)
        ref = F.linear(x.double(), q.dequantize_weight(torch.float64, flat=True), q.bias.double())
    assert y.dtype == x.dtype and y.shape == ref.shape
    assert rel_err(y, ref) <= tol, (q.last_kernel, rel_err(y, ref))
    return q.last_kernel


@pytest.mark.parametrize("spec", [mq.Int4(group_size=g, symmetric=s) for g in (32, 64, 128, 256)
                                  for s in (False, True)], ids=lambda s: s.describe())
@pytest.mark.parametrize("n", [16, 48])
def test_int4pack_cpu_matches_dequantized_reference(spec, n):
    q = q_linear(512, n, spec)
    assert _check(q, torch.randn(3, 512), 1e-2) == "int4pack_cpu"
    assert _check(q, torch.randn(2, 4, 512), 1e-2) == "int4pack_cpu"  # leading dims kept


def test_int4pack_cpu_with_small_groups_and_rows():
    q = q_linear(96, 16, mq.Int4(group_size=32))
    assert _check(q, torch.randn(1, 96), 1e-2) == "int4pack_cpu"


def test_int4pack_cpu_error_is_bf16_rounding_only():
    """Against the same product with the input rounded to bf16, the packed kernel's error is tiny."""
    q = q_linear(1024, 64, mq.Int4(group_size=128))
    x = torch.randn(4, 1024)
    with kernels.pin("int4pack_cpu"), torch.no_grad():  # at 4x1024x64 the tuner may measure fused_cpu faster
        y = q(x)
        ref = F.linear(x.bfloat16().double(), q.dequantize_weight(torch.float64, flat=True), q.bias.double())
    assert q.last_kernel == "int4pack_cpu" and rel_err(y, ref) < 5e-3


@pytest.mark.parametrize("spec", [mq.Int8(), mq.Int8(granularity="tensor")], ids=["channel", "tensor"])
def test_int8pack_cpu_matches_dequantized_reference(spec):
    q = q_linear(384, 40, spec)
    assert _check(q, torch.randn(5, 384), 1e-2) == "int8pack_cpu"


@pytest.mark.parametrize("spec", [mq.Int4(group_size=32), mq.Int4(group_size=64, symmetric=True), mq.Int8(),
                                  mq.Int8(symmetric=False), mq.Int8(granularity="tensor"),
                                  mq.Int8(granularity="tensor", symmetric=False),
                                  mq.Float16(), mq.BFloat16()], ids=lambda s: s.describe())
@pytest.mark.parametrize("k, n", [(64, 40), (96, 3000)])  # one chunk; five chunks (see the monkeypatch)
def test_dequant_paths_match_reference(monkeypatch, spec, k, n):
    monkeypatch.setattr(kernels, "DEQUANT_CHUNK_ELEMENTS", 96 * 700)  # several chunks with a ragged last one
    for candidate in (*mq.Int4().kernel_candidates(), *mq.Int8().kernel_candidates()):
        monkeypatch.setattr(candidate, "max_rows", 0)  # the static table sends no row to a low-bit kernel
    monkeypatch.setenv("MONOQUANT_TUNE", "0")  # the static table: these are the dequantize paths' tests
    tuner.reload_environment()
    q = q_linear(k, n, spec)
    for rows in (3, 300):
        x = torch.randn(rows, k)
        assert _check(q, x, 1e-2) in ("dequant_bf16", "dequant")
        q32 = q_linear(k, n, spec, compute_dtype=torch.float32)
        q32.load_state_dict(q.state_dict())
        assert _check(q32, x, 1e-5) == "dequant"


def test_bf16_dequantize_into_is_rounded_once():
    q = q_linear(256, 64, mq.Int4(group_size=64))
    w64 = q.dequantize_weight(torch.float64, flat=True)
    wb = q.dequantize_weight(torch.bfloat16, flat=True, rows=slice(8, 40))
    # (q - z) is exact in bf16; only the scale and the product are rounded: within 2 bf16 ulps
    assert torch.allclose(wb.double(), w64[8:40], rtol=2 * 2**-8, atol=0)


def test_input_dtypes_are_kept(fast_bf16):
    q = q_linear(128, 32, mq.Int4(group_size=32))
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for rows in (2, 200):
            with torch.no_grad():
                y = q(torch.randn(rows, 128, dtype=dtype))
            assert y.dtype == dtype


def test_kernel_cache_is_dropped_on_set_stored_and_to():
    q = q_linear(128, 32, mq.Int4(group_size=32))
    with torch.no_grad():
        q(torch.randn(1, 128))
    assert "int4pack_cpu" in q._kernel_cache
    q.to(torch.float64)
    assert q._kernel_cache == {}


@pytest.mark.parametrize("spec", [mq.Int4(group_size=64), mq.Int8()], ids=["int4", "int8"])
def test_packed_kernels_accept_non_contiguous_inputs(spec):
    q = q_linear(256, 32, spec)
    x = torch.randn(256, 3).t()
    assert not x.is_contiguous()
    assert _check(q, x, 1e-2).endswith("pack_cpu")


def test_cpu_int4pack_layout_ignores_inner_k_tiles():
    """Why 1 is passed as innerKTiles on CPU: the CPU layout does not depend on it."""
    codes = torch.randint(0, 16, (32, 256), dtype=torch.int32)
    op = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    assert torch.equal(op(codes, 1), op(codes, 8))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), groups=st.integers(1, 3), group=st.sampled_from([3, 7, 32]), sym=st.booleans(),
       start=st.integers(0, 39), chunk_rows=st.integers(16, 64))
def test_dequantize_into_any_shape(n, groups, group, sym, start, chunk_rows):
    """Odd row lengths, ragged chunks and any row window: bf16 dequantize equals the float64 one, rounded."""
    k = groups * group
    q = mq.QuantLinear(k, n, spec=mq.Int4(group_size=group, symmetric=sym), group_size=group)
    q.set_stored(mq.schemes.quantize_weight(q.spec, torch.randn(n, k), group))
    start = min(start, n - 1)
    w64 = q.dequantize_weight(torch.float64, flat=True)[start:]
    wb = q.dequantize_weight(torch.bfloat16, flat=True, rows=slice(start, None))
    assert torch.allclose(wb.double(), w64, rtol=2 * 2**-8, atol=0)
    scratch = torch.full((2 * n * (k + 1),), 255, dtype=torch.uint8)  # reused scratch with stale bytes
    out = torch.empty(n - start, k, dtype=torch.float32)
    assert torch.equal(q.dequantize_into(out, start, scratch), w64.float())  # exact, rounded once
    x = torch.randn(5, k)
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "DEQUANT_CHUNK_ELEMENTS", chunk_rows * k)
        ref = F.linear(x.double(), q.dequantize_weight(torch.float64, flat=True), q.bias.double())
        q.compute_dtype = torch.float32
        assert rel_err(q(x), ref) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int4_unpack_tables_cover_every_byte_pair(dtype):
    """The 2-byte (bf16/fp16) and 1-byte (fp32) lookup tables give exactly the codes packing.py defines."""
    packed = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.uint8).reshape(256, 512)
    out = torch.empty(256, 1024, dtype=dtype)
    mq.packing.unpack_int4_into(out, packed)
    assert torch.equal(out, mq.packing.unpack_int4(packed, 1024).to(dtype))


def test_kernel_summary_shows_what_ran_per_row_bucket_and_marks_the_static_guess(monkeypatch):
    monkeypatch.setenv("MONOQUANT_TUNE", "0")
    tuner.reload_environment()
    q = q_linear(256, 64, mq.Int4(group_size=64))
    cpu = torch.device("cpu")
    small, large = (kernels.choose_linear_kernel(q, cpu, rows, False) for rows in (1, 4096))
    guess = small if small == large else f"{small}/{large}"
    assert kernels.kernel_summary(q) == f"{guess} (static guess, not run yet)" and kernels.kernels_run(q) == {}
    with torch.no_grad():
        for rows in (1, 2, 3000, 5):
            q(torch.randn(rows, 256))
    ran = {bucket: kernels.choose_linear_kernel(q, cpu, bucket, False) for bucket in (1, 2, 8, 4096)}
    assert kernels.kernels_run(q) == ran
    with kernels.pin("dequant"), torch.no_grad():
        q(torch.randn(4, 256))  # bucket 4 now ran the pinned kernel
    ran[4] = "dequant"
    spans = []
    for bucket in sorted(ran):
        if spans and spans[-1][2] == ran[bucket]:
            spans[-1][1] = bucket
        else:
            spans.append([bucket, bucket, ran[bucket]])
    assert kernels.kernel_summary(q) == ", ".join(f"r{a}{'' if a == b else f'-{b}'} {k}" for a, b, k in spans)
    assert q.kernel_summary() == kernels.kernel_summary(q)
