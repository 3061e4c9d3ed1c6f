"""Conv kernels chosen by measurement against the float conv: each candidate's numerics, the choice, pins, NaNs."""

import copy

import pytest
import torch
from _fake_timing import timing_by_name
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import monoquant as mq
from monoquant import call_plans, conv_kernels, fused, kernels, tuner
from monoquant.nn.activation import ActivationQuantizer

pytestmark = pytest.mark.usefixtures("fresh_kernel_choices")


def quantized(conv: nn.Module, weights=None, activations=None) -> mq.QuantModule:
    model = copy.deepcopy(nn.Sequential(conv)).eval()
    mq.quantize_(model, mq.QuantConfig(weights or mq.Int8(), activations=activations, skip=mq.SkipRules.none()))
    return model[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


@st.composite
def conv_cases(draw):
    dims = draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 2]))
    cin = groups * draw(st.integers(1, 6))
    cout = groups * draw(st.integers(1, 5))
    kernel = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    padding = draw(st.sampled_from([0, 1, "same"])) if stride == 1 else draw(st.sampled_from([0, 1]))
    if mode != "zeros" and padding == 0:
        padding = 1
    size = draw(st.integers(dilation * (kernel - 1) + 2, 9))
    batch = draw(st.integers(1, 3))
    cls = nn.Conv1d if dims == 1 else nn.Conv2d
    conv = cls(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
               bias=draw(st.booleans()), padding_mode=mode)
    return conv, (batch, cin, *([size] * dims)), draw(st.integers(0, 2**16))


@settings(max_examples=40, deadline=None)
@given(case=conv_cases(), weights=st.sampled_from(["int8", "int4"]))
def test_weight_only_candidates_match_the_float_path(case, weights):
    conv, shape, seed = case
    torch.manual_seed(seed)
    k = conv.weight[0].numel()
    spec = mq.Int8() if weights == "int8" else mq.Int4(group_size=k)
    q = quantized(conv, spec)
    x = torch.randn(shape)
    with torch.no_grad():
        ref = q.float_forward(x)
        want = conv_kernels.conv_kernel_names(q)
        ran = {}
        for name in conv_kernels._candidates(q, x, needs_grad=False, weights_only=False):
            ran[name] = conv_kernels.run_conv_kernel(q, name, x)
    assert "dequant_conv" in ran and set(ran) <= set(want)
    assert ("im2col_linear" in ran) == (conv.groups == 1)
    assert torch.equal(ran.pop("dequant_conv"), ref)  # the baseline is the float path, bit for bit
    # the bf16 paths: bf16 rounds each input value, weight and bias (2**-9 relative) and the output; sums in float32.
    # A bound per output value from the magnitudes of its terms (a relative error of the whole output failed where
    # the terms of a 3-value output cancelled)
    w = q.dequantize_weight(torch.float32)
    bias = 0.0 if q.bias is None else q.bias.abs().view(-1, *[1] * (x.dim() - 2))
    bound = (q.float_conv(x.abs(), w.abs(), None) + bias) * 2**-7 + ref.abs() * 2**-8 + 1e-6
    for name, y in ran.items():
        assert y.shape == ref.shape and y.dtype == ref.dtype, name
        assert ((y - ref).abs() <= bound).all(), name


