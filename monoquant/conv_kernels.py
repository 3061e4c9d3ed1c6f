"""Picks the fastest correct convolution for a quantized conv layer, measured against the float conv, and runs it.

The float path -- dequantize the (small) kernel, then ``F.conv*`` in the compute dtype -- is the baseline and the
static choice: it runs wherever nothing was measured faster. The candidates:

=====================  ==================================================================  ==================
kernel                 registered by, applies when                                         computes in
=====================  ==================================================================  ==================
``w8a8_conv_int_mm``   Int8 symmetric weights, INT8 activations ready (frozen or dynamic),  int32, then one
                       CPU with integer dot products (VNNI / AMX) and ``torch._int_mm``,    float32 rescale
                       input needs no gradient: int8 patches x int8 weight
                       (:mod:`monoquant.formats.int8`)
``act_sim_conv``       shared, with INT8 activations (the static choice): the input        as the weight-only
                       fake-quantized per sample (one compiled call where it can),          choice
                       then the weight-only choice below
``float_acts_conv``    shared, the measured baseline with INT8 activations: the            as the weight-only
                       weight-only choice below on the input as it came (activations not    choice
                       quantized): the float conv with the layer's INT8 weights
``im2col_linear``      shared: weight-only, ``groups == 1``, no gradient, compute_dtype     the linear kernel's
                       None/bf16: the input patches (``im2col.conv_patches``) through
                       the layer's linear kernels (``kernels.select_kernel``)
``dequant_conv_bf16``  shared: the same rule as the linear ``dequant_bf16`` (CPU with fast  bf16
                       bf16 GEMMs, compute_dtype None/bf16): kernel dequantized to bf16,
                       ``F.conv*`` in bf16
``dequant_conv_direct``  shared: CPU with the compiled kernels, 2-d, stride 1, ``groups ==  float32
                       1``, no dilation, zero padding the same on both sides, a float32
                       contiguous input of at most :data:`DIRECT_MAX_INPUT` values, a
                       layer that keeps its float32 kernel: the
                       direct convolution :func:`monoquant.fused.direct_conv2d` with the
                       kept kernel (no im2col pass, no GEMM call)
``dequant_conv_im2col``  shared: CPU, 2-d, a contiguous input, ``groups == 1``, no         compute_dtype,
                       dilation, zero padding the same on both sides: PyTorch's own im2col  else input dtype
                       + GEMM convolution (``thnn_conv2d``), which ``F.conv2d`` takes for
                       one sample only, with the dequantized kernel
``dequant_conv_        shared: CPU, 2-d/3-d, a contiguous input, a layer that keeps its     compute_dtype,
channels_last``        float kernel in the input's dtype: ``F.conv*`` with a channels-last  else input dtype
                       copy of the kept kernel, which takes oneDNN's channels-last
                       convolution where ``F.conv2d`` of one sample takes PyTorch's slower
                       native one; the output made contiguous again
``dequant_conv``       shared, the baseline: kernel dequantized, ``F.conv*``                compute_dtype,
                                                                                           else input dtype
=====================  ==================================================================  ==================

The float-algorithm candidates exist because ``F.conv2d`` picks its CPU algorithm from fixed rules, not by
measurement: one sample of a small 3x3 conv takes the native im2col path, more samples oneDNN. On AMD EPYC Zen 4
(2 threads) the digits CNN's 32 -> 64 conv on one 8x8 image took 40-100 us through ``F.conv2d`` and 30-42 us
channels-last; at 2-16 samples its 1 -> 32 conv took 52-77 us through oneDNN, 17-37 us through the im2col path and
4.6-19 us through the direct conv (7.6 and 3.7 us at one image); its 64 -> 64 conv on a 4x4 image took 24 us
through ``F.conv2d`` and 16 us through the direct conv (at 16 images and more, oneDNN's or the bf16 conv win).
The im2col call skips ``F.conv2d``'s own dispatch too (about 5 us of a 40 us conv at one image); it comes first
among near-ties, since inside a model, with the caches cold from the other layers, the channels-last conv lost
most of its lead (the tuner times a layer alone, each call right after the last). Both give the float conv's result
up to float rounding order (not its bits) in the same (contiguous) memory format; an input that is not
contiguous (channels-last, a slice) runs ``dequant_conv`` whatever was chosen, so that the output's strides are
always the float conv's.

The tuner (:mod:`monoquant.tuner`) times the eligible candidates once per situation -- format, shape, geometry,
input spatial size, batch bucket (the batch rounded up to a power of two), dtypes -- on the real input (each
sample the fastest of three calls, so that a load burst on a shared machine does not hold up the baseline alone;
near-ties timed again, the median sample deciding) and keeps the fastest only when it beats the baseline by more
than ``tuner.MARGIN``, so a measured choice is never slower than the float conv as measured; identical layers
share the choice.

**INT8 activations never slower than float.** With INT8 activations the measured baseline is the float conv
itself -- ``float_acts_conv``: the dequantized INT8 kernel on the float input -- not the fake-quantized input's
conv (``act_sim_conv``, which is that conv plus the input's quantization, so it is never timed: once, under load,
a timing picked it). Where the integer conv does not beat it (small convolutions at small batches, where
quantizing the input costs more than the conv), the layer runs ``float_acts_conv``: its outputs are those of
the INT8-weight model on float activations (more accurate than W8A8, not bit-equal to it), and the kernel column
of the report and ``quant_weight.ran`` name it, so it never happens silently. To get the W8A8 arithmetic
everywhere, turn measurement off (``MONOQUANT_TUNE=0`` or ``with mq.kernels.tuning(False):``: ``act_sim_conv``
or the format's integer conv, as before) or pin ``act_sim_conv``.

Convolutions with fewer than :data:`TUNE_MIN_MACS` multiply-adds per call run the measured baseline without
timing (``dequant_conv``, with INT8 activations ``float_acts_conv``); inputs that need a gradient and
``MONOQUANT_TUNE=0`` run the static choice (``dequant_conv``, with INT8 activations ``act_sim_conv``); a pinned
kernel (``MONOQUANT_KERNEL``, :func:`monoquant.kernels.pin`) runs
where it is eligible. While GPTQ waits for ``freeze``, while activations
calibrate, the layer runs its float path directly. In traced code (``torch.compile``, ``torch.export``) the
whole dispatch is one custom op, ``monoquant::conv`` (:mod:`monoquant.ops`), so compiled and eager models run
the same kernels.

A small conv keeps its dequantized kernel (at most :data:`monoquant.kernels.FLOAT_WEIGHT_CACHE_BYTES` in the
layer's float dtype, counted in its ``storage_bytes()``): at batch 1 dequantizing it on every call cost as much as
the conv itself. Larger kernels are dequantized on every call into a reused per-thread buffer (the memory saving
is the point). What does not change per call is cached on the layer's
:class:`~monoquant.formats.kernel.QuantWeight` (the geometry, the kept kernel, the measured choices per batch
bucket and per exact input shape), and dropped with everything else derived from the stored weight when it
changes (``load_state_dict``, ``.to()``). With dynamic INT8 activations the baseline fake-quantizes its input in
one compiled call (:func:`fake_quantize_samples`).
What ran per batch bucket is recorded in ``quant_weight.ran`` and shown by :func:`kernel_summary` (the report's
kernel column).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from . import call_plans, fused, kernels, tuner
from .formats.kernel import KernelCandidate, KernelQuery, QuantWeight
from .hardware import cpu_has_fast_bf16
from .im2col import ConvGeometry, conv_patches

__all__ = ["DIRECT_MAX_INPUT", "SHARED_CONV_KERNELS", "TUNE_MIN_MACS", "conv", "conv_kernel_names",
           "fake_quantize_samples", "kernel_summary", "run_conv_kernel", "select_conv_kernel"]

TUNE_MIN_MACS = 1 << 14
"""Convolutions with fewer multiply-adds per call than this (a few microseconds of float32 work, under the timer's
noise) are not timed: the baseline runs. Unlike linear layers (``tuner.TUNE_MIN_WEIGHTS``), a conv's work grows
with its input, not its weight: the digits CNN's 18k-weight conv does 1.2M multiply-adds per 8x8 image, and
timing the few candidates once per batch bucket costs milliseconds."""

SHARED_CONV_KERNELS = kernels.SHARED_CONV_KERNELS
"""The conv kernels every format has (the format's own are listed by ``conv_kernel_candidates()``)."""


def conv_kernel_names(module) -> tuple[str, ...]:
    """Every conv kernel ``module``'s format can run: its own candidates, then the shared ones."""
    own = tuple(c.name for c in module.quant_weight.format.conv_kernel_candidates())
    return (*own, *SHARED_CONV_KERNELS)


# ---- choosing ---------------------------------------------------------------------------------------------
def _geometry(module) -> ConvGeometry:
    return module.quant_weight.cached("conv_geometry", module.gptq_geometry)


def _query(module, x: torch.Tensor, needs_grad: bool) -> KernelQuery:
    w: QuantWeight = module.quant_weight
    n, k = w.shape2d
    return KernelQuery(n, k, w.group_size, x.device, x.shape[0], module.compute_dtype, needs_grad)


def _format_candidates(module, int8_inputs: bool, q: KernelQuery) -> list[KernelCandidate]:
    w: QuantWeight = module.quant_weight
    return [c for c in w.format.conv_kernel_candidates() if c.int8_inputs == int8_inputs and c.eligible(w, q)]


def _candidates(module, x: torch.Tensor, needs_grad: bool, weights_only: bool) -> list[str]:
    """Eligible conv kernels for batched input ``x``, preferred first, the baseline last."""
    q = _query(module, x, needs_grad)
    act = module.input_quantizer
    if act is not None and not weights_only:  # the static baseline last; _choose adds the measured one
        return [*(c.name for c in _format_candidates(module, True, q)), "act_sim_conv"]
    cands = [c.name for c in _format_candidates(module, False, q)]
    # not behind INT8 activations: their NaN contract is per sample (a non-finite sample gives a NaN sample, the
    # others numbers), and the bf16 GEMM of dequant_bf16 on AMX carried one patch row's NaN into its neighbours
    # and, as for the linear packed kernels, not where another compute dtype than bf16 is forced
    if _geometry(module).groups == 1 and q.low_bit_ok and act is None:
        cands.append("im2col_linear")
    if x.device.type == "cpu":
        if cpu_has_fast_bf16() and module.compute_dtype in (None, torch.bfloat16):
            cands.append("dequant_conv_bf16")  # the rule of the linear dequant_bf16
        if not needs_grad and _direct_ok(module, x):  # the compiled kernel has no backward
            cands.append("dequant_conv_direct")
        if _im2col_ok(module, x):
            cands.append("dequant_conv_im2col")
        if _channels_last_ok(module, x):
            cands.append("dequant_conv_channels_last")
    cands.append("dequant_conv")
    return cands


def _kept_kernel_applies(module, x: torch.Tensor) -> bool:
    """A contiguous input ``x`` of a layer that keeps its float kernel in the dtype it computes ``x`` in (what the
    channels-last and direct candidates read: never the stored weight per call)."""
    dtype = module.compute_dtype or module.float_dtype
    return (x.is_contiguous() and kernels.kept_float_bytes(module) > 0 and module.gptq is None
            and kernels.float_compute_dtype(module, x) == dtype)


def _channels_last_ok(module, x: torch.Tensor) -> bool:
    """``dequant_conv_channels_last`` applies: a 2-d/3-d conv, :func:`_kept_kernel_applies`."""
    return _geometry(module).dims in _CHANNELS_LAST and _kept_kernel_applies(module, x)


DIRECT_MAX_INPUT = 1 << 16
"""``dequant_conv_direct`` is offered for inputs of at most this many values per call (256 KiB of float32): it
won for small images at small batches (the digits CNN up to 16 images of 1 x 8 x 8, 2 of 64 x 4 x 4) and lost
from 16 images of 32 x 8 x 8 on, where oneDNN's or the bf16 conv win; timing it on large inputs would only cost
time at the first call."""


def _direct_ok(module, x: torch.Tensor) -> bool:
    """``dequant_conv_direct`` applies: what :func:`monoquant.fused.direct_conv2d` computes (what ``thnn_conv2d``
    does, with stride 1) on a float32 input of at most :data:`DIRECT_MAX_INPUT` values,
    :func:`_kept_kernel_applies`."""
    return (x.dtype == torch.float32 and x.numel() <= DIRECT_MAX_INPUT and _im2col_ok(module, x)
            and _geometry(module).stride == (1, 1) and _kept_kernel_applies(module, x) and fused.available())


def _im2col_ok(module, x: torch.Tensor) -> bool:
    """``dequant_conv_im2col`` applies: a contiguous input and what ``thnn_conv2d`` computes -- 2-d, no groups, no
    dilation, zero padding the same on both sides of each dim."""
    g = _geometry(module)
    return (x.is_contiguous() and _THNN_CONV2D is not None and g.dims == 2 and g.groups == 1
            and g.dilation == (1, 1) and g.padding_mode == "zeros" and g.pads[0] == g.pads[1]
            and g.pads[2] == g.pads[3])


def _macs(module, x: torch.Tensor) -> int:
    """Multiply-adds of one call (output positions estimated from the input size and the strides)."""
    n, k = module.quant_weight.shape2d
    geometry = _geometry(module)
    positions = x[0, 0].numel() // max(1, math.prod(geometry.stride))
    return n * k * positions * x.shape[0]


def select_conv_kernel(module, x: torch.Tensor, *, weights_only: bool = False) -> str:
    """The kernel ``forward`` runs for batched input ``x`` ``[B, C, *spatial]``: pinned where eligible, else
    measured (:mod:`monoquant.tuner`), else the baseline. ``weights_only=True`` ignores input quantization (what
    ``act_sim_conv`` runs after fake-quantizing). A decision is remembered on the layer's ``quant_weight`` per
    situation (batch bucket) and per exact input shape, so that later calls cost one dictionary lookup."""
    return _plan(module, x, weights_only)[0]


def _plan(module, x: torch.Tensor, weights_only: bool = False) -> tuple:
    """``(name, run, measured)``: :func:`select_conv_kernel`'s choice, the function that runs it (``run(module,
    x)``), and whether it was measured. A measured plan is remembered per exact input shape
    (``quant_weight.cache["conv_by_shape"]``), with what each call would decide again decided
    (:func:`_shortcut`), so that the weight-only choice inside ``float_acts_conv`` costs one lookup too."""
    bias = module.bias  # a trainable bias needs the differentiable path too (and a kept weight autograd can save)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
    w: QuantWeight = module.quant_weight
    memo = exact = shapes = None
    pinned = None
    if not needs_grad and tuner.measured():
        weights = weights_only or module.input_quantizer is None
        shapes = w.cache.get("conv_by_shape")
        if shapes is None:
            shapes = w.cache["conv_by_shape"] = {}
        exact = (weights, x.shape, x.dtype, x.device)
        plan = shapes.get(exact)
        if plan is not None:
            return plan
        memo = ("tuned_conv", weights, x.device, x.dtype, x.shape[1:], tuner.row_bucket(x.shape[0]))
    else:
        pinned = tuner.pinned()
    choice = _choose(module, x, needs_grad, weights_only, pinned, memo)
    run = _SHARED.get(choice) or _CONV[choice]
    if shapes is None or memo not in w.cache:
        return choice, run, False
    if len(shapes) >= 64:  # inputs of ever new sizes: the bucket memo stays, this shortcut restarts
        shapes.clear()
    plan = shapes[exact] = (choice, _shortcut(module, x, choice) or run, True)
    return plan


def _shortcut(module, x: torch.Tensor, name: str) -> Callable[..., torch.Tensor] | None:
    """For the per-shape memo (used only where no pin and no ``tuning(False)`` apply): ``run(module, x)`` with
    what every call of the baseline paths would decide again already decided, or ``None`` for the plain runner.
    ``dequant_conv`` with a kept kernel in the input's dtype is the ``F.conv*`` call with that kernel and the
    layer's geometry, ``dequant_conv_channels_last`` the same with the kernel's channels-last copy and
    ``dequant_conv_im2col`` the ``thnn_conv2d`` call (both run the first for an input that is not contiguous);
    ``float_acts_conv`` is the weight-only choice for this shape; ``act_sim_conv`` fake-quantizes, then runs that
    choice. They live in ``quant_weight.cache``, so what drops the kept kernel drops the shortcut."""
    if name == "float_acts_conv":
        return _plan(module, x, weights_only=True)[1]
    if name == "act_sim_conv":
        inner = _plan(module, x, weights_only=True)[1]
        return lambda m, xb: inner(m, fake_quantize_samples(m.input_quantizer, xb))
    bias = module.bias
    kept = kernels.kept_float_weight(module, x.dtype)
    if (kept is None or kernels.float_compute_dtype(module, x) != x.dtype
            or (bias is not None and bias.dtype != x.dtype)):
        return None
    base = _conv_with(module, kept)
    if name == "dequant_conv":
        return base
    if name == "dequant_conv_channels_last":
        run = _conv_with(module, _kept_channels_last(module, x.dtype))
        return lambda m, xb: run(m, xb).contiguous() if xb.is_contiguous() else base(m, xb)
    if name == "dequant_conv_direct":
        direct, g = fused.compiled("direct_conv2d"), _geometry(module)
        pad_h, pad_w = g.pads[2], g.pads[0]
        return lambda m, xb: (direct(xb, kept, m._buffers["bias"], pad_h, pad_w) if xb.is_contiguous()
                              else base(m, xb))
    if name == "dequant_conv_im2col":
        thnn, g = _THNN_CONV2D, _geometry(module)
        size, stride, padding = g.kernel_size, g.stride, (g.pads[2], g.pads[0])
        return lambda m, xb: (thnn(xb, kept, size, m._buffers["bias"], stride, padding) if xb.is_contiguous()
                              else base(m, xb))
    return None


def _conv_with(module, kernel: torch.Tensor) -> Callable[..., torch.Tensor]:
    """``run(module, x)``: the layer's ``F.conv*`` with ``kernel``, its geometry read once (no ``nn.Module``
    ``__getattr__`` per call), the bias read on each call."""
    if module.padding_mode != "zeros":
        return lambda m, xb: m.float_conv(xb, kernel, m._buffers["bias"])
    conv_fn, args = module._conv, (module.stride, module.padding, module.dilation, module.groups)
    return lambda m, xb: conv_fn(xb, kernel, m._buffers["bias"], *args)


def _choose(module, x: torch.Tensor, needs_grad: bool, weights_only: bool, pinned: str | None,
            memo: tuple | None) -> str:
    """The choice for ``x`` without the per-shape shortcut: remembered per batch bucket under ``memo`` (``None``:
    pinned, tuning off or a gradient wanted, nothing remembered), else measured."""
    w: QuantWeight = module.quant_weight
    if memo is not None and memo in w.cache:
        return w.cache[memo]
    cands = _candidates(module, x, needs_grad, weights_only)
    if pinned is not None:
        if pinned == "float_acts_conv" and cands[-1] == "act_sim_conv":
            return pinned
        return pinned if pinned in cands else cands[-1]  # the baseline honours a weight-only pin inside
    if memo is None or x.shape[0] == 0:
        return cands[-1]
    if cands[-1] == "act_sim_conv":
        # measured: the float conv itself is the baseline. act_sim_conv is not offered: it is float_acts_conv plus
        # the input's fake quantization, in front of the same weight-only choice, so never faster
        cands[-1] = "float_acts_conv"
    if len(cands) == 1 or _macs(module, x) < TUNE_MIN_MACS:
        w.cache[memo] = cands[-1]
        return cands[-1]
    g = _geometry(module)
    key = "|".join(("conv", w.format.describe(w.group_size), "w" if memo[1] else "act", x.device.type,
                    "x".join(map(str, module.weight_shape)),
                    f"s{g.stride}d{g.dilation}p{g.pads}{g.padding_mode}g{g.groups}",
                    "in" + "x".join(map(str, x.shape[1:])), f"b{memo[-1]}", str(x.dtype).removeprefix("torch."),
                    str(module.compute_dtype).removeprefix("torch.")))
    calls = {name: functools.partial(_CONV[name], module, x) for name in cands}
    choice = w.cache[memo] = tuner.choose(key, calls, baseline=cands[-1], timer=_time_best_of_three)
    return choice


def _time_best_of_three(call: Callable[[], object]) -> float:
    """One timing sample for the tuner: the fastest of three calls (:func:`monoquant.tuner.time_call`). A small
    conv takes tens of microseconds, and on a machine shared with other processes a single call is often held up
    several times over: with one call per sample, a slower candidate was seen replacing the float conv."""
    return min(tuner.time_call(call) for _ in range(3))


# ---- running ----------------------------------------------------------------------------------------------
def conv(module, x: torch.Tensor, *, raw_ok: bool = False) -> torch.Tensor:
    """``module``'s output for its prepared input ``x`` (batched or not), through the chosen conv kernel.

    A measured choice for a batched input is also remembered per exact input with the function that runs it
    (:mod:`monoquant.call_plans`): the next call like it is one lookup, then the conv. ``raw_ok``: ``x`` is the
    layer's raw input, so its ``forward`` may run the plan before preparing the next input like it."""
    run = call_plans.lookup(module, x)
    if run is not None:
        return run(module, x)
    if module.computes_in_float:
        return module.float_forward(x)  # calibration passes: the float weight or float inputs, recorded there
    unbatched = x.dim() == _geometry(module).dims + 1
    xb = x.unsqueeze(0) if unbatched else x
    plan = _plan(module, xb)
    bucket = tuner.row_bucket(xb.shape[0])
    module.quant_weight.record_run(plan[0], bucket)
    if plan[2] and not unbatched and call_plans.allowed(module, x):
        call_plans.remember(module, x, plan[0], bucket, plan[1], raw_ok=raw_ok)
    y = plan[1](module, xb)
    return y.squeeze(0) if unbatched else y


def run_conv_kernel(module, name: str, x: torch.Tensor) -> torch.Tensor:
    """Run conv kernel ``name`` on batched ``x``; the output has ``x``'s dtype."""
    shared = _SHARED.get(name)
    if shared is not None:
        return shared(module, x)
    w: QuantWeight = module.quant_weight
    c = next(c for c in w.format.conv_kernel_candidates() if c.name == name)
    return c.run(w, x, _geometry(module), module.input_quantizer, module.bias).to(x.dtype)


def _dequant_conv_in(module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The layer's ``F.conv*`` in ``dtype`` with its kernel dequantized: the kept one
    (:func:`monoquant.kernels.kept_float_weight`, cast to ``dtype`` when it is kept in another), else dequantized
    now (into a reused per-thread buffer unless autograd needs it). Casts are skipped where the dtype already
    matches (each is a dispatch on a path whose fixed cost decides small convolutions)."""
    weight, bias = _float_kernel(module, x, dtype)
    y = module.float_conv(x if x.dtype == dtype else x.to(dtype), weight, bias)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _float_kernel(module, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernel and bias :func:`_dequant_conv_in` convolves with in ``dtype``."""
    weight = kernels.kept_float_weight(module, dtype)
    if weight is None:
        # the kept kernel cast to dtype: a quarter of the cost of dequantizing it again (an 18k-weight conv's
        # kernel, 6 vs 24 us on AMD EPYC Zen 4, against a 165 us bf16 conv at batch 16)
        kept = kernels.kept_float_weight(module, module.compute_dtype or module.float_dtype)
        weight = None if kept is None else kept.to(dtype)
    if weight is None:
        w: QuantWeight = module.quant_weight
        if x.requires_grad and torch.is_grad_enabled():
            weight = w.dequantize_rows(dtype)
        else:
            n, k = w.shape2d
            weight = w.dequantize_into(kernels.scratch("conv_weight", n * k, dtype, x.device).view(n, k))
        weight = weight.view(module.weight_shape)
    bias = module.bias
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    return weight, bias


_CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}
_THNN_CONV2D = getattr(torch._C._nn, "thnn_conv2d", None)  # aten::thnn_conv2d, PyTorch's native im2col conv


def _kept_channels_last(module, dtype: torch.dtype) -> torch.Tensor | None:
    """A channels-last copy of the kernel the layer keeps in ``dtype`` (``None`` where it keeps none), in
    ``quant_weight.cache`` beside it and made in the same autograd mode (an inference tensor under
    ``torch.inference_mode``)."""
    kept = kernels.kept_float_weight(module, dtype)
    if kept is None:
        return None
    cache = module.quant_weight.cache
    copy = cache.get("float_weight_channels_last")
    if copy is None or copy.is_inference() != kept.is_inference():  # one dtype is kept; the mode may change
        fmt = _CHANNELS_LAST[kept.dim() - 2]
        copy = cache["float_weight_channels_last"] = kernels.in_this_mode(lambda: kept.contiguous(memory_format=fmt))
    return copy


def _dequant_conv_channels_last(module, x: torch.Tensor) -> torch.Tensor:
    dtype = kernels.float_compute_dtype(module, x)
    weight = _kept_channels_last(module, dtype) if x.is_contiguous() else None
    if weight is None:  # not contiguous, or no kept kernel (e.g. a pin where none is kept): the baseline
        return _dequant_conv(module, x)
    bias = module.bias
    y = module.float_conv(x if x.dtype == dtype else x.to(dtype), weight, bias if bias is None else bias.to(dtype))
    return (y if y.dtype == x.dtype else y.to(x.dtype)).contiguous()


def _dequant_conv_direct(module, x: torch.Tensor) -> torch.Tensor:
    kept = kernels.kept_float_weight(module, torch.float32)
    if not x.is_contiguous() or kept is None or x.dtype != torch.float32:  # e.g. a pin where it is not eligible
        return _dequant_conv(module, x)
    g, bias = _geometry(module), module.bias
    return fused.direct_conv2d(x, kept, bias if bias is None else bias.float(), g.pads[2], g.pads[0])


def _dequant_conv_im2col(module, x: torch.Tensor) -> torch.Tensor:
    if not x.is_contiguous():
        return _dequant_conv(module, x)
    dtype = kernels.float_compute_dtype(module, x)
    weight, bias = _float_kernel(module, x, dtype)
    g = _geometry(module)
    y = _THNN_CONV2D(x if x.dtype == dtype else x.to(dtype), weight, g.kernel_size, bias, g.stride,
                     (g.pads[2], g.pads[0]))
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _dequant_conv(module, x: torch.Tensor) -> torch.Tensor:
    return _dequant_conv_in(module, x, kernels.float_compute_dtype(module, x))


def _dequant_conv_bf16(module, x: torch.Tensor) -> torch.Tensor:
    return _dequant_conv_in(module, x, torch.bfloat16)


def _im2col_linear(module, x: torch.Tensor) -> torch.Tensor:
    geometry = _geometry(module)
    patches = conv_patches(x, geometry)[0]  # [batch * positions, K]
    name = kernels.select_kernel(module, patches, weights_only=True)
    y = kernels.run_kernel(module, name, patches)  # [batch * positions, N], bias added
    return y.view(x.shape[0], *geometry.output_size(x.shape[2:]), -1).movedim(-1, 1).contiguous()


def fake_quantize_samples(act, x: torch.Tensor) -> torch.Tensor:
    """Batched conv input ``x`` through activation quantizer ``act`` per sample (quantized, then dequantized): with
    dynamic qparams on a CPU float32 input that needs no gradient, the one compiled call
    :func:`monoquant.fused.dynamic_fake_quantize_rows` (bit-identical; a dozen tensor ops cost 30-60 us at batch 1
    here, more than the small conv itself), else ``act.fake_quantize(x, per="sample")``."""
    if (act.dynamic and x.dtype == torch.float32 and x.device.type == "cpu" and x.numel() and fused.available()
            and not (x.requires_grad and torch.is_grad_enabled())):
        qt = act.qtype
        return fused.dynamic_fake_quantize_rows(x.contiguous(), qt.qmin, qt.qmax, qt.symmetric, act.eps)
    return act.fake_quantize(x, per="sample")


def _act_sim_conv(module, x: torch.Tensor) -> torch.Tensor:
    xq = fake_quantize_samples(module.input_quantizer, x)
    return _plan(module, xq, weights_only=True)[1](module, xq)


def _float_acts_conv(module, x: torch.Tensor) -> torch.Tensor:
    """A conv with INT8 activations run on its float input: the weight-only choice, no input quantization."""
    return _plan(module, x, weights_only=True)[1](module, x)


_SHARED: dict[str, Callable[..., torch.Tensor]] = {
    "act_sim_conv": _act_sim_conv,
    "float_acts_conv": _float_acts_conv,
    "im2col_linear": _im2col_linear,
    "dequant_conv_bf16": _dequant_conv_bf16,
    "dequant_conv_direct": _dequant_conv_direct,
    "dequant_conv_im2col": _dequant_conv_im2col,
    "dequant_conv_channels_last": _dequant_conv_channels_last,
    "dequant_conv": _dequant_conv,
}


def _named(name: str) -> Callable[..., torch.Tensor]:
    def call(module, x: torch.Tensor) -> torch.Tensor:
        return run_conv_kernel(module, name, x)

    call.__name__ = call.__qualname__ = f"_{name}"
    return call


class _ByName(dict):
    """``_CONV[name](module, x)``: any conv kernel by name, as a function called ``_<name>`` (what the tuner
    times)."""

    def __missing__(self, name: str) -> Callable[..., torch.Tensor]:
        call = self[name] = _named(name)
        return call


_CONV = _ByName()


# ---- what ran ---------------------------------------------------------------------------------------------
def kernel_summary(module) -> str:
    """The report's kernel column for a conv layer: once ``forward`` has run, the kernel that ran per batch
    bucket, neighbouring buckets that ran the same kernel merged (``"b1-16 dequant_conv, b256
    w8a8_conv_int_mm"``: up to 16 samples, and 129-256); before any forward the baseline, marked as a guess."""
    runs = module.quant_weight.ran
    if not runs:
        act = module.input_quantizer
        return ("act_sim_conv" if act is not None else "dequant_conv") + " (static guess, not run yet)"
    return kernels.buckets_summary(runs, "b")
