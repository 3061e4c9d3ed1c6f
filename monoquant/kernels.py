"""Picks the fastest correct matmul for a quantized layer, and runs it: the dispatch, plus the shared candidates
every format has (dequantize + matmul).

A low-bit kernel belongs to the weight format that can run it: the format lists its
:class:`~monoquant.formats.kernel.KernelCandidate` objects in ``kernel_candidates()`` (eligibility, the repacked
layouts it caches, the call; see :mod:`monoquant.formats.kernel`), and this module only asks. The built-in ones:

===================  =====================================================================  ==============
kernel               registered by, applies when                                            computes in
===================  =====================================================================  ==============
``int4pack_cuda``    Int4: CUDA >= sm80, group in 32..256, N % 8 == 0, K % 128 == 0         bf16
``int4pack_cpu``     Int4: CPU, group in 32..256, N % 16 == 0, K % group == 0,               bf16
                     rows <= its ``max_rows`` (48)
``int8pack_cpu``     Int8 symmetric: CPU, K % 16 == 0, rows <= its ``max_rows`` (12); the   bf16
                     op crashes the process for other K (torch 2.13)
``fused_cpu``        Int4 / Int8: CPU, compiled kernel available (:mod:`monoquant.fused`),   float32
                     no compute_dtype forced, rows <= ``FUSED_MAX_ROWS`` (8)
``fused_bf16``       Int4 / Int8: CPU with AVX512-BF16 and a build that has it, bf16        bf16 (float32
                     input or compute_dtype bf16, K % 32 == 0 (Int4: group % 32 == 0),      sums)
                     N % 4 == 0;
                     the stored codes decoded per 8-row tile (``vdpbf16ps``); by
                     measurement only (``max_rows`` 0), timed up to 256 rows
``fused_bf16_gemm``  same, N % 16 == 0: the weight dequantized once per call into bf16      bf16 (float32
                     panels, an 8 x 48 micro-kernel; by measurement only, any rows          sums)
``dequant_bf16``     shared: CPU with fast bf16 GEMMs (AMX / AVX512-BF16), compute_dtype     bf16
                     None/bf16
``dequant``          shared: everything else: dequantize, then ``F.linear``                 compute_dtype,
                                                                                            else input dtype
===================  =====================================================================  ==============

The static table (tuning off) runs the first eligible row in this order: the format's candidates in the order it
lists them, then ``dequant_bf16``, then ``dequant``.

Layers that quantize their inputs (``input_quantizer``, see :mod:`monoquant.nn.activation`) or wait for GPTQ
go through these rows first:

=================  =====================================================================  ==============
kernel             applies when                                                           computes in
=================  =====================================================================  ==============
``gptq_pending``   shared: ``method="gptq"`` before :func:`monoquant.freeze`: the float   input dtype
                   weight
``uncalibrated``   shared: static activations not frozen, outside ``mq.calibrate``:       -
                   raises
``w8a8_int_mm``    Int8 symmetric, INT8 activations ready (frozen or dynamic),            int32, then one
                   ``torch._int_mm`` present, CPU with integer dot products (VNNI or AMX,  float32 rescale
                   :func:`~monoquant.hardware.cpu_has_int_dot`; elsewhere it is a slow
                   reference loop) or CUDA (rows > 16, N % 8 == 0, K % 8 == 0), input
                   needs no gradient
``w8a8_onednn``    same layers on CPU with AMX (without it oneDNN's int8 matmul ran a     exact sums in
                   reference loop, 300x slower than ``torch._int_mm``), the op present,   float32, then
                   compiled kernel built, weights whose sums stay below 2**24: the        the same
                   weight prepacked once (AMX-INT8 tiles); bit-identical to               rescale
                   ``w8a8_int_mm``
``w8a8_vnni``      same layers on CPU with AVX512-VNNI, compiled kernel built with it     int32, then the
                   (:func:`monoquant.fused.has_vnni`), 0 < K <= 2**17: the whole layer    same rescale, in
                   in one call (quantize rows, u8 x s8 ``vpdpbusd`` on the weight         registers
                   repacked once into 64-row panels, zero-point/scales/bias epilogue);
                   bit-identical to ``w8a8_int_mm``
``w8a8_fused``     same layers on CPU, compiled kernel built (:mod:`monoquant.fused`),     int32, then the
                   K <= 2**17: codes widened to int16 pairs, ``vpmaddwd`` (AVX2: twice    same rescale
                   float32's multiply-adds per instruction); the weight is repacked once
                   (cached, same bytes); bit-identical to ``w8a8_int_mm``
``w8a8_sim``       same layers when this torch has no ``torch._int_mm`` (a ``fallback``    float64, then
                   candidate): the same integer products in float64 (exact)                the same rescale
``act_sim``        shared: every other layer with INT8 activations (INT4, affine INT8,    as the weight
                   half, and W8A8 where no INT8-input candidate is eligible):             kernel
                   quantize-dequantize the input, then the weight-only rows above
``float_acts``     shared, measured only (never the static table): the weight-only rows   as the weight
                   above on the input as it came, not quantized; the baseline the rows    kernel
                   above are timed against, run where none of them is faster
=================  =====================================================================  ==============

While ``mq.calibrate`` runs, layers whose activations are not frozen yet use the weight-only rows with the
float input (the observers see float activations, as they will at freeze time).

Packed kernels are skipped when a ``compute_dtype`` other than bf16 is forced (float32 or float16 run the
``dequant`` row in that dtype; ``fused_cpu`` is skipped when any ``compute_dtype`` is forced), when the
input needs a gradient (only the dequantize paths are differentiable w.r.t. the input), and when the op is
missing from this torch build (``fused_cpu``: when the C++ file cannot be compiled here). Measured on a 2-core
AVX512 + AMX CPU (``benchmarks/bench_linear.py``): the packed kernels are ~2.5-3x faster than float32 at
1 row but grow linearly with rows and lose to a dequantize + bf16 GEMM beyond 24-48 rows, hence their
``max_rows``. The dequantize is done in chunks of output rows into per-thread buffers that are
reused across calls (fresh large allocations page-fault every time), so its scratch memory stays small
(``DEQUANT_CHUNK_ELEMENTS``) however large the layer.

**Measured choice.** The table above is the *static* choice: what runs with tuning off
(``MONOQUANT_TUNE=0``, :func:`tuning`), for layers under ``tuner.TUNE_MIN_WEIGHTS`` weights that keep no float
weight (:data:`FLOAT_WEIGHT_CACHE_BYTES`) and for inputs that need a gradient. Otherwise :func:`select_kernel`
times every eligible candidate once per (scheme, device, shape, row bucket) on the real input -- without the
static row limits, up to each candidate's ``tune_max_rows`` -- and keeps the fastest, the plain ``dequant``
(with a small layer's kept float weight: ``F.linear`` itself; with INT8 activations, ``float_acts``) baseline
winning ties and the earlier candidate in this order winning near-ties (``act_sim`` is not timed: it is
``float_acts`` plus the input's fake quantization); see :mod:`monoquant.tuner` for the two timing passes, pinning
(``MONOQUANT_KERNEL``, :func:`pin`) and the cache file.

Everything a kernel needs and records lives in the layer's :class:`~monoquant.formats.kernel.QuantWeight`
(``layer.quant_weight``): the stored buffers, kernel-specific layouts derived from them at first use (never in
``state_dict``), the tuned choices, ``last_kernel`` and the kernels run per row bucket. Timing builds every
candidate's layout; afterwards only the layouts of kernels the layer runs stay cached (the candidates'
``layouts``). This module never imports a layer class: it is handed a layer that has ``quant_weight``, ``bias``,
``compute_dtype``, ``input_quantizer`` and ``gptq``.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from . import call_plans, fused, hardware, tuner
from .errors import ConfigError
from .formats import FORMATS
from .formats.integer import FUSED_MAX_ROWS
from .formats.kernel import KernelCandidate, KernelQuery, QuantWeight, flat
from .hardware import cpu_has_fast_bf16, cpu_has_int_dot, cuda_supports_int4pack, int_mm_shape_ok

__all__ = ["ACTIVATION_KERNELS", "DEQUANT_CHUNK_ELEMENTS", "FLOAT_WEIGHT_CACHE_BYTES", "FUSED_MAX_ROWS",
           "SHARED_CONV_KERNELS", "SHARED_KERNELS", "TUNE_MAX_ROWS",
           "RowLimits", "choose_linear_kernel", "cpu_has_fast_bf16", "cpu_has_int_dot", "cuda_supports_int4pack",
           "dequant_chunk_rows", "fused", "int_mm_shape_ok", "kept_float_bytes", "kept_float_weight", "kernel_names",
           "kernel_summary", "linear", "pin", "reload_environment", "run_kernel", "scratch", "select_kernel",
           "static_row_limits", "tuning"]

_HAS = hardware.HAS  # the same dict (tests patch entries through either name)


class RowLimits:
    """Row limits by candidate: one of its attributes (``"max_rows"`` for the static table, ``"tune_max_rows"``
    for timing), read at call time; ``overrides`` (kernel name -> rows) win."""

    def __init__(self, attribute: str | None, overrides: Mapping[str, int] | None = None) -> None:
        self.attribute = attribute
        self.overrides = dict(overrides or {})

    def of(self, candidate: KernelCandidate) -> int | None:
        if candidate.name in self.overrides:
            return self.overrides[candidate.name]
        return getattr(candidate, self.attribute) if self.attribute else None


TUNE_MAX_ROWS = RowLimits("tune_max_rows")
"""Largest row count at which each candidate is timed (its ``tune_max_rows``): kernels whose time grows linearly
with rows cannot win past it, and timing them would cost more than the measurement is worth."""

SHARED_KERNELS = ("gptq_pending", "uncalibrated", "act_sim", "float_acts", "dequant_bf16", "dequant")
"""The kernels of this module, which every format has (the low-bit ones are the formats')."""

SHARED_CONV_KERNELS = ("act_sim_conv", "float_acts_conv", "im2col_linear", "dequant_conv_bf16", "dequant_conv_direct",
                       "dequant_conv_im2col", "dequant_conv_channels_last", "dequant_conv")
"""The convolution kernels every format has, run by :mod:`monoquant.conv_kernels` (named here so that :func:`pin`
knows them)."""

ACTIVATION_KERNELS = ("gptq_pending", "uncalibrated", "w8a8_int_mm", "w8a8_onednn", "w8a8_vnni", "w8a8_fused",
                      "w8a8_sim", "act_sim", "float_acts")
"""Kernels for layers that wait for GPTQ or quantize their inputs (the second table; the ``w8a8_*`` rows are
Int8's INT8-input candidates)."""

FLOAT_WEIGHT_CACHE_BYTES = 1 << 18
"""A layer under the tuning threshold (fewer than ``tuner.TUNE_MIN_WEIGHTS`` weights, 256 x 256) whose
dequantized weight, in its float dtype, takes at most this many bytes (256 KiB; a 3x3 conv of 64 -> 64 channels
takes 144 KiB, 128 -> 128 channels 576 KiB; a 128 -> 10 Linear 5 KiB) keeps it once its float path first runs,
instead of dequantizing it on every call (:func:`kept_float_weight`). Small layers are where the fixed cost of a
call decides: at batch 1, dequantizing a conv's 18k-weight kernel each call (about 15 us, most of it fixed cost)
made the layer up to 1.7x the float conv's time, and the packed kernels of a 128 -> 10 Linear took 12-40 us where
``F.linear`` takes 5 us (AMD EPYC Zen 4). A weight that small is a few hundred KiB at most per layer, while the
layers whose weights matter for memory stay dequantized per call. The kept bytes are counted in the layer's
``storage_bytes()`` (the memory report), whether built yet or not (:func:`kept_float_bytes`). With the kept
weight, the float path of a small Linear is ``F.linear`` itself, the baseline its measured choice must beat
(:func:`select_kernel`)."""

DEQUANT_CHUNK_ELEMENTS = 1 << 22
"""Weights dequantized at a time (4M: 8 MiB of reused bf16 scratch per thread; 1M and 16M measured slower
at 2048 rows, 256K slower everywhere)."""


def reload_environment() -> None:
    """Read ``MONOQUANT_KERNEL`` and ``MONOQUANT_TUNE`` again (read once at import, see
    :func:`monoquant.tuner.reload_environment`)."""
    tuner.reload_environment()


def kept_float_bytes(module) -> int:
    """Bytes of the dequantized float weight ``module`` keeps: a layer with fewer than ``tuner.TUNE_MIN_WEIGHTS``
    weights whose float weight takes at most :data:`FLOAT_WEIGHT_CACHE_BYTES`; 0 for every other layer."""
    n, k = module.quant_weight.shape2d
    nbytes = n * k * (module.compute_dtype or module.float_dtype).itemsize
    return nbytes if n * k < tuner.TUNE_MIN_WEIGHTS and nbytes <= FLOAT_WEIGHT_CACHE_BYTES else 0


def kept_float_weight(module, dtype: torch.dtype) -> torch.Tensor | None:
    """The dequantized weight in the layer's stored layout (``module.weight_shape``: ``[N, K]``, a conv's
    ``[out, in/groups, *kernel]``) in ``dtype`` that ``module`` keeps, built at first use; ``None`` where it keeps
    none (another dtype than its float dtype, a GPTQ weight still pending, or over
    :data:`FLOAT_WEIGHT_CACHE_BYTES`). It lives in ``quant_weight.cache``, so anything that changes the stored
    weight (``load_state_dict``, ``set_stored``, ``.to()``) drops it.

    Under ``torch.inference_mode`` it is an inference tensor: ops there ran 3% faster on inference tensors than on
    normal ones (the digits CNN's five float ops at batch 1, 106 vs 109 us, AMD EPYC Zen 4), so a float model
    built under inference mode had that edge. Elsewhere it is a normal tensor, which autograd may save (an
    inference tensor cannot be): each is replaced by the other where the mode calls for it, one copy at a time."""
    w: QuantWeight = module.quant_weight
    kept = w.cache.get("float_weight")
    if kept is not None and kept.dtype == dtype:
        if kept.is_inference() == torch.is_inference_mode_enabled():
            return kept
        if not torch.is_grad_enabled() and kept.is_inference():  # no_grad: an inference tensor is fine there
            return kept
        kept = w.cache["float_weight"] = in_this_mode(kept.clone)
        return kept
    if module.gptq is not None or dtype != (module.compute_dtype or module.float_dtype):
        return None
    if not kept_float_bytes(module):
        return None
    kept = w.cache["float_weight"] = in_this_mode(lambda: w.dequantize_rows(dtype).view(module.weight_shape))
    return kept


def in_this_mode(make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``make()`` without autograd: an inference tensor under ``torch.inference_mode``, else a normal one."""
    if torch.is_inference_mode_enabled():
        return make()
    with torch.no_grad():
        return make()


def torch_ops_present() -> dict[str, bool]:
    """Which of the torch ops behind the packed and integer kernels this torch build has (for ``monoquant doctor``)."""
    return dict(hardware.HAS)


def static_row_limits() -> RowLimits:
    """The static table's row limits: each candidate's ``max_rows``."""
    return RowLimits("max_rows")


def kernel_names() -> tuple[str, ...]:
    """Every kernel name known now: the shared ones and those of every registered format (formats that cannot be
    built with their defaults contribute nothing)."""
    names: dict[str, None] = dict.fromkeys((*SHARED_KERNELS, *SHARED_CONV_KERNELS))
    for cls in FORMATS.values():
        try:
            fmt = cls()
        except (TypeError, ConfigError):  # a format with required arguments lists its kernels once built
            continue
        for c in (*fmt.kernel_candidates(), *fmt.conv_kernel_candidates()):
            names[c.name] = None
    return tuple(names)


def __getattr__(name: str):
    if name == "KERNELS":  # computed, so a format registered later brings its kernels
        return kernel_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- choosing ---------------------------------------------------------------------------------------------
def _query(module, device: torch.device, rows: int, needs_grad: bool,
           dtype: torch.dtype | None = None) -> KernelQuery:
    w: QuantWeight = module.quant_weight
    n, k = w.shape2d
    return KernelQuery(n, k, w.group_size, device, rows, module.compute_dtype, needs_grad, dtype)


def _candidate(module, name: str) -> KernelCandidate | None:
    return next((c for c in module.quant_weight.candidates() if c.name == name), None)


def _activation_candidates(module, device: torch.device, rows: int, needs_grad: bool) -> list[str] | None:
    """Eligible rows of the second table, preferred first; ``None`` for weight-only layers."""
    if getattr(module, "gptq", None) is not None:
        return ["gptq_pending"]
    act = getattr(module, "input_quantizer", None)
    if act is None:
        return None
    if not act.ready:
        return None if act.calibrating else ["uncalibrated"]
    w = module.quant_weight
    q = _query(module, device, rows, needs_grad)
    eligible = [c for c in w.candidates() if c.int8_inputs and c.eligible(w, q)]
    primary = [c.name for c in eligible if not c.fallback]
    return [*(primary or [c.name for c in eligible]), "act_sim"]


def _weight_candidates(module, device: torch.device, rows: int, needs_grad: bool,
                       row_limits: RowLimits | Mapping[str, int], dtype: torch.dtype | None = None) -> list[str]:
    """Eligible weight-only kernels: the format's candidates in its order, then the shared ``dequant_bf16`` and
    ``dequant`` (the baseline, always last).

    ``row_limits`` is :func:`static_row_limits` for the static table, :data:`TUNE_MAX_ROWS` for timing, and an
    empty mapping for a pin (any row count); a plain mapping (kernel name -> rows) overrides by name. ``dtype``:
    the input's dtype where known (candidates for bf16 inputs ask it)."""
    limits = row_limits if isinstance(row_limits, RowLimits) else RowLimits(None, row_limits)
    w = module.quant_weight
    q = _query(module, device, rows, needs_grad, dtype)
    cands: list[str] = []
    for c in w.candidates():
        limit = limits.of(c)
        if not c.int8_inputs and (limit is None or rows <= limit) and c.eligible(w, q):
            cands.append(c.name)
    if (module.compute_dtype != torch.float32 and device.type == "cpu" and cpu_has_fast_bf16()
            and module.compute_dtype in (None, torch.bfloat16)):
        cands.append("dequant_bf16")
    cands.append("dequant")
    return cands


def _pinned_kernel(module, device: torch.device, rows: int, needs_grad: bool, weights_only: bool,
                   dtype: torch.dtype | None = None) -> str | None:
    """The pinned kernel if it is eligible here at any row count; with INT8 activations and a pinned weight
    kernel, ``act_sim`` (the float path around it, which honours the pin inside); else ``None``."""
    pin_name = tuner.pinned()
    if pin_name is None:
        return None
    special = None if weights_only else _activation_candidates(module, device, rows, needs_grad)
    if special is not None:
        if pin_name in special or (pin_name == "float_acts" and "act_sim" in special):
            return pin_name
        return "act_sim" if "act_sim" in special and pin_name not in ACTIVATION_KERNELS else None
    return pin_name if pin_name in _weight_candidates(module, device, rows, needs_grad, {}, dtype) else None


def choose_linear_kernel(module, device: torch.device, rows: int, needs_grad: bool, *,
                         weights_only: bool = False, dtype: torch.dtype | None = None) -> str:
    """Name of the kernel the *static* table above picks for ``module`` on ``device`` for ``rows`` input rows
    (a pinned kernel where it is eligible). :func:`select_kernel` is what ``forward`` uses.

    ``weights_only=True`` ignores input quantization (the row an ``act_sim`` layer runs after fake-quantizing).
    """
    pinned = _pinned_kernel(module, device, rows, needs_grad, weights_only, dtype)
    if pinned is not None:
        return pinned
    special = None if weights_only else _activation_candidates(module, device, rows, needs_grad)
    return (special or _weight_candidates(module, device, rows, needs_grad, static_row_limits(), dtype))[0]


def _untimed(module, name: str) -> bool:
    """Rows that run without timing when they come first: the states before freeze, and fallbacks."""
    if name in ("gptq_pending", "uncalibrated"):
        return True
    c = _candidate(module, name)
    return c is not None and c.fallback


def select_kernel(module, x: torch.Tensor, *, weights_only: bool = False) -> str:
    """The kernel ``forward`` runs for input ``x``: pinned, else measured (:mod:`monoquant.tuner`), else static.

    A measured choice is remembered by the tuner per situation, and in the layer's ``quant_weight`` cache
    (dropped with the other derived state) so that later calls cost one dictionary lookup. Measured: layers of
    at least ``tuner.TUNE_MIN_WEIGHTS`` weights, and smaller ones that keep their float weight
    (:func:`kept_float_weight`), whose baseline is then ``F.linear`` itself. With INT8 activations the baseline
    is ``float_acts``, the weight-only choice on the input as it came (not quantized): a layer whose INT8
    execution measures slower than that runs its dequantized weights on float activations, and says so
    (``float_acts`` in ``kernels_run`` and the report's kernel column)."""
    return _select(module, x, weights_only)[0]


def _select(module, x: torch.Tensor, weights_only: bool) -> tuple[str, bool]:
    """:func:`select_kernel`'s choice, and whether it was measured (remembered for this layer and row bucket)."""
    rows = x.numel() // max(1, x.shape[-1])
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    w: QuantWeight = module.quant_weight
    n, k = w.shape2d
    if (tuner.pinned() is not None or needs_grad or rows == 0 or not tuner.tuning_enabled()
            or (n * k < tuner.TUNE_MIN_WEIGHTS and not kept_float_bytes(module))):
        return choose_linear_kernel(module, x.device, rows, needs_grad, weights_only=weights_only,
                                    dtype=x.dtype), False
    special = None if weights_only else _activation_candidates(module, x.device, rows, needs_grad)
    bucket = tuner.row_bucket(rows)
    memo = ("tuned", None if special is None else tuple(special), x.device, bucket, x.dtype)
    choice = w.cache.get(memo)
    if choice is not None:
        return choice, True
    if special is not None and special[-1] == "act_sim":
        # the baseline: the float layer itself. act_sim is not offered: it is float_acts plus the input's fake
        # quantization, in front of the same weight-only choice (same shape, same dtype), so never faster
        special = [*special[:-1], "float_acts"]
    cands = special or _weight_candidates(module, x.device, rows, needs_grad, TUNE_MAX_ROWS, x.dtype)
    if cands == ["float_acts"]:  # no INT8 kernel but act_sim, which never wins: decided without timing
        w.cache[memo] = "float_acts"
        return "float_acts", True
    if len(cands) == 1 or _untimed(module, cands[0]):
        return cands[0], False
    key = "|".join((w.format.describe(w.group_size), "act" if special else "w", x.device.type, f"{n}x{k}",
                    f"r{bucket}", str(x.dtype).removeprefix("torch."),
                    str(module.compute_dtype).removeprefix("torch.")))
    calls = {name: functools.partial(_LINEAR[name], module, x) for name in cands}
    choice = w.cache[memo] = tuner.choose(key, calls, baseline=cands[-1])
    _drop_unused_layouts(module)
    return choice, True


def _drop_unused_layouts(module) -> None:
    """Free the repacked weights of kernels that were timed but run nowhere on this layer: timing builds every
    candidate's layout (up to a copy of the weight each), and only the winners' should stay resident. A kernel
    chosen later for another row count rebuilds its layout once."""
    w: QuantWeight = module.quant_weight
    cache = w.cache
    used = {choice for key, choice in cache.items() if isinstance(key, tuple) and key[:1] == ("tuned",)}
    for c in w.candidates():
        if c.name not in used:
            for key in c.layouts:
                cache.pop(key, None)


@contextlib.contextmanager
def pin(name: str | None):
    """Run kernel ``name`` (one of :func:`kernel_names`) wherever it is eligible inside the ``with`` block;
    ``pin("dequant")`` is the plain float path everywhere. Same as ``MONOQUANT_KERNEL=name``."""
    if name is not None and name not in kernel_names():
        raise ConfigError(f"unknown kernel {name!r} for mq.kernels.pin; choose one of {', '.join(kernel_names())}")
    with tuner.pin(name):
        yield


def tuning(enabled: bool):
    """``with mq.kernels.tuning(False):`` uses the deterministic static table (same as ``MONOQUANT_TUNE=0``)."""
    return tuner.tuning(enabled)


def kernels_run(module) -> dict[int, str]:
    """Row bucket (:func:`monoquant.tuner.row_bucket`) -> the kernel ``forward`` last ran for inputs of that many
    rows on ``module`` (measured, pinned or static, whichever decided); empty before any forward."""
    return module.quant_weight.ran


def buckets_summary(runs: dict[int, str], prefix: str) -> str:
    """``{bucket: kernel}`` as the report shows it: neighbouring buckets that ran the same kernel merged, each span
    named by its first and last bucket after ``prefix`` (``"r1-8 fused_cpu, r2048 dequant_bf16"``)."""
    spans: list[list] = []  # [first bucket, last bucket, kernel]
    for bucket in sorted(runs):
        if spans and spans[-1][2] == runs[bucket]:
            spans[-1][1] = bucket
        else:
            spans.append([bucket, bucket, runs[bucket]])
    return ", ".join(f"{prefix}{lo}{'' if lo == hi else f'-{hi}'} {name}" for lo, hi, name in spans)


def kernel_summary(module) -> str:
    """What the report shows as a layer's kernel. Once ``forward`` has run: the kernel that ran per row bucket,
    neighbouring buckets that ran the same kernel merged (``"r1-8 fused_cpu, r2048 dequant_bf16"``: up to 8 rows,
    and 1025-2048 rows). Before any forward: the static table's guess for 1 and 4096 rows, marked
    (``"int4pack_cpu/dequant_bf16 (static guess, not run yet)"``)."""
    runs = kernels_run(module)
    if runs:
        return buckets_summary(runs, "r")
    device = module.quant_weight.device
    small = choose_linear_kernel(module, device, 1, needs_grad=False)
    large = choose_linear_kernel(module, device, 4096, needs_grad=False)
    return (small if small == large else f"{small}/{large}") + " (static guess, not run yet)"


# ---- running ----------------------------------------------------------------------------------------------
def linear(module, x: torch.Tensor, *, raw_ok: bool = False) -> torch.Tensor:
    """``module``'s output for its prepared input ``x``, through the chosen kernel; output dtype equals ``x.dtype``.

    A measured choice is also remembered per exact input with the function that runs it, everything it would
    decide again on each call already decided (:mod:`monoquant.call_plans`; not while a pin, ``tuning(False)``, a
    gradient or calibration applies): a small layer's call then costs one lookup on top of its kernel.
    ``raw_ok``: ``x`` is the layer's raw input (its preparation changed nothing), so its ``forward`` may run the
    plan before preparing the next input like it."""
    run = call_plans.lookup(module, x)
    if run is not None:
        return run(module, x)
    name, measured = _select(module, x, False)
    rows = x.numel() // max(1, x.shape[-1])
    bucket = None if module.computes_in_float else tuner.row_bucket(rows)
    module.quant_weight.record_run(name, bucket)
    if measured and bucket is not None and call_plans.allowed(module, x):
        call_plans.remember(module, x, name, bucket, _runner(module, name, x), raw_ok=raw_ok)
    return run_kernel(module, name, x)


def _runner(module, name: str, x: torch.Tensor) -> Callable[..., torch.Tensor]:
    """``run(module, x)`` for kernel ``name`` on inputs like ``x``, with what each call would look up decided now:
    ``dequant`` with a kept float weight in ``x``'s dtype is ``F.linear`` with it; ``float_acts`` and ``act_sim``
    run the weight-only choice for this shape (``act_sim`` after fake-quantizing); a format's candidate is called
    directly."""
    w: QuantWeight = module.quant_weight
    if name == "dequant" and float_compute_dtype(module, x) == x.dtype:
        kept = kept_float_weight(module, x.dtype)
        bias = module.bias
        if kept is not None and (bias is None or bias.dtype == x.dtype):
            kept2d = kept.view(w.shape2d)  # a conv's kernel, for im2col patches
            return lambda m, xb: F.linear(xb, kept2d, m._buffers["bias"])  # a buffer of every layer: no __getattr__
    if name == "float_acts":
        return _runner(module, select_kernel(module, x, weights_only=True), x)
    if name == "act_sim":
        inner = _runner(module, select_kernel(module, x, weights_only=True), x)
        return lambda m, xb: inner(m, m.input_quantizer.fake_quantize(xb))
    shared = _SHARED.get(name)
    c = None if shared is not None else _candidate(module, name)
    if c is None:
        return shared or (lambda m, xb: run_kernel(m, name, xb))
    run = c.run
    bias = module.bias
    if c.bind is not None and x.dtype == torch.float32 and (bias is None or (bias.dtype == torch.float32
                                                                              and bias.is_contiguous())):
        return _bound_runner(c.bind(w), name, x, c.int8_inputs)
    if c.fuses_bias:  # a bias that needs a gradient is added outside (run_kernel), decided per call
        def run_with_bias(m, xb: torch.Tensor) -> torch.Tensor:
            bias = m._buffers["bias"]  # a buffer of every layer: no nn.Module __getattr__ per call
            if bias is not None and bias.requires_grad and torch.is_grad_enabled():
                return run_kernel(m, name, xb)
            return _shaped_like(run(w, flat(xb), bias), xb)
        return run_with_bias
    if c.int8_inputs:
        return lambda m, xb: _shaped_like(run(w, flat(xb), m.input_quantizer, m.bias), xb)
    return lambda m, xb: _finish(m, run(w, flat(xb)), xb)


def _bound_runner(call: Callable, name: str, x: torch.Tensor, int8_inputs: bool) -> Callable[..., torch.Tensor]:
    """``run(module, xb)`` for float32 inputs shaped like ``x`` through a candidate's bound call
    (:attr:`~monoquant.formats.kernel.KernelCandidate.bind`: ``call(x2d, bias)``, with INT8 inputs ``call(x2d,
    act, bias)``): the input reshaped to ``[rows, K]`` and the output back, both decided now (a plan is for one
    exact shape)."""
    rows_k = (x.numel() // x.shape[-1], x.shape[-1]) if x.dim() != 2 else None

    def run_bound(m, xb: torch.Tensor) -> torch.Tensor:
        bias = m._buffers["bias"]  # a buffer of every layer: no nn.Module __getattr__ per call
        if not int8_inputs and bias is not None and bias.requires_grad and torch.is_grad_enabled():
            return run_kernel(m, name, xb)  # the bias added outside, where autograd sees it
        x2d = (xb if xb.is_contiguous() else xb.contiguous()) if rows_k is None else xb.reshape(rows_k).contiguous()
        y = call(x2d, m._modules["input_quantizer"], bias) if int8_inputs else call(x2d, bias)
        return y if rows_k is None else y.view(*xb.shape[:-1], y.shape[-1])
    return run_bound


def run_kernel(module, name: str, x: torch.Tensor) -> torch.Tensor:
    """Run kernel ``name`` (shared, or one of the layer's format's candidates) on ``x`` ``[..., K]``."""
    shared = _SHARED.get(name)
    if shared is not None:
        return shared(module, x)
    c = _candidate(module, name)
    if c is None:
        raise ConfigError(f"kernel {name!r} is not a candidate of {module.quant_weight.format.describe()}; "
                          f"its kernels: {', '.join((*module.quant_weight.format.kernels(), 'dequant'))}")
    if c.int8_inputs:
        return _shaped_like(c.run(module.quant_weight, flat(x), module.input_quantizer, module.bias), x)
    bias = module.bias
    if c.fuses_bias and (bias is None or not (bias.requires_grad and torch.is_grad_enabled())):
        return _shaped_like(c.run(module.quant_weight, flat(x), bias), x)
    return _finish(module, c.run(module.quant_weight, flat(x), None) if c.fuses_bias else
                   c.run(module.quant_weight, flat(x)), x)


class _ByName(Mapping):
    """``_LINEAR[name](module, x)``: any kernel by name, as a function called ``_<name>`` (what the tuner times,
    and what tests recognise a timed call by)."""

    def __init__(self) -> None:
        self._calls: dict[str, Callable] = {}

    def __getitem__(self, name: str) -> Callable:
        call = self._calls.get(name)
        if call is None:
            call = self._calls[name] = _named(name)
        return call

    def __iter__(self):
        return iter(kernel_names())

    def __len__(self) -> int:
        return len(kernel_names())


def _named(name: str) -> Callable:
    def call(module, x: torch.Tensor) -> torch.Tensor:
        return run_kernel(module, name, x)

    call.__name__ = call.__qualname__ = f"_{name}"
    return call


_LINEAR = _ByName()


def _finish(module, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Add the bias to a kernel's fresh ``[rows, N]`` output (in place unless autograd needs it) and shape it."""
    bias = module.bias
    if bias is not None:
        if bias.dtype != y.dtype:
            bias = bias.to(y.dtype)
        y = torch.add(y, bias) if y.requires_grad else y.add_(bias)
    return _shaped_like(y, x)


def _shaped_like(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A kernel's ``[rows, N]`` output in input ``x``'s dtype and leading dims (casts and reshapes that would do
    nothing are skipped: each is a dispatch on a small layer's call)."""
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


class _Scratch(threading.local):
    """Per-thread reusable buffers for the chunked dequantize (fresh large allocations page-fault on every
    call, which measured slower than the dequantize itself)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (name, dtype, device)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            with torch.inference_mode(False):
                buf = self.buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]


_SCRATCH = _Scratch()


def scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """This thread's reusable buffer ``name`` of at least ``numel`` elements, as a flat view of ``numel``: for a
    dequantized weight that lives for one call (a fresh large allocation page-faults every time). Its contents
    are overwritten by the next call that asks for it."""
    return _SCRATCH.get(name, numel, dtype, device)


def dequant_chunk_rows(k: int) -> int:
    """Output rows dequantized at a time for rows of length ``k`` (``DEQUANT_CHUNK_ELEMENTS`` weights)."""
    return max(16, DEQUANT_CHUNK_ELEMENTS // max(1, k))


def _dequant_chunked(module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize a chunk of output rows at a time into a reused buffer and multiply; memory stays O(chunk).

    With an input that needs a gradient the differentiable ``F.linear`` is used on fresh chunks instead.
    """
    w: QuantWeight = module.quant_weight
    n, k = w.shape2d
    xf = flat(x).to(dtype)
    chunk = min(n, dequant_chunk_rows(k))
    if torch.is_grad_enabled() and xf.requires_grad:
        outs = [F.linear(xf, w.dequantize_rows(dtype, slice(r, r + chunk))) for r in range(0, n, chunk)]
        return _finish(module, torch.cat(outs, dim=-1), x)
    wbuf = _SCRATCH.get("weight", chunk * k, dtype, xf.device).view(chunk, k)
    codes = _SCRATCH.get("codes", 2 * chunk * (k + 1), torch.uint8, xf.device)
    # INT8 scales are per output row: in half precision, scale the (rows x N) output instead of the (N x K)
    # weight when it is smaller, saving a slow half-precision pass (integers up to 255 are exact in bf16/fp16)
    out_scale = _output_scale(w, dtype) if xf.shape[0] < k else None
    scaled = out_scale is None

    def deq(r: int) -> torch.Tensor:
        return w.dequantize_into(wbuf[: min(chunk, n - r)], r, codes, scaled=scaled)

    if chunk == n and scaled:  # one chunk: a single addmm with the bias fused
        bias = None if module.bias is None else module.bias.to(dtype)
        y = F.linear(xf, deq(0), bias)
        return y.to(x.dtype).reshape(*x.shape[:-1], n)
    rows = xf.shape[0]
    if rows <= 256:  # few rows: write y transposed, so that each chunk's output is contiguous
        y_t = torch.empty(n, rows, dtype=dtype, device=xf.device)
        for r in range(0, n, chunk):
            wr = deq(r)
            torch.mm(wr, xf.t(), out=y_t[r:r + wr.shape[0]])
        if out_scale is not None:
            y_t.mul_(out_scale)
        return _finish(module, y_t.t().contiguous(), x)
    y = torch.empty(rows, n, dtype=dtype, device=xf.device)  # many rows: x @ w.T is the faster GEMM shape
    for r in range(0, n, chunk):
        wr = deq(r)
        y[:, r:r + wr.shape[0]] = F.linear(xf, wr)
    if out_scale is not None:
        y.mul_(out_scale.reshape(-1) if out_scale.dim() else out_scale)
    return _finish(module, y, x)


def _output_scale(w: QuantWeight, dtype: torch.dtype) -> torch.Tensor | None:
    """The format's per-row scale (``[N, 1]`` or scalar) in ``dtype`` when it is cheaper to apply it to the
    output (half precision), else ``None``."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    return w.output_scale(dtype)


def _dequant_bf16(module, x: torch.Tensor) -> torch.Tensor:
    return _dequant_chunked(module, x, torch.bfloat16)


def float_compute_dtype(module, x: torch.Tensor) -> torch.dtype:
    """The float dtype a dequantize path computes ``module`` in: its ``compute_dtype``, else the input's when that
    is a float dtype, else float32 (e.g. integer inputs)."""
    dtype = module.compute_dtype or x.dtype
    return dtype if dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16) else torch.float32


def _dequant(module, x: torch.Tensor) -> torch.Tensor:
    dtype = float_compute_dtype(module, x)
    kept = kept_float_weight(module, dtype)
    if kept is None:
        return _dequant_chunked(module, x, dtype)
    bias = module.bias
    y = F.linear(x if x.dtype == dtype else x.to(dtype), kept.view(module.quant_weight.shape2d),
                 None if bias is None else bias if bias.dtype == dtype else bias.to(dtype))
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _gptq_pending(module, x: torch.Tensor) -> torch.Tensor:
    w = module.gptq.weight
    dtype = module.compute_dtype or x.dtype
    y = F.linear(flat(x).to(dtype), w.reshape(w.shape[0], -1).to(dtype))
    return _finish(module, y, x)


def _uncalibrated(module, x: torch.Tensor) -> torch.Tensor:
    module.input_quantizer.check_ready()  # raises CalibrationError naming the layer
    return _dequant(module, x)


def _act_sim(module, x: torch.Tensor) -> torch.Tensor:
    xq = module.input_quantizer.fake_quantize(x)
    return run_kernel(module, select_kernel(module, xq, weights_only=True), xq)


def _float_acts(module, x: torch.Tensor) -> torch.Tensor:
    """A layer with INT8 activations run on its float input: the weight-only choice, no input quantization (the
    baseline its INT8 kernels are measured against; runs where none of them is faster)."""
    return run_kernel(module, select_kernel(module, x, weights_only=True), x)


_SHARED: dict[str, Callable] = {
    "gptq_pending": _gptq_pending,
    "uncalibrated": _uncalibrated,
    "act_sim": _act_sim,
    "float_acts": _float_acts,
    "dequant_bf16": _dequant_bf16,
    "dequant": _dequant,
}