@settings(max_examples=40, deadline=None)
@given(case=conv_cases(), dynamic=st.booleans(), symmetric=st.booleans())
def test_integer_conv_equals_the_fake_quantized_float_conv(case, dynamic, symmetric):
    if not (mq.kernels.cpu_has_int_dot() and hasattr(torch, "_int_mm")):
        pytest.skip("no integer dot products on this CPU: the integer conv is not eligible")
    conv, shape, seed = case
    torch.manual_seed(seed)
    act = mq.Int8(dynamic=dynamic, symmetric=symmetric)
    q = quantized(conv, mq.Int8(), act)
    if not dynamic:
        with mq.calibrate(nn.Sequential(q)):
            q(torch.randn(shape) * 2)
        mq.freeze(nn.Sequential(q))
    x = torch.randn(shape)
    with torch.no_grad(), mq.kernels.pin("dequant_conv"):
        ref = q.float_forward(x)  # fake-quantized input, dequantized kernel, float32 conv
        sim = conv_kernels.run_conv_kernel(q, "act_sim_conv", x)
        y = conv_kernels.run_conv_kernel(q, "w8a8_conv_int_mm", x)
    assert torch.equal(sim, ref)
    # the same integers: only the float32 rounding of the float conv's sums differs
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_integer_conv_makes_a_sample_with_an_inf_all_nan():
    if not (mq.kernels.cpu_has_int_dot() and hasattr(torch, "_int_mm")):
        pytest.skip("no integer dot products on this CPU")
    q = quantized(nn.Conv2d(4, 8, 3, padding=1), mq.Int8(), mq.Int8(dynamic=True))
    x = torch.randn(2, 4, 6, 6)
    x[1, 2, 3, 3] = float("inf")
    with torch.no_grad():
        y = conv_kernels.run_conv_kernel(q, "w8a8_conv_int_mm", x)
        ref = q.float_forward(x[:1])
    assert y[1].isnan().all() and torch.isfinite(y[0]).all()
    torch.testing.assert_close(y[:1], ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_fake_quantize_one_pass_is_bit_identical_to_the_float_ops(monkeypatch):
    if not fused.available():
        pytest.skip("compiled kernels not built here")
    for symmetric in (False, True):
        act = ActivationQuantizer(mq.Int8(dynamic=True, symmetric=symmetric))
        x = torch.randn(3, 5, 7, 7) * torch.tensor([0.01, 1.0, 100.0]).view(3, 1, 1, 1)
        x[2, 0, 0, 0] = float("nan")
        fast = act.fake_quantize(x, per="sample")
        monkeypatch.setattr(fused, "available", lambda: False)
        slow = act.fake_quantize(x, per="sample")
        monkeypatch.undo()
        assert torch.equal(fast.isnan(), slow.isnan()) and torch.equal(fast.nan_to_num(), slow.nan_to_num())


@pytest.mark.parametrize("times, want", [
    ({"dequant_conv": 1.0, "dequant_conv_bf16": 0.5, "im2col_linear": 0.7}, "dequant_conv_bf16"),
    ({"dequant_conv": 1.0, "dequant_conv_bf16": 0.97, "im2col_linear": 1.5}, "dequant_conv"),  # within the margin
])
def test_forward_times_the_candidates_against_the_float_conv_once_per_batch_bucket(monkeypatch, times, want):
    timed: list[str] = []
    timing_by_name(monkeypatch, times, timed)
    q = quantized(nn.Conv2d(32, 64, 3, padding=1), mq.Int4())
    assert q.kernel_summary() == "dequant_conv (static guess, not run yet)"
    with torch.no_grad():
        q(torch.randn(16, 32, 8, 8))
        n_timed = len(timed)
        q(torch.randn(13, 32, 8, 8))  # the same bucket: nothing timed again
        assert len(timed) == n_timed
        q(torch.randn(1, 32, 8, 8))
    cands = conv_kernels._candidates(q, torch.randn(16, 32, 8, 8), False, False)
    assert cands[-1] == "dequant_conv" and {t for t in timed if t in conv_kernels._SHARED} == set(cands)
    assert q.last_kernel == want and q.kernel_summary() == f"b1-16 {want}"
    assert f"kernel={want}" in repr(q)


def test_with_int8_activations_the_float_conv_is_the_baseline_and_the_fake_quantized_one_never_runs(monkeypatch):
    """``act_sim_conv`` is ``float_acts_conv`` plus the input's fake quantization: dominated, never timed (a noisy
    timing once picked it), even where a fake timer would call it the fastest."""
    timed: list[str] = []
    timing_by_name(monkeypatch, {"act_sim_conv": 0.1, "w8a8_conv_int_mm": 0.5, "float_acts_conv": 1.0}, timed)
    q = quantized(nn.Conv2d(32, 64, 3, padding=1), mq.Int8(), mq.Int8(dynamic=True))
    with torch.no_grad():
        q(torch.randn(16, 32, 8, 8))
    has_int = mq.kernels.cpu_has_int_dot() and hasattr(torch, "_int_mm")
    assert q.last_kernel == ("w8a8_conv_int_mm" if has_int else "float_acts_conv")
    assert "act_sim_conv" not in timed and ("float_acts_conv" in timed) == has_int


def test_small_convs_tuning_off_and_gradients_run_the_float_path(monkeypatch):
    timed: list[str] = []
    timing_by_name(monkeypatch, {"dequant_conv": 1.0, "dequant_conv_bf16": 0.1, "im2col_linear": 0.1}, timed)
    small = quantized(nn.Conv2d(4, 8, 3), mq.Int8())
    with torch.no_grad():
        small(torch.randn(1, 4, 6, 6))  # 8 x 36 x 36 multiply-adds (as estimated) < TUNE_MIN_MACS
    assert conv_kernels.TUNE_MIN_MACS > 8 * 36 * 36
    big = quantized(nn.Conv2d(32, 64, 3, padding=1), mq.Int8())
    with torch.no_grad(), mq.kernels.tuning(False):
        big(torch.randn(16, 32, 8, 8))
    x = torch.randn(16, 32, 8, 8, requires_grad=True)
    big(x).sum().backward()
    assert timed == [] and small.last_kernel == big.last_kernel == "dequant_conv"
    assert x.grad is not None and x.grad.shape == x.shape


def test_a_pinned_conv_kernel_runs_where_eligible():
    q = quantized(nn.Conv2d(8, 16, 3, padding=1, groups=2), mq.Int8())
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        with mq.kernels.pin("dequant_conv_bf16"):
            q(x)
            bf16 = q.last_kernel
        with mq.kernels.pin("im2col_linear"):  # not eligible with groups: the baseline
            q(x)
    assert bf16 == ("dequant_conv_bf16" if mq.kernels.cpu_has_fast_bf16() else "dequant_conv")
    assert q.last_kernel == "dequant_conv"


def test_unbatched_input_and_the_names_pin_knows():
    q = quantized(nn.Conv1d(4, 8, 3), mq.Int8(), mq.Int8(dynamic=True))
    x = torch.randn(4, 10)
    with torch.no_grad():
        torch.testing.assert_close(q(x), q(x.unsqueeze(0)).squeeze(0))
    assert set(conv_kernels._SHARED) == set(kernels.SHARED_CONV_KERNELS)
    assert set(conv_kernels.conv_kernel_names(q)) <= set(kernels.kernel_names())
    assert "w8a8_conv_int_mm" in kernels.kernel_names()


def test_a_small_conv_keeps_its_float_kernel_counts_it_and_drops_it_when_the_weight_changes():
    torch.manual_seed(0)
    q = quantized(nn.Conv2d(32, 64, 3, padding=1), mq.Int4())
    other = quantized(nn.Conv2d(32, 64, 3, padding=1), mq.Int4())
    x = torch.randn(2, 32, 8, 8)
    kept_bytes = 64 * 32 * 9 * 4
    assert kernels.kept_float_bytes(q) == kept_bytes <= kernels.FLOAT_WEIGHT_CACHE_BYTES
    stored = sum(b.numel() * b.element_size() for b in q.buffers())
    # the memory report counts it and its channels-last copy before either is built
    assert q.storage_bytes() == stored + 2 * kept_bytes
    with torch.no_grad(), mq.kernels.pin("dequant_conv"):
        y = q(x)
        kept = q.quant_weight.cache["float_weight"]
        assert torch.equal(kept, q.dequantize_weight(torch.float32)) and torch.equal(y, q.float_forward(x))
        q(x)
        assert q.quant_weight.cache["float_weight"] is kept  # built once
        q.load_state_dict(other.state_dict())
        assert "float_weight" not in q.quant_weight.cache
        y2 = q(x)
    assert torch.equal(y2, other.float_forward(x)) and not torch.equal(y2, y)
    assert torch.equal(q.quant_weight.cache["float_weight"], other.dequantize_weight(torch.float32))


def test_a_conv_over_the_budget_dequantizes_every_call(monkeypatch):
    q = quantized(nn.Conv2d(32, 64, 3, padding=1), mq.Int8())
    monkeypatch.setattr(kernels, "FLOAT_WEIGHT_CACHE_BYTES", 64 * 32 * 9 * 4 - 1)
    x = torch.randn(1, 32, 8, 8)
    assert kernels.kept_float_bytes(q) == 0
    assert q.storage_bytes() == sum(b.numel() * b.element_size() for b in q.buffers())
    with torch.no_grad(), mq.kernels.pin("dequant_conv"):
        y = q(x)
    assert "float_weight" not in q.quant_weight.cache and torch.equal(y, q.float_forward(x))


def test_a_conv_with_a_forced_compute_dtype_keeps_its_kernel_in_that_dtype():
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1)).eval()
    mq.quantize_(model, mq.QuantConfig(mq.Int8(), compute_dtype=torch.bfloat16, skip=mq.SkipRules.none()))
    q = model[0]
    x = torch.randn(2, 8, 6, 6)
    assert kernels.kept_float_bytes(q) == 16 * 8 * 9 * 2
    with torch.no_grad(), mq.kernels.pin("dequant_conv"):
        y = q(x)
    assert q.quant_weight.cache["float_weight"].dtype == torch.bfloat16 and y.dtype == torch.float32
    assert torch.equal(y, q.float_forward(x))


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 4), size=st.integers(1, 40), symmetric=st.booleans(),
       scale=st.sampled_from([1e-6, 1e-2, 1.0, 1e3]), bad=st.sampled_from([None, "nan", "inf"]),
       seed=st.integers(0, 2**16))
