"""Remembered call plans (monoquant.call_plans): a quantized layer's repeat call runs what its first call decided,
only while that decision still holds, and copies and pickles of a model that ran never share or carry them."""

import copy
import io
import threading

import pytest
import torch
from _fake_timing import timing_by_name
from hypothesis import given, settings
from hypothesis import strategies as st
from test_conv_kernels import conv_cases
from torch import nn

import monoquant as mq
from monoquant import call_plans, fused, hardware, tuner

needs_ext = pytest.mark.skipif(not fused.available(), reason="needs the compiled CPU kernels")


pytestmark = pytest.mark.usefixtures("fresh_kernel_choices")


class Small(nn.Module):
    """A conv (keeps its dequantized kernel), a 1024 -> 128 linear (too large to keep one: a packed or compiled
    kernel) and a 128 -> 10 linear (keeps one)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 8 * 8, 128)
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1))))


def quantized_small(spec, fc_kernel: str | None = None, monkeypatch=None) -> nn.Module:
    if fc_kernel is not None:
        timing_by_name(monkeypatch, {fc_kernel: 0.1, "dequant": 1.0, "dequant_conv": 1.0}, [])
    torch.manual_seed(0)
    model = Small().eval()
    mq.quantize_(model, mq.QuantConfig(spec, skip=mq.SkipRules.none()))
    return model


def plans(layer) -> dict:
    return layer.quant_weight.cache.get(call_plans.KEY, {})


@pytest.mark.parametrize("fc_kernel", [None, pytest.param("fused_cpu", marks=needs_ext)])
def test_a_copy_of_a_model_that_ran_keeps_its_own_weights_when_the_original_is_loaded_with_new_ones(
        monkeypatch, fc_kernel):
    """The plans hold the weight's tensors and buffers: a copy that shared them ran the original's new weights."""
    model = quantized_small(mq.Int8(), fc_kernel, monkeypatch)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        model(x)
        assert all(plans(m) for m in (model.conv, model.fc, model.head))
        if fc_kernel:
            assert model.fc.last_kernel == fc_kernel
        twin = copy.deepcopy(model)
        before = twin(x)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["fc.qweight"].zero_()
        state["conv.qweight"].zero_()
        model.load_state_dict(state)
        assert not torch.equal(model(x), before)
        assert torch.equal(twin(x), before)
        assert torch.equal(twin(x), before)  # the copy's own plans, made by its first call


def test_a_model_that_ran_pickles_and_loads_back_with_the_same_outputs_and_choices():
    model = quantized_small(mq.Int4())
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        y = model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)  # failed on the plans' local functions ("Can't pickle local object")
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    kept = loaded.fc.quant_weight.cache
    assert call_plans.KEY not in kept and all(isinstance(v, str) for v in kept.values())
    assert loaded.fc.quant_weight.ran == model.fc.quant_weight.ran
    with torch.no_grad():
        assert torch.equal(loaded(x), y)


def test_copies_keep_the_measured_choices_and_drop_what_is_derived_from_the_buffers():
    model = quantized_small(mq.Int8())
    with torch.no_grad():
        model(torch.randn(1, 1, 8, 8))
    cache = model.head.quant_weight.cache
    assert "float_weight" in cache and call_plans.KEY in cache
    twin = copy.deepcopy(model).head
    assert twin.quant_weight.cache == {k: v for k, v in cache.items() if isinstance(v, str)} != {}
    assert twin.quant_weight.buffers is twin._buffers  # reads the copy's buffers, not the original's


def test_a_layer_with_an_input_scale_applies_it_on_every_call_from_its_plan():
    """Its input preparation changes the input: the plan is for the prepared input, never run on the raw one."""
    torch.manual_seed(0)
    q = mq.QuantLinear.from_float(nn.Linear(64, 32), mq.Int8())
    scale = torch.rand(64) + 0.5
    q.set_input_scale(scale)
    x = torch.randn(4, 64)
    with torch.no_grad():
        reference = nn.functional.linear(x * scale, q.dequantize_weight(torch.float32), q.bias)
        first, second = q(x), q(x)
        plan = plans(q)[(x.shape, x.dtype)]
    assert not plan.raw_ok
    torch.testing.assert_close(first, reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(second, first)


def first_from_plan_and_pinned(q, kernel: str, baseline: str, shape: tuple[int, ...], transposed: bool):
    """``(x, first, second, pinned)``: ``q`` on an input of ``shape`` (its last two dims laid out transposed when
    asked), with ``kernel`` timed faster than ``baseline`` (a fresh measurement); the second call runs the plan the
    first made, the third ``kernel`` pinned (the full path)."""
    x = torch.randn(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2) if transposed else torch.randn(shape)
    tuner.clear()
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        timing_by_name(patch, {kernel: 0.1, baseline: 1.0}, [])
        first = q(x)
        assert q.last_kernel == kernel and (x.shape, x.dtype) in plans(q)
        second = q(x)  # from the plan
        with mq.kernels.pin(kernel):
            pinned = q(x)
    return x, first, second, pinned


@needs_ext
@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 8), lead=st.sampled_from([(), (2,), (1, 3)]), k=st.sampled_from([64, 96, 256]),
       n=st.integers(1, 70), bias=st.booleans(), spec=st.sampled_from(["int8", "int8-asym", "int4"]),
       transposed=st.booleans())
def test_the_bound_compiled_call_equals_the_kernel_for_any_input_layout(rows, lead, k, n, bias, spec, transposed):
    """A fused_cpu plan calls the compiled function with the buffers bound once; inputs of the plan's shape that
    are not contiguous, and inputs with leading dims, give the pinned full path's output bit for bit."""
    fmt = {"int8": mq.Int8(), "int8-asym": mq.Int8(symmetric=False), "int4": mq.Int4(group_size=32)}[spec]
    torch.manual_seed(rows * 1000 + k + n)
    q = mq.QuantLinear.from_float(nn.Linear(k, n, bias=bias), fmt)
    _, first, second, pinned = first_from_plan_and_pinned(q, "fused_cpu", "dequant", (*lead, rows, k), transposed)
    assert first.shape == (*lead, rows, n)
    assert torch.equal(second, first) and torch.equal(second, pinned)


