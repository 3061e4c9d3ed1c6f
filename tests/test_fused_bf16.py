"""The compiled AVX512-BF16 weight-only kernels (``fused_bf16``) against the dequantize + matmul reference, and their
eligibility: only where the CPU and the build have AVX512-BF16, never in the static table, the PyTorch path
otherwise."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fused import layer

import monoquant as mq
from monoquant import fused, hardware, kernels, schemes

needs_bf16_dot = pytest.mark.skipif(not (fused.available() and fused.bf16_dot() and hardware.cpu_has_avx512_bf16()),
                                    reason="no AVX512-BF16 here (or no compiled kernel)")

KERNELS = ("fused_bf16", "fused_bf16_gemm")
BF16_EPS = 2.0**-8  # one rounding of the output to bf16 (relative)


def check_against_reference(q: mq.QuantLinear, x: torch.Tensor, y: torch.Tensor) -> None:
    """``y`` (bf16) is ``x W^T + b`` computed exactly from the bf16 input and the weight the kernel multiplies, up
    to float32 sums and at most three bf16 roundings (``fused_bf16``: the product, the bias, their sum, as the
    dispatcher adds the bias in the output's dtype; ``fused_bf16_gemm`` adds it in float32 and rounds once): INT4's
    weight is the bf16 dequantized weight itself, INT8's the exact ``(q - z) * s``."""
    dtype = torch.bfloat16 if q.spec.kind == "int4" else torch.float64
    w = schemes.dequantize_weight(q.spec, q.stored, q.in_features, q.group_size, dtype).double()
    xd = x.reshape(-1, x.shape[-1]).double()
    product = xd @ w.t()
    ref = product + q.bias.double()
    magnitude = xd.abs() @ w.abs().t()
    bound = BF16_EPS * (product.abs() + q.bias.double().abs() + ref.abs()) + 1e-5 * magnitude + 1e-30
    err = (y.reshape(ref.shape).double() - ref).abs()
    assert torch.all(err <= bound), float((err - bound).max())


specs = st.one_of(
    st.builds(lambda g, s: mq.Int4(group_size=g, symmetric=s), st.sampled_from([32, 64, 128, 256]), st.booleans()),
    st.builds(lambda s, gran: mq.Int8(symmetric=s, granularity=gran), st.booleans(),
              st.sampled_from(["channel", "tensor"])),
)


@needs_bf16_dot
@settings(max_examples=60, deadline=None)
@given(spec=specs, kernel=st.sampled_from(KERNELS), blocks=st.integers(1, 12), n4=st.integers(1, 28),
       rows=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_fused_bf16_matches_the_dequantize_reference(spec, kernel, blocks, n4, rows, seed):
    """Any multiple of 32 (and of the group) for K, any multiple of 4 (``fused_bf16``) or 16 (the panel GEMM, whose
    panels are 48 wide: 16 and 32-wide last panels too) for N, rows across the 8-row tiles and their tails."""
    k = blocks * (spec.group_size if spec.kind == "int4" else 32)
    n = (16 if kernel == "fused_bf16_gemm" else 4) * n4
    q = layer(k, n, spec, seed)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed + 1)).to(torch.bfloat16)
    with kernels.pin(kernel), torch.no_grad():
        y = q(x)
    assert q.last_kernel == kernel and y.dtype == torch.bfloat16 and y.shape == (rows, n)
    check_against_reference(q, x, y)


@needs_bf16_dot
@pytest.mark.parametrize("spec", [mq.Int4(group_size=128), mq.Int4(group_size=32, symmetric=True), mq.Int8(),
                                  mq.Int8(symmetric=False)], ids=lambda s: s.describe())
@pytest.mark.parametrize("kernel", KERNELS)
def test_fused_bf16_on_a_large_layer_and_many_rows(spec, kernel):
    """More input rows than one block of rows kept in L2 (256 KB: 32 rows of K = 4096), and 3-D input."""
    q = layer(4096, 64, spec)
    x = torch.randn(2, 37, 4096).to(torch.bfloat16)
    with kernels.pin(kernel), torch.no_grad():
        y = q(x)
    assert q.last_kernel == kernel and y.shape == (2, 37, 64)
    check_against_reference(q, x, y)