def test_fake_quantized_conv_inputs_are_bit_identical_to_the_quantizer(batch, size, symmetric, scale, bad, seed):
    torch.manual_seed(seed)
    act = ActivationQuantizer(mq.Int8(dynamic=True, symmetric=symmetric))
    x = torch.randn(batch, 3, size) * scale
    if bad:
        x[-1, 0, size // 2] = float(bad)
    fast = conv_kernels.fake_quantize_samples(act, x)
    ref = act.fake_quantize(x, per="sample")
    assert fast.shape == x.shape and fast.dtype == x.dtype
    assert torch.equal(fast.isnan(), ref.isnan()) and torch.equal(fast.nan_to_num(), ref.nan_to_num())
    if bad:
        assert fast[-1].isnan().all() and not fast[:-1].isnan().any()


def test_each_timing_sample_is_the_fastest_of_three_calls(monkeypatch):
    samples = iter([3.0, 1.0, 2.0])
    monkeypatch.setattr(tuner, "time_call", lambda call: next(samples))
    assert conv_kernels._time_best_of_three(lambda: None) == 1.0


@pytest.mark.parametrize("times, want", [
    ({"float_acts_conv": 1.0, "act_sim_conv": 1.2, "w8a8_conv_int_mm": 1.5}, "float_acts_conv"),  # the float conv
    ({"float_acts_conv": 1.0, "act_sim_conv": 1.2, "w8a8_conv_int_mm": 0.97}, "float_acts_conv"),  # in the margin
    ({"float_acts_conv": 1.0, "act_sim_conv": 1.2, "w8a8_conv_int_mm": 0.5}, "w8a8_conv_int_mm"),
    # act_sim_conv is the baseline plus the input's fake quantization: never offered, whatever a timer would say
    ({"float_acts_conv": 1.0, "act_sim_conv": 0.5, "w8a8_conv_int_mm": 1.5}, "float_acts_conv"),
])
def test_with_int8_activations_a_candidate_replaces_the_float_conv_only_when_faster(monkeypatch, times, want):
    timed: list[str] = []
    timing_by_name(monkeypatch, times, timed)
    q = quantized(nn.Conv2d(32, 64, 3, padding=1), mq.Int8(), mq.Int8(dynamic=True))
    with torch.no_grad():
        for batch in (1, 16, 256):
            q(torch.randn(batch, 32, 8, 8))
    has_int = mq.kernels.cpu_has_int_dot() and hasattr(torch, "_int_mm")
    want = want if has_int or want != "w8a8_conv_int_mm" else "float_acts_conv"
    assert q.kernel_summary() == f"b1-256 {want}"
    # the float conv is the baseline: timed in every bucket where there is something to time, best of 3 per sample
    assert timed.count("float_acts_conv") % 3 == 0 and timed.count("float_acts_conv") >= (3 * 3 if has_int else 0)
    assert "act_sim_conv" not in timed


def test_the_per_shape_shortcut_still_honours_pins_tuning_and_new_weights(monkeypatch):
    timed: list[str] = []
    timing_by_name(monkeypatch, {"dequant_conv": 1.0, "dequant_conv_bf16": 10.0, "im2col_linear": 0.5}, timed)
    q = quantized(nn.Conv2d(32, 64, 3, padding=1), mq.Int8())
    x = torch.randn(4, 32, 8, 8)
    with torch.no_grad():
        q(x)
        assert q.last_kernel == "im2col_linear" and timed
        n_timed = len(timed)
        q(x)
        assert q.last_kernel == "im2col_linear" and len(timed) == n_timed  # the shortcut: nothing timed again
        with mq.kernels.pin("dequant_conv"):
            q(x)
            assert q.last_kernel == "dequant_conv"
        with mq.kernels.tuning(False):
            q(x)
            assert q.last_kernel == "dequant_conv"
        q.load_state_dict(q.state_dict())  # the weight may have changed: the layer's shortcuts go
        assert "conv_by_shape" not in q.quant_weight.cache and call_plans.KEY not in q.quant_weight.cache
        q(x)  # the situation's measured choice (the tuner's, shared by identical layers) still holds
    assert q.last_kernel == "im2col_linear" and len(timed) == n_timed


def test_a_w8a8_conv_measured_slower_than_float_runs_float_activations_and_says_so(monkeypatch):
    """The float conv is the baseline of an INT8-activation conv: where nothing beats it, the dequantized INT8
    kernel runs on the float input (not the fake-quantized one), named float_acts_conv in the kernel column."""
    timed: list[str] = []
    timing_by_name(monkeypatch, {"float_acts_conv": 1.0, "dequant_conv": 1.0}, timed)  # the rest 10x slower
    q = quantized(nn.Conv2d(16, 32, 3, padding=1), mq.Int8(), mq.Int8(dynamic=True))
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        y = q(x)
        assert "act_sim_conv" not in timed  # dominated by float_acts_conv: never timed
        assert q.kernel_summary() == "b2 float_acts_conv"
        reference = nn.functional.conv2d(x, q.dequantize_weight(torch.float32), q.bias, padding=1)
        torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5)
        quantized_input = q.float_forward(x)  # what W8A8 computes: the fake-quantized input's conv
        assert not torch.allclose(y, quantized_input, rtol=1e-5, atol=1e-5)
        assert torch.equal(q(x), y)  # the per-shape shortcut runs the same
        with mq.kernels.tuning(False):  # the static choice keeps the W8A8 arithmetic
            assert torch.equal(q(x), quantized_input) and q.last_kernel == "act_sim_conv"
        with mq.kernels.pin("float_acts_conv"):
            assert torch.equal(q(x), y) and q.last_kernel == "float_acts_conv"