def test_no_plan_runs_while_calibration_observes_the_inputs():
    """Setting a tap drops the layer's plans and none are made while it is set: every call reaches the tap."""
    model = quantized_small(mq.Int8())
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        model(x)
    assert plans(model.head)
    seen = []
    model.head.calibration_tap = lambda layer, inp: seen.append(inp.shape)
    try:
        assert call_plans.lookup(model.head, torch.randn(2, 128)) is None and not plans(model.head)
        with torch.no_grad():
            model(x)
            model(x)
        assert not plans(model.head)
    finally:
        del model.head.calibration_tap
    assert seen == [(2, 128), (2, 128)]
    with torch.no_grad():
        model(x)
    assert call_plans.lookup(model.head, torch.randn(2, 128)) is not None


def test_a_pin_in_one_thread_leaves_the_plans_of_another_thread_in_use():
    model = quantized_small(mq.Int8())
    x = torch.randn(2, 128)
    with torch.no_grad():
        model.head(x)
    entered, release, seen = threading.Event(), threading.Event(), {}

    def pinned_thread() -> None:
        with mq.kernels.pin("dequant"):
            seen["pinned here"] = tuner.measured()
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=pinned_thread)
    thread.start()
    entered.wait(10)
    try:
        seen["other thread"] = tuner.measured()
        seen["plan"] = call_plans.lookup(model.head, x) is not None
    finally:
        release.set()
        thread.join()
    assert seen == {"pinned here": False, "other thread": True, "plan": True}
    assert tuner.measured()


def test_a_gradient_or_another_device_type_or_dtype_takes_the_full_path():
    model = quantized_small(mq.Int8())
    x = torch.randn(2, 128)
    with torch.no_grad():
        model.head(x)
    assert call_plans.lookup(model.head, x) is not None
    assert call_plans.lookup(model.head, x.double()) is None
    assert call_plans.lookup(model.head, x.to("meta")) is None
    assert call_plans.lookup(model.head, x.numpy()) is None
    assert call_plans.lookup(model.head, x.requires_grad_()) is None
    with torch.no_grad():
        assert call_plans.lookup(model.head, x) is not None


def test_a_bf16_conv_of_a_layer_that_keeps_its_float_kernel_casts_it_rather_than_dequantizing_again():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1)).eval()
    mq.quantize_(model, mq.QuantConfig(mq.Int8(), skip=mq.SkipRules.none()))
    q = model[0]
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        kept = mq.kernels.kept_float_weight(q, torch.float32)
        assert kept is not None
        y = mq.conv_kernels._dequant_conv_bf16(q, x)
        reference = nn.functional.conv2d(x.bfloat16(), kept.bfloat16(), q.bias.bfloat16(), padding=1).float()
    assert torch.equal(y, reference)