@needs_bf16_dot
@pytest.mark.parametrize("kernel", KERNELS)
def test_fused_bf16_runs_for_bf16_inputs_or_a_bf16_compute_dtype_only(kernel):
    """A float32 model keeps float32 arithmetic (even pinned, the kernels are not eligible for its inputs); a layer
    with ``compute_dtype=torch.bfloat16`` runs them on its float32 input rounded to bf16, output in float32."""
    q = layer(256, 32, mq.Int4(group_size=64))
    x = torch.randn(5, 256)
    with kernels.pin(kernel), torch.no_grad():
        q(x)
    assert q.last_kernel not in KERNELS
    q.compute_dtype = torch.bfloat16
    with kernels.pin(kernel), torch.no_grad():
        y = q(x)
    assert q.last_kernel == kernel and y.dtype == torch.float32
    check_against_reference(q, x.to(torch.bfloat16), y.to(torch.bfloat16))


@needs_bf16_dot
@pytest.mark.parametrize("name, args", [
    ("int4_linear_bf16", lambda: (torch.randn(3, 64).bfloat16(), torch.randint(0, 256, (16, 32), dtype=torch.uint8),
                                  torch.rand(16, 2) + 0.1, torch.randint(0, 16, (16, 2), dtype=torch.uint8), 32)),
    ("int8_linear_bf16", lambda: (torch.randn(3, 64).bfloat16(), torch.randint(-127, 128, (16, 64), dtype=torch.int8),
                                  torch.rand(16) + 0.1, None)),
    ("int4_gemm_bf16", lambda: (torch.randn(3, 64).bfloat16(), torch.randint(0, 256, (16, 32), dtype=torch.uint8),
                                torch.rand(16, 2) + 0.1, None, 32, torch.randn(16))),
    ("int8_gemm_bf16", lambda: (torch.randn(9, 64).bfloat16(), torch.randint(0, 256, (32, 64), dtype=torch.uint8),
                                torch.rand(32) + 0.1, torch.randint(0, 256, (32,), dtype=torch.uint8),
                                torch.randn(32).bfloat16())),
])
def test_the_bf16_kernels_are_custom_ops_with_fake_implementations(name, args):
    torch.library.opcheck(getattr(torch.ops.monoquant, name).default, args())


@needs_bf16_dot
def test_the_bf16_kernels_reject_shapes_they_cannot_run_with_a_message():
    q = layer(64, 16, mq.Int4(group_size=32))
    x = torch.randn(2, 64).bfloat16()
    with pytest.raises(RuntimeError, match="group size must be a multiple of 32"):
        fused.int4_linear_bf16(x, q.qweight, torch.ones(16, 4), None, 16)
    with pytest.raises(RuntimeError, match="contiguous bf16"):
        fused.int4_linear_bf16(x.float(), q.qweight, q.scale, q.zero_point, 32)
    with pytest.raises(RuntimeError, match="N must be a multiple of 16"):
        fused.int8_gemm_bf16(torch.randn(2, 64).bfloat16(), torch.zeros(20, 64, dtype=torch.int8), torch.ones(20), None)
    with pytest.raises(RuntimeError, match="N of 4"):
        fused.int8_linear_bf16(torch.randn(2, 48).bfloat16(), torch.zeros(16, 48, dtype=torch.int8),
                               torch.ones(16), None)


@pytest.mark.parametrize("kernel, k, n, group", [("fused_bf16", 48, 16, 16), ("fused_bf16", 64, 18, 32),
                                                  ("fused_bf16", 64, 16, 16), ("fused_bf16_gemm", 48, 16, 16),
                                                  ("fused_bf16_gemm", 64, 20, 32)])
def test_fused_bf16_is_not_eligible_where_it_cannot_run_and_the_result_stays_right(kernel, k, n, group):
    """K not a multiple of 32, N not a multiple of 4 (the panel GEMM: 16), an INT4 group under 32 (``fused_bf16``):
    a pin runs another kernel."""
    q = layer(k, n, mq.Int4(group_size=group))
    x = torch.randn(3, k).bfloat16()
    with kernels.pin(kernel), torch.no_grad():
        y = q(x)
    assert q.last_kernel != kernel
    assert_loosely_right(q, x, y)