def test_a_tiny_w8a8_conv_runs_the_float_conv_untimed():
    q = quantized(nn.Conv2d(1, 2, 3), mq.Int8(), mq.Int8(dynamic=True))  # 18 weights x 36 positions < TUNE_MIN_MACS
    with torch.no_grad():
        q(torch.randn(1, 1, 8, 8))
    assert q.last_kernel == "float_acts_conv"


def test_the_per_shape_fast_path_records_the_bucket_and_leaves_unbatched_inputs_to_the_full_path(monkeypatch):
    """A batched input with a remembered plan goes straight to it (recording its batch bucket); an unbatched input
    of the same layer (its shape is never a plan's key) still runs, as one sample of the batch."""
    timing_by_name(monkeypatch, {"dequant_conv": 1.0}, [])
    q = quantized(nn.Conv2d(8, 16, 3, padding=1), mq.Int8())
    x = torch.randn(3, 8, 6, 6)
    with torch.no_grad():
        first = q(x)
        assert (x.shape, x.dtype) in q.quant_weight.cache[call_plans.KEY]
        second = q(x)
        one = q(x[1])
    assert torch.equal(first, second) and one.shape == (16, 6, 6)
    torch.testing.assert_close(one, first[1], rtol=1e-5, atol=1e-5)
    assert mq.kernels.kernels_run(q) == {4: "dequant_conv", 1: "dequant_conv"}