@pytest.mark.parametrize("layer", ["conv", "head"])
def test_a_layer_first_run_under_inference_mode_still_gives_gradients_afterwards(layer):
    """Its kept float weight and plan were made of inference tensors (faster there), which autograd cannot save:
    a later call that records autograd gets a normal tensor, and the input's (and a trainable bias's) gradients."""
    model = quantized_small(mq.Int8())
    q = getattr(model, layer)
    x = torch.randn(2, 1, 8, 8) if layer == "conv" else torch.randn(2, 128)
    with torch.inference_mode():
        first = q(x)
        second = q(x)  # from the plan
    assert q.quant_weight.cache["float_weight"].is_inference() and q.quant_weight.plan.inference
    xr = x.clone().requires_grad_()
    y = q(xr)
    y.sum().backward()
    assert xr.grad is not None and xr.grad.abs().sum() > 0
    q.bias.requires_grad_(True)
    z = q(x)  # no input gradient, but a bias that wants one: not from the inference-mode plan
    z.sum().backward()
    assert torch.equal(q.bias.grad, torch.full_like(q.bias, z.numel() // q.bias.numel()))
    torch.testing.assert_close(y.detach(), first, rtol=3e-2, atol=1e-2)  # the static table (bf16 where fast)
    assert torch.equal(first, second)
    with torch.no_grad():
        assert torch.equal(q(x), first)


def test_attaching_a_gptq_state_or_an_activation_quantizer_drops_the_layers_plans():
    model = quantized_small(mq.Int8())
    x = torch.randn(2, 128)
    with torch.no_grad():
        model.head(x)
    assert model.head.quant_weight.plan is not None and plans(model.head)
    model.head.input_quantizer = None  # setting it at all: the plans were made for the state before
    assert model.head.quant_weight.plan is None and not plans(model.head)
    with torch.no_grad():
        model.head(x)
    assert plans(model.head)
    model.head.gptq = None
    assert not plans(model.head)


@settings(max_examples=30, deadline=None)
@given(case=conv_cases(), weights=st.sampled_from(["int8", "int4"]), inference=st.booleans())
def test_a_conv_from_its_plan_gives_the_full_paths_bits(case, weights, inference):
    """Any conv geometry: the second call (from the plan, made by the first) equals the first and the same kernel
    pinned (the full path) bit for bit, under no_grad or inference_mode."""
    conv, shape, seed = case
    torch.manual_seed(seed)
    model = nn.Sequential(conv).eval()
    spec = mq.Int8() if weights == "int8" else mq.Int4(group_size=conv.weight[0].numel())
    mq.quantize_(model, mq.QuantConfig(spec, skip=mq.SkipRules.none()))
    q = model[0]
    x = torch.randn(shape)
    with torch.inference_mode() if inference else torch.no_grad():
        first = q(x)
        second = q(x)
        kernel = q.last_kernel
        with mq.kernels.pin(kernel):
            pinned = q(x)
    assert (x.shape, x.dtype) in plans(q) and q.last_kernel == kernel
    assert torch.equal(second, first) and torch.equal(pinned, first)


@pytest.mark.skipif(not (fused.available() and hardware.cpu_has_avx512_vnni() and fused.has_vnni()),
                    reason="needs the compiled AVX512-VNNI kernel")
@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 24), lead=st.sampled_from([(), (3,)]), k=st.sampled_from([64, 200, 512]),
       n=st.integers(1, 70), bias=st.booleans(), transposed=st.booleans())
def test_a_w8a8_plan_runs_the_bound_vnni_kernel_with_the_full_paths_bits(rows, lead, k, n, bias, transposed):
    """``w8a8_vnni`` bound once (packed weight, sums, scales): from the plan, any input layout of the plan's shape
    gives the pinned full path's output bit for bit, and so does a new bias value (read on each call)."""
    torch.manual_seed(rows * 1000 + k + n)
    model = nn.Sequential(nn.Linear(k, n, bias=bias))
    mq.quantize_(model, mq.QuantConfig(mq.Int8(), activations=mq.Int8(dynamic=True), skip=mq.SkipRules.none()))
    q = model[0]
    x, first, second, pinned = first_from_plan_and_pinned(q, "w8a8_vnni", "float_acts", (*lead, rows, k), transposed)
    if bias:
        with torch.no_grad():
            q.bias.add_(1.0)
            moved = q(x)  # from the plan, which reads the bias on each call
            with mq.kernels.pin("w8a8_vnni"):
                assert torch.equal(moved, q(x))
    assert torch.equal(second, first) and torch.equal(pinned, first)


@needs_ext
def test_a_plan_records_its_kernel_once_and_again_after_anything_else_was_recorded(monkeypatch):
    """A plan writes ``last_kernel`` and ``ran`` on its first run only (``quant_weight.recorded``); a pinned call,
    the full path or any write of ``last_kernel`` in between makes its next run write them again."""
    model = quantized_small(mq.Int8(), "fused_cpu", monkeypatch)
    fc, x = model.fc, torch.randn(1, 1024)
    w = fc.quant_weight
    with torch.no_grad():
        fc(x)  # the full path: measured, ran, plan made
        fc(x)  # from the plan: recorded
        assert w.recorded is w.plan and fc.last_kernel == "fused_cpu" and w.ran == {1: "fused_cpu"}
        with mq.kernels.pin("dequant"):
            fc(x)
        assert w.recorded is None and fc.last_kernel == "dequant" and w.ran == {1: "dequant"}
        fc(x)
        assert w.recorded is w.plan and fc.last_kernel == "fused_cpu" and w.ran == {1: "fused_cpu"}
        fc.last_kernel = "set by hand"
        assert w.recorded is None
        fc(x)
    assert fc.last_kernel == "fused_cpu" and fc.kernel_summary() == "r1 fused_cpu"


def test_a_weight_pickled_before_recorded_existed_loads():
    model = quantized_small(mq.Int8())
    with torch.no_grad():
        model.head(torch.randn(2, 128))
    state = model.head.quant_weight.__getstate__()
    state["last_kernel"] = state.pop("_last_kernel")  # the attributes as 0.2 pickled them
    del state["recorded"]
    w = copy.copy(model.head.quant_weight)
    w.__setstate__(state)
    assert w.last_kernel == model.head.last_kernel and w.recorded is None and w.ran == model.head.quant_weight.ran
