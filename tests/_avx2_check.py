"""Run by ``test_fused.py`` in a subprocess with ``MONOQUANT_EXT_ARCH=haswell``: the compiled kernels' AVX2 paths
(what an AVX2-only CPU runs: matmul, dequantize, the W8A8 GEMM) against the PyTorch reference, on an AVX-512
machine too. Exits non-zero on a mismatch."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import monoquant as mq
from monoquant import fused, schemes
from monoquant.functional import SCALE_EPS

assert fused.simd() == "avx2", (fused.simd(), fused.load_error())
g = torch.Generator().manual_seed(0)
for spec in (mq.Int4(group_size=128), mq.Int4(group_size=32, symmetric=True), mq.Int4(group_size=48),
             mq.Int8(), mq.Int8(symmetric=False)):
    group = spec.group_size if spec.kind == "int4" else None
    for k in (384, 4608):
        q = mq.QuantLinear(k, 72, spec=spec, group_size=group)
        q.set_stored(schemes.quantize_weight(spec, torch.randn(72, k, generator=g) * 0.1, group))
        w = schemes.dequantize_weight(q.spec, q.stored, k, group, torch.float64)
        for rows in (1, 2, 3, 4, 5, 8, 9, 17):
            x = torch.randn(rows, k, generator=g)
            y = (fused.int4_linear(x, q.qweight, q.scale, q.zero_point, group) if spec.kind == "int4"
                 else fused.int8_linear(x, q.qweight, q.scale, q.zero_point))
            magnitude = x.double().abs() @ w.abs().t()
            assert torch.all((y.double() - F.linear(x.double(), w)).abs() <= 1e-4 * magnitude + 1e-12), (spec, k, rows)
        for dtype in (torch.float32, torch.bfloat16):
            out = torch.empty(60, k, dtype=dtype)
            spec.fused_dequantize(out, q.qweight, q.scale, q.zero_point, group, 5, True)
            ref = torch.empty(60, k, dtype=dtype)
            spec.dequantize_into(ref, q.stored, 5, spec.dequant_params(q.stored, dtype), group)
            assert torch.equal(out, ref), (spec, k, dtype)
for m, n, k in ((1, 5, 3), (7, 33, 101), (13, 16, 64), (40, 70, 4097)):
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    assert torch.equal(fused.w8a8_gemm(a, fused.w8a8_pack(w), n).long(), a.long() @ w.long().t()), (m, n, k)
from monoquant.nn.activation import ActivationQuantizer  # noqa: E402

for symmetric in (True, False):
    act = ActivationQuantizer(mq.Int8(symmetric=symmetric, dynamic=True))
    x = torch.randn(37, 301, generator=g) * 3
    codes, scale, zero = fused.dynamic_quantize_rows(x, act.qtype.qmin, act.qtype.qmax, symmetric, SCALE_EPS)
    ref_codes, ref_scale, ref_zero = act.quantize(x)
    assert torch.equal(scale, ref_scale.reshape(-1)) and torch.equal(zero, ref_zero.reshape(-1).int())
    assert torch.equal(codes, ref_codes.sub(0 if symmetric else 128).to(torch.int8)), symmetric


@settings(max_examples=120, deadline=None, derandomize=True)
@given(data=st.data(), n=st.integers(1, 70), rows=st.integers(1, 9), threads=st.sampled_from([1, 2]),
       x_scale=st.sampled_from([1.0, 1e-3, 1e3]), seed=st.integers(0, 2**16))
def avx2_matmul_matches_reference(data, n, rows, threads, x_scale, seed):
    """The AVX2 weight-only matmul (avx2:: in fused_linear.cpp) against dequantize + float64 matmul: INT4 groups
    that the tiles take (multiples of 16) or the scalar loop takes, odd K with an INT8 tail past the last 16
    columns, N across the tiles (1-4 output rows) and the 32-row blocks, 1..9 input rows (8 per pass, then 1),
    several column passes, one or two threads; within float32 rounding of the sum of |terms|."""
    if data.draw(st.booleans(), label="int4"):
        group = data.draw(st.sampled_from([16, 32, 48, 64, 128, 7]), label="group")
        spec = mq.Int4(group_size=group, symmetric=data.draw(st.booleans(), label="symmetric"))
        k = group * data.draw(st.integers(1, 10), label="groups")
    else:
        spec = mq.Int8(symmetric=data.draw(st.booleans(), label="symmetric"),
                       granularity=data.draw(st.sampled_from(["channel", "tensor"]), label="granularity"))
        group, k = None, data.draw(st.integers(1, 1200), label="k")
    gen = torch.Generator().manual_seed(seed)
    q = mq.QuantLinear(k, n, spec=spec, group_size=group)
    q.set_stored(schemes.quantize_weight(spec, torch.randn(n, k, generator=gen) * 0.1, group))
    w = schemes.dequantize_weight(q.spec, q.stored, k, group, torch.float64)
    x = torch.randn(rows, k, generator=gen) * x_scale
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = (fused.int4_linear(x, q.qweight, q.scale, q.zero_point, group) if spec.kind == "int4"
             else fused.int8_linear(x, q.qweight, q.scale, q.zero_point))
    finally:
        torch.set_num_threads(previous)
    assert y.shape == (rows, n) and y.dtype == torch.float32
    magnitude = x.double().abs() @ w.abs().t()
    assert torch.all((y.double() - F.linear(x.double(), w)).abs() <= 1e-4 * magnitude + 1e-30), (spec, k, n, rows)


avx2_matmul_matches_reference()

# the direct conv's AVX2 tiles (1-3 vectors of 8 positions, 4 or 8 output channels)
for n, c, co, h, w, k, pad in ((1, 32, 64, 8, 8, 3, 1), (2, 3, 9, 5, 7, 3, 0), (1, 5, 21, 11, 13, 2, 1),
                               (3, 1, 4, 1, 1, 1, 0), (1, 7, 17, 4, 4, 3, 2)):
    x, weight = torch.randn(n, c, h, w, generator=g), torch.randn(co, c, k, k, generator=g)
    b = torch.randn(co, generator=g)
    y = fused.direct_conv2d(x, weight, b, pad, pad)
    ref = F.conv2d(x.double(), weight.double(), b.double(), padding=pad)
    terms = F.conv2d(x.double().abs(), weight.double().abs(), b.double().abs(), padding=pad)
    assert ((y.double() - ref).abs() <= terms * (c * k * k + 1) * 2**-23).all(), (n, c, co, h, w, k, pad)
print("avx2 ok")