FLOAT_ALGORITHMS = ("dequant_conv_channels_last", "dequant_conv_im2col", "dequant_conv_direct")
CL, IM2COL, DIRECT = FLOAT_ALGORITHMS


@st.composite
def float_algorithm_cases(draw):
    """2-d and 3-d convs that keep their float kernel (any dilation, zero or circular padding), inputs contiguous,
    channels-last or a strided slice."""
    dims = draw(st.sampled_from([2, 3]))
    kernel = draw(st.integers(1, 3))
    stride, padding = draw(st.integers(1, 2)), draw(st.integers(0, 1))
    cls = nn.Conv2d if dims == 2 else nn.Conv3d
    mode = draw(st.sampled_from(["zeros", "circular"])) if padding else "zeros"
    conv = cls(draw(st.integers(1, 8)), draw(st.integers(1, 8)), kernel, stride=stride, padding=padding,
               bias=draw(st.booleans()), padding_mode=mode, dilation=draw(st.integers(1, 2)) if kernel > 1 else 1)
    kernel = conv.dilation[0] * (kernel - 1) + 1
    size = draw(st.integers(kernel + 1, kernel + (4 if dims == 2 else 2)))
    shape = (draw(st.integers(1, 4)), conv.in_channels, *([size] * dims))
    return conv, shape, draw(st.sampled_from(["contiguous", "channels_last", "slice"])), draw(st.integers(0, 2**16))