def assert_loosely_right(q: mq.QuantLinear, x: torch.Tensor, y: torch.Tensor) -> None:
    """The other kernels' bf16 GEMMs sum in their own order and precision: within 2% of the float64 result."""
    w = schemes.dequantize_weight(q.spec, q.stored, q.in_features, q.group_size, torch.float64)
    ref = F.linear(x.double(), w, q.bias.double())
    assert torch.allclose(y.double(), ref, rtol=2e-2, atol=2e-2)


def test_without_avx512_bf16_the_pytorch_path_runs(monkeypatch):
    """On a CPU without AVX512-BF16 (or a build without it) the candidate is never eligible: the dequantize path
    runs, with the same result."""
    q = layer(256, 32, mq.Int4(group_size=64))
    x = torch.randn(4, 256).bfloat16()
    monkeypatch.setattr(hardware, "cpu_has_avx512_bf16", lambda: False)
    for kernel in KERNELS:
        with kernels.pin(kernel), torch.no_grad():
            y = q(x)
        assert q.last_kernel not in (*KERNELS, None)
        assert_loosely_right(q, x, y)
    monkeypatch.undo()
    monkeypatch.setattr(fused, "bf16_dot", lambda: False)
    for kernel in KERNELS:
        with kernels.pin(kernel), torch.no_grad():
            q(x)
        assert q.last_kernel not in KERNELS


@pytest.mark.parametrize("rows", [1, 8, 64])
def test_the_static_table_never_picks_the_bf16_kernels(rows):
    """They are chosen by measurement only (``max_rows=0``): with tuning off every CPU runs the same static rows."""
    q = layer(256, 32, mq.Int4(group_size=64))
    with kernels.tuning(False), torch.no_grad():
        q(torch.randn(rows, 256).bfloat16())
    assert q.last_kernel not in KERNELS
    assert set(KERNELS) <= set(kernels.kernel_names())


@needs_bf16_dot
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_the_panel_gemm_adds_the_bias_before_its_one_rounding(kind):
    """Exact sums (small integer inputs, weights and scale 1), bias 0.25 or 0.75: the output is the float64 sum plus
    bias rounded once to bf16, what F.linear in bf16 gives; rounding the product first, then the sum (the
    dispatcher's bias add) gives other numbers for these sums (257 + 0.25 -> 258, not 256)."""
    g = torch.Generator().manual_seed(3)
    n, k, rows = 48, 64, 20
    x = torch.randint(-6, 7, (rows, k), generator=g).to(torch.bfloat16)
    bias = torch.tensor([0.25, 0.75] * (n // 2))
    if kind == "int4":
        codes = torch.randint(0, 16, (n, k), generator=g)
        qweight = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).contiguous()
        w = codes - 8  # symmetric INT4: stored as q + 8
        y = fused.int4_gemm_bf16(x, qweight, torch.ones(n, 1), None, k, bias)
    else:
        codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        w = codes.long()
        y = fused.int8_gemm_bf16(x, codes, torch.tensor(1.0), None, bias.bfloat16())
    exact = x.double() @ w.double().t() + bias.double()
    assert torch.equal(y, exact.to(torch.bfloat16))
    twice = ((x.double() @ w.double().t()).to(torch.bfloat16).double() + bias.double()).to(torch.bfloat16)
    assert not torch.equal(y, twice)


@needs_bf16_dot
def test_the_panel_gemm_takes_the_layers_bias_in_the_kernel():
    """The dispatcher hands ``fused_bf16_gemm`` the layer's bias (it fuses it) and the output equals the kernel called
    with that bias; without one, the plain product."""
    q = layer(128, 32, mq.Int8())
    x = torch.randn(5, 128).bfloat16()
    stored = q.quant_weight.stored
    with kernels.pin("fused_bf16_gemm"), torch.no_grad():
        y = q(x)
        assert torch.equal(y, fused.int8_gemm_bf16(x, stored.qweight, stored.scale, stored.zero_point, q.bias))
        q.bias = None
        assert torch.equal(q(x), fused.int8_gemm_bf16(x, stored.qweight, stored.scale, stored.zero_point))