def strides_that_matter(t: torch.Tensor) -> tuple[int, ...]:
    """The strides of dims longer than 1 (a dim of size 1 is never stepped along; its stride is arbitrary)."""
    return tuple(stride for stride, size in zip(t.stride(), t.shape) if size > 1)


def laid_out(shape: tuple[int, ...], layout: str) -> torch.Tensor:
    if layout == "slice":  # every other sample of a larger batch: neither contiguous nor channels-last
        return torch.randn(2 * shape[0], *shape[1:])[::2]
    x = torch.randn(shape)
    if layout == "channels_last":
        return x.contiguous(memory_format=conv_kernels._CHANNELS_LAST[x.dim() - 2])
    return x


@settings(max_examples=40, deadline=None)
@given(case=float_algorithm_cases(), weights=st.sampled_from(["int8", "int4"]))
def test_the_float_algorithm_candidates_give_the_float_conv_up_to_rounding_in_its_memory_format(case, weights):
    """``dequant_conv_channels_last``, ``dequant_conv_im2col`` and ``dequant_conv_direct`` (the compiled direct conv)
    are the float conv with another algorithm: the
    same sums in another order (a float32 bound per output value) and the output strides of the float conv,
    so that a ``.view`` that works on the float layer's output works on theirs. They apply to contiguous inputs;
    called on another layout (as from a plan made for a contiguous input of the shape), they run the baseline."""
    conv, shape, layout, seed = case
    torch.manual_seed(seed)
    spec = mq.Int8() if weights == "int8" else mq.Int4(group_size=conv.weight[0].numel())
    q = quantized(conv, spec)
    x = laid_out(shape, layout)
    with torch.no_grad():
        ref = q.float_forward(x)
        cands = conv_kernels._candidates(q, x.contiguous(), needs_grad=False, weights_only=False)
        assert "dequant_conv_channels_last" in cands  # every conv here keeps its kernel
        plain = conv.dilation == (1,) * (x.dim() - 2) and conv.padding_mode == "zeros"
        assert ("dequant_conv_im2col" in cands) == (x.dim() == 4 and plain)
        stride1 = conv.stride == (1,) * (x.dim() - 2)
        assert ("dequant_conv_direct" in cands) == (x.dim() == 4 and plain and stride1 and fused.available())
        if not x.is_contiguous():
            assert not set(FLOAT_ALGORITHMS) & set(conv_kernels._candidates(q, x, False, False))
        w = q.dequantize_weight(torch.float32)
        bias = 0.0 if q.bias is None else q.bias.abs().view(-1, *[1] * (x.dim() - 2))
        bound = (q.float_conv(x.abs(), w.abs(), None) + bias) * w[0].numel() * 2**-22 + 1e-30
        for name in FLOAT_ALGORITHMS:
            if name in cands:
                y = conv_kernels.run_conv_kernel(q, name, x)
                from_plan = conv_kernels._shortcut(q, x.contiguous(), name)  # what a plan would run
                assert torch.equal(from_plan(q, x), y), name
                assert y.shape == ref.shape and y.dtype == ref.dtype, name
                assert strides_that_matter(y) == strides_that_matter(ref), name
                assert ((y - ref).abs() <= bound).all(), name
                if not x.is_contiguous():
                    assert torch.equal(y, ref), name


@pytest.mark.parametrize("conv, why", [
    (nn.Conv1d(8, 16, 3), "1-d: neither"),
    (nn.Conv2d(8, 16, 3, groups=2), "groups: no im2col"),
    (nn.Conv2d(8, 16, 3, dilation=2), "dilation: no im2col"),
    (nn.Conv2d(8, 16, 3, padding=1, padding_mode="reflect"), "reflect padding: no im2col"),
    (nn.Conv2d(8, 16, 2, padding="same"), "one more pad on one side: no im2col"),
    (nn.Conv2d(8, 16, 3, padding=1), "both"),
    (nn.Conv2d(8, 16, 3, padding=1, stride=2), "stride 2: no direct conv"),
    (nn.Conv2d(8, 16, 3, padding=1), "an input over DIRECT_MAX_INPUT values: no direct conv"),
    (nn.Conv2d(256, 128, 3), "the kernel is not kept (294k weights): no channels-last copy"),
    (nn.Conv3d(8, 16, 3), "3-d: channels-last only"),
])
def test_which_convs_the_float_algorithm_candidates_apply_to(conv, why):
    q = quantized(conv)
    x = torch.randn(2, conv.in_channels, *([6] * (conv.weight.dim() - 2)))
    if why.startswith("an input over"):
        x = torch.randn(conv_kernels.DIRECT_MAX_INPUT // (8 * 6 * 6) + 1, 8, 6, 6)
    cands = set(conv_kernels._candidates(q, x, needs_grad=False, weights_only=False))
    direct = {DIRECT} if fused.available() else set()
    want = {"1-d: neither": set(), "both": {CL, IM2COL} | direct, "stride 2: no direct conv": {CL, IM2COL},
            "an input over DIRECT_MAX_INPUT values: no direct conv": {CL, IM2COL},
            "3-d: channels-last only": {CL},
            "the kernel is not kept (294k weights): no channels-last copy": {IM2COL}}
    assert cands & set(FLOAT_ALGORITHMS) == want.get(why, {CL}), why


@pytest.mark.skipif(not fused.available(), reason="needs the compiled CPU kernels")
def test_an_input_that_needs_a_gradient_never_runs_the_direct_conv_even_pinned():
    """The compiled direct conv has no backward: a pin falls back to the float conv, and the gradient arrives."""
    q = quantized(nn.Conv2d(8, 16, 3, padding=1))
    x = torch.randn(1, 8, 6, 6, requires_grad=True)
    assert DIRECT in conv_kernels._candidates(q, x.detach(), needs_grad=False, weights_only=False)
    assert DIRECT not in conv_kernels._candidates(q, x, needs_grad=True, weights_only=False)
    with mq.kernels.pin(DIRECT):
        y = q(x)
    y.sum().backward()
    assert q.last_kernel == "dequant_conv" and x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", [CL, IM2COL, pytest.param(DIRECT, marks=pytest.mark.skipif(
    not fused.available(), reason="needs the compiled CPU kernels"))])
def test_a_measured_float_algorithm_runs_from_the_plan_and_the_channels_last_copy_follows_the_weight(
        monkeypatch, name):
    timed: list[str] = []
    timing_by_name(monkeypatch, {"dequant_conv": 1.0, name: 0.5}, timed)
    torch.manual_seed(0)
    q, other = quantized(nn.Conv2d(32, 64, 3, padding=1)), quantized(nn.Conv2d(32, 64, 3, padding=1))
    x = torch.randn(1, 32, 8, 8)
    with torch.no_grad():
        first = q(x)
        assert q.last_kernel == name and q.kernel_summary() == f"b1 {name}" and name in timed
        assert q.quant_weight.plan is not None
        second = q(x)  # from the plan
        with mq.kernels.pin(name):
            pinned = q(x)
        torch.testing.assert_close(first, q.float_forward(x), rtol=1e-5, atol=1e-5)
        assert torch.equal(second, first) and torch.equal(pinned, first)
        copy_kept = q.quant_weight.cache.get("float_weight_channels_last")  # built where the tuner timed it
        if name == "dequant_conv_channels_last":
            assert copy_kept.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(copy_kept, q.quant_weight.cache["float_weight"])
        q.load_state_dict(other.state_dict())  # new weights: the kept kernel, its copy and the plan go
        assert "float_weight_channels_last" not in q.quant_weight.cache and q.quant_weight.plan is None
        new = q(x)
    torch.testing.assert_close(new, other.float_forward(x), rtol=1e-5, atol=1e-5)
    assert q.last_kernel == name  # the choice stays: it was measured for the geometry, not the values
