"""Picks the fastest correct matmul for a quantized layer, and runs it.

The table (first matching row wins; "rows" is the number of input rows, ``x.numel() // in_features``). A
low-bit kernel is only a candidate for layers whose weight format lists it in ``spec.kernels()`` (INT4:
``int4pack_*``, ``fused_cpu``; symmetric INT8: ``int8pack_cpu``, ``fused_cpu``, ``w8a8_*``; affine INT8:
``fused_cpu``; NF4 and half formats: none), so a new format never runs a kernel written for another layout:

=================  =====================================================================  ==============
kernel             applies when                                                           computes in
=================  =====================================================================  ==============
``int4pack_cuda``  Int4, CUDA >= sm80, group in 32..256, N % 8 == 0, K % 128 == 0         bf16
``int4pack_cpu``   Int4, CPU, group in 32..256, N % 16 == 0, K % group == 0,               bf16
                   rows <= ``PACKED_MAX_ROWS["int4"]`` (48)
``int8pack_cpu``   Int8 symmetric, CPU, K % 16 == 0, rows <= ``PACKED_MAX_ROWS["int8"]``   bf16
                   (12); the op crashes the process for other K (torch 2.13)
``fused_cpu``      Int4 / Int8, CPU, compiled kernel available (:mod:`monoquant.fused`),     float32
                   no compute_dtype forced, rows <= ``FUSED_MAX_ROWS`` (8)
``dequant_bf16``   CPU with fast bf16 GEMMs (AMX / AVX512-BF16), compute_dtype None/bf16   bf16
``dequant``        everything else: dequantize, then ``F.linear``                         compute_dtype,
                                                                                          else input dtype
=================  =====================================================================  ==============

Layers that quantize their inputs (``input_quantizer``, see :mod:`monoquant.nn.activation`) or wait for GPTQ
go through these rows first:

=================  =====================================================================  ==============
kernel             applies when                                                           computes in
=================  =====================================================================  ==============
``gptq_pending``   ``method="gptq"`` before :func:`monoquant.freeze`: the float weight    input dtype
``uncalibrated``   static activations not frozen, outside ``mq.calibrate``: raises         -
``w8a8_int_mm``    Int8 symmetric weights, INT8 activations ready (frozen or dynamic),    int32, then one
                   ``torch._int_mm`` present, CPU with integer dot products (VNNI or AMX,  float32 rescale
                   :func:`cpu_has_int_dot`; elsewhere it is a slow reference loop) or CUDA
                   (rows > 16, N % 8 == 0, K % 8 == 0), input needs no gradient
``w8a8_fused``     same layers on CPU, compiled kernel built (:mod:`monoquant.fused`),     int32, then the
                   K <= 2**17: codes widened to int16 pairs, ``vpmaddwd`` (AVX2: twice    same rescale
                   float32's multiply-adds per instruction); the weight is repacked once
                   (cached, same bytes); bit-identical to ``w8a8_int_mm``
``w8a8_sim``       same layers when this torch has no ``torch._int_mm``: the same integer  float64, then
                   products in float64 (exact), bit-identical to ``w8a8_int_mm``          the same rescale
``act_sim``        every other layer with INT8 activations (INT4, affine INT8, half, and   as the weight
                   W8A8 where ``_int_mm`` is not eligible or loses): quantize-dequantize   kernel
                   the input, then the weight-only rows above (same function, float math)
=================  =====================================================================  ==============

While ``mq.calibrate`` runs, layers whose activations are not frozen yet use the weight-only rows with the
float input (the observers see float activations, as they will at freeze time).

Packed kernels are skipped when a ``compute_dtype`` other than bf16 is forced (float32 or float16 run the
``dequant`` row in that dtype; ``fused_cpu`` is skipped when any ``compute_dtype`` is forced), when the
input needs a gradient (only the dequantize paths are differentiable w.r.t. the input), and when the op is
missing from this torch build (``fused_cpu``: when the C++ file cannot be compiled here). Measured on a 2-core
AVX512 + AMX CPU (``benchmarks/bench_linear.py``): the packed kernels are ~2.5-3x faster than float32 at
1 row but grow linearly with rows and lose to a dequantize + bf16 GEMM beyond 24-48 rows, hence
``PACKED_MAX_ROWS``. The dequantize is done in chunks of output rows into per-thread buffers that are
reused across calls (fresh large allocations page-fault every time), so its scratch memory stays small
(``DEQUANT_CHUNK_ELEMENTS``) however large the layer.

**Measured choice.** The table above is the *static* choice: what runs with tuning off
(``MONOQUANT_TUNE=0``, :func:`tuning`), for layers under ``tuner.TUNE_MIN_WEIGHTS`` weights and for inputs
that need a gradient. Otherwise :func:`select_kernel` times every eligible kernel once per (scheme,
device, shape, row bucket) on the real input -- without the static row limits, up to ``TUNE_MAX_ROWS`` --
and keeps the fastest, the plain ``dequant`` (or, with INT8 activations, ``act_sim``) baseline winning
ties; see :mod:`monoquant.tuner` for pinning (``MONOQUANT_KERNEL``, :func:`pin`) and the cache file.

Kernel-specific weight layouts are derived from the stored (canonical) buffers at first use and cached
on the module (``module._kernel_cache``), never stored in ``state_dict``. Timing builds every candidate's
layout; afterwards only the layouts of kernels the layer runs stay cached (:data:`KERNEL_LAYOUTS`).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import fused, tuner
from .errors import ConfigError
from .packing import unpack_int4

PACKED_MAX_ROWS = {"int4": 48, "int8": 12}
"""Largest row count sent to the packed CPU kernels, per weight kind. The packed kernels' time grows
linearly with rows while a dequantize + bf16 GEMM costs a near-constant dequantize plus a cheap GEMM.
Measured with ``bench_linear.py --crossover`` (4096x4096, AVX512 + AMX), packed vs dequantize ms:
INT8 at 24 / 32 rows 4.8 vs 5.7 / 6.3 vs 5.6 on 2 threads, 9.6 vs 10.1 / 13.0 vs 10.6 on 1 thread;
INT4 at 48 / 64 rows 9.2 vs 11.6 / 12.3 vs 12.1 on 2 threads, 18.8 vs 17.6 / 25.2 vs 17.0 on 1 thread.
Both sides scale with the layer's size, so the crossing row count does not depend on it."""

FUSED_MAX_ROWS = 8
"""Largest row count the static table sends to the compiled ``fused_cpu`` kernel (it re-reads the weight
once per 8 input rows, so its cost grows with rows like the packed kernels')."""

TUNE_MAX_ROWS = {"fused_cpu": 64, "int4pack_cpu": 256, "int8pack_cpu": 256}
"""Largest row count at which these kernels are timed as candidates: their time grows linearly with rows,
so past this they cannot win and timing them would cost more than the measurement is worth."""

ACTIVATION_KERNELS = ("gptq_pending", "uncalibrated", "w8a8_int_mm", "w8a8_fused", "w8a8_sim", "act_sim")
"""Kernels for layers that wait for GPTQ or quantize their inputs (the second table)."""

DEQUANT_CHUNK_ELEMENTS = 1 << 22
"""Weights dequantized at a time (4M: 8 MiB of reused bf16 scratch per thread; 1M and 16M measured slower
at 2048 rows, 256K slower everywhere)."""

_HAS = {
    "int4pack_cpu": hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"),
    "int4pack_cuda": hasattr(torch.ops.aten, "_weight_int4pack_mm"),
    "int8pack": hasattr(torch.ops.aten, "_weight_int8pack_mm"),
    "int_mm": hasattr(torch, "_int_mm"),
}


def torch_ops_present() -> dict[str, bool]:
    """Which of the torch ops behind the packed and integer kernels this torch build has (for ``monoquant doctor``)."""
    return dict(_HAS)


CUDA_INNER_K_TILES = 8
"""``innerKTiles`` of the CUDA int4pack layout (2, 4 or 8 are valid; 8 is what torchao uses; K must be a multiple
of ``16 * innerKTiles``). The CPU op ignores the argument (its layout does not tile K), so 1 is passed there."""


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when this CPU runs bf16 GEMMs natively (AMX or AVX512-BF16), so bf16 beats float32."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


@functools.cache
def cpu_has_int_dot() -> bool:
    """True when this CPU has integer dot-product instructions (AVX512-VNNI / AVX-VNNI or AMX), without which
    ``torch._int_mm`` on CPU is a slow reference loop (measured 100x slower than float32 on AVX2)."""
    checks = ("_is_vnni_supported", "_is_avx512_vnni_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


@functools.cache
def cuda_supports_int4pack(device: torch.device) -> bool:
    """The CUDA ``_weight_int4pack_mm`` kernel uses bf16 tensor-core MMA, available from compute capability 8.0."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def int_mm_shape_ok(device: torch.device, rows: int, n: int, k: int) -> bool:
    """Whether ``torch._int_mm`` accepts ``[rows, k] x [k, n]`` on ``device`` (CPU: any; CUDA: see table)."""
    if device.type == "cpu":
        return True
    return device.type == "cuda" and rows > 16 and n % 8 == 0 and k % 8 == 0


def _int_mm_ok(module, device: torch.device, rows: int, needs_grad: bool) -> bool:
    n, k = module.weight2d_shape
    fast_here = device.type == "cuda" or cpu_has_int_dot()
    return _HAS["int_mm"] and not needs_grad and fast_here and int_mm_shape_ok(device, rows, n, k)


def _activation_candidates(module, device: torch.device, rows: int, needs_grad: bool) -> list[str] | None:
    """Eligible rows of the second table, preferred first; ``None`` for weight-only layers."""
    if getattr(module, "gptq", None) is not None:
        return ["gptq_pending"]
    act = getattr(module, "input_quantizer", None)
    if act is None:
        return None
    if not act.ready:
        return None if act.calibrating else ["uncalibrated"]
    spec = module.spec
    if "w8a8_int_mm" in spec.kernels() and not needs_grad:
        cands = ["w8a8_int_mm"] if _int_mm_ok(module, device, rows, needs_grad) else []
        if _w8a8_fused_ok(module, device):
            cands.append("w8a8_fused")
        if cands:
            return [*cands, "act_sim"]
        if not _HAS["int_mm"]:
            return ["w8a8_sim", "act_sim"]
    return ["act_sim"]


def _w8a8_fused_ok(module, device: torch.device) -> bool:
    return (device.type == "cpu" and "w8a8_fused" in module.spec.kernels()
            and module.weight2d_shape[1] <= fused.W8A8_MAX_K and fused.available())


def _fused_ok(module, device: torch.device, needs_grad: bool) -> bool:
    return (device.type == "cpu" and "fused_cpu" in module.spec.kernels() and not needs_grad
            and module.compute_dtype is None and fused.available())


def static_row_limits() -> dict[str, int]:
    """The static table's row limits per kernel (read at call time, so tests and benchmarks may change them)."""
    return {"int4pack_cpu": PACKED_MAX_ROWS["int4"], "int8pack_cpu": PACKED_MAX_ROWS["int8"],
            "fused_cpu": FUSED_MAX_ROWS}


def _weight_candidates(module, device: torch.device, rows: int, needs_grad: bool,
                       row_limits: dict[str, int]) -> list[str]:
    """Eligible weight-only kernels, in the static table's order (``dequant``, the baseline, always last).

    ``row_limits`` (kernel -> largest row count) is :func:`static_row_limits` for the static table,
    ``TUNE_MAX_ROWS`` for timing, and empty for a pin (any row count)."""
    spec = module.spec
    n, k = module.weight2d_shape
    cands: list[str] = []

    def rows_ok(name: str) -> bool:
        return rows <= row_limits.get(name, rows)

    lowbit_ok = module.compute_dtype in (None, torch.bfloat16) and not needs_grad  # packed kernels are bf16
    allowed = spec.kernels()  # the low-bit kernels the weight format may run in
    if lowbit_ok and "int4pack_cpu" in allowed:
        g = module.group_size
        group_ok = g in (32, 64, 128, 256) and k % g == 0
        if (device.type == "cuda" and _HAS["int4pack_cuda"] and group_ok and n % 8 == 0
                and k % (16 * CUDA_INNER_K_TILES) == 0 and cuda_supports_int4pack(device)):
            cands.append("int4pack_cuda")
        if (device.type == "cpu" and _HAS["int4pack_cpu"] and group_ok and n % 16 == 0
                and rows_ok("int4pack_cpu")):
            cands.append("int4pack_cpu")
    if (lowbit_ok and "int8pack_cpu" in allowed and device.type == "cpu"
            and _HAS["int8pack"] and k % 16 == 0 and rows_ok("int8pack_cpu")):
        cands.append("int8pack_cpu")
    if rows_ok("fused_cpu") and _fused_ok(module, device, needs_grad):
        cands.append("fused_cpu")
    if (module.compute_dtype != torch.float32 and device.type == "cpu" and cpu_has_fast_bf16()
            and module.compute_dtype in (None, torch.bfloat16)):
        cands.append("dequant_bf16")
    cands.append("dequant")
    return cands


def _pinned_kernel(module, device: torch.device, rows: int, needs_grad: bool, weights_only: bool) -> str | None:
    """The pinned kernel if it is eligible here at any row count; with INT8 activations and a pinned weight
    kernel, ``act_sim`` (the float path around it, which honours the pin inside); else ``None``."""
    pin_name = tuner.pinned()
    if pin_name is None:
        return None
    special = None if weights_only else _activation_candidates(module, device, rows, needs_grad)
    if special is not None:
        if pin_name in special:
            return pin_name
        return "act_sim" if "act_sim" in special and pin_name not in ACTIVATION_KERNELS else None
    return pin_name if pin_name in _weight_candidates(module, device, rows, needs_grad, {}) else None


def choose_linear_kernel(module, device: torch.device, rows: int, needs_grad: bool, *,
                         weights_only: bool = False) -> str:
    """Name of the kernel the *static* table above picks for ``module`` on ``device`` for ``rows`` input rows
    (a pinned kernel where it is eligible). :func:`select_kernel` is what ``forward`` uses.

    ``weights_only=True`` ignores input quantization (the row an ``act_sim`` layer runs after fake-quantizing).
    """
    pinned = _pinned_kernel(module, device, rows, needs_grad, weights_only)
    if pinned is not None:
        return pinned
    special = None if weights_only else _activation_candidates(module, device, rows, needs_grad)
    return (special or _weight_candidates(module, device, rows, needs_grad, static_row_limits()))[0]


def select_kernel(module, x: torch.Tensor, *, weights_only: bool = False) -> str:
    """The kernel ``forward`` runs for input ``x``: pinned, else measured (:mod:`monoquant.tuner`), else static.

    A measured choice is remembered by the tuner per situation, and on the layer (``module._kernel_cache``,
    dropped with the other kernel caches) so that later calls cost one dictionary lookup."""
    rows = x.numel() // max(1, x.shape[-1])
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    n, k = module.weight2d_shape
    if (tuner.pinned() is not None or needs_grad or rows == 0 or not tuner.tuning_enabled()
            or n * k < tuner.TUNE_MIN_WEIGHTS):
        return choose_linear_kernel(module, x.device, rows, needs_grad, weights_only=weights_only)
    special = None if weights_only else _activation_candidates(module, x.device, rows, needs_grad)
    bucket = tuner.row_bucket(rows)
    memo = ("tuned", None if special is None else tuple(special), x.device, bucket, x.dtype)
    choice = module._kernel_cache.get(memo)
    if choice is not None:
        return choice
    cands = special or _weight_candidates(module, x.device, rows, needs_grad, TUNE_MAX_ROWS)
    if cands[0] in ("gptq_pending", "uncalibrated", "w8a8_sim") or len(cands) == 1:
        return cands[0]
    key = "|".join((module.scheme(), "act" if special else "w", x.device.type, f"{n}x{k}", f"r{bucket}",
                    str(x.dtype).removeprefix("torch."), str(module.compute_dtype).removeprefix("torch.")))
    calls = {name: functools.partial(_LINEAR[name], module, x) for name in cands}
    choice = module._kernel_cache[memo] = tuner.choose(key, calls, baseline=cands[-1])
    _drop_unused_layouts(module)
    return choice


KERNEL_LAYOUTS = {"int4pack_cpu": ("int4pack_cpu",), "int4pack_cuda": ("int4pack_cuda",),
                  "int8pack_cpu": ("int8pack_scales",), "w8a8_fused": ("w8a8_packed",)}
"""The ``module._kernel_cache`` entries (repacked weights) each kernel builds at its first call."""


def _drop_unused_layouts(module) -> None:
    """Free the repacked weights of kernels that were timed but run nowhere on this layer: timing builds every
    candidate's layout (up to a copy of the weight each), and only the winners' should stay resident. A kernel
    chosen later for another row count rebuilds its layout once."""
    cache = module._kernel_cache
    used = {choice for key, choice in cache.items() if isinstance(key, tuple) and key[:1] == ("tuned",)}
    for name, keys in KERNEL_LAYOUTS.items():
        if name not in used:
            for key in keys:
                cache.pop(key, None)


@contextlib.contextmanager
def pin(name: str | None):
    """Run kernel ``name`` (one of :data:`KERNELS`) wherever it is eligible inside the ``with`` block;
    ``pin("dequant")`` is the plain float path everywhere. Same as ``MONOQUANT_KERNEL=name``."""
    if name is not None and name not in KERNELS:
        raise ConfigError(f"unknown kernel {name!r} for mq.kernels.pin; choose one of {', '.join(KERNELS)}")
    with tuner.pin(name):
        yield


def tuning(enabled: bool):
    """``with mq.kernels.tuning(False):`` uses the deterministic static table (same as ``MONOQUANT_TUNE=0``)."""
    return tuner.tuning(enabled)


def kernels_run(module) -> dict[int, str]:
    """Row bucket (:func:`monoquant.tuner.row_bucket`) -> the kernel ``forward`` last ran for inputs of that many
    rows on ``module`` (measured, pinned or static, whichever decided); empty before any forward."""
    return module.__dict__.get("kernels_run", {})


def _record_run(module, x: torch.Tensor, name: str) -> None:
    act = module.input_quantizer
    if module.gptq is not None or (act is not None and not act.ready):
        return  # a calibration pass: not what the layer runs once frozen
    runs = module.__dict__.setdefault("kernels_run", {})
    runs[tuner.row_bucket(x.numel() // max(1, x.shape[-1]))] = name


def kernel_summary(module) -> str:
    """What the report shows as a layer's kernel. Once ``forward`` has run: the kernel that ran per row bucket,
    neighbouring buckets that ran the same kernel merged (``"r1-8 fused_cpu, r2048 dequant_bf16"``: up to 8 rows,
    and 1025-2048 rows). Before any forward: the static table's guess for 1 and 4096 rows, marked
    (``"int4pack_cpu/dequant_bf16 (static guess, not run yet)"``)."""
    runs = kernels_run(module)
    if runs:
        spans: list[list] = []  # [first bucket, last bucket, kernel]
        for bucket in sorted(runs):
            if spans and spans[-1][2] == runs[bucket]:
                spans[-1][1] = bucket
            else:
                spans.append([bucket, bucket, runs[bucket]])
        return ", ".join(f"r{lo}{'' if lo == hi else f'-{hi}'} {name}" for lo, hi, name in spans)
    device = module.qweight.device
    small = choose_linear_kernel(module, device, 1, needs_grad=False)
    large = choose_linear_kernel(module, device, 4096, needs_grad=False)
    return (small if small == large else f"{small}/{large}") + " (static guess, not run yet)"


def linear(module, x: torch.Tensor) -> torch.Tensor:
    """``module``'s output for input ``x``, through the chosen kernel; output dtype equals ``x.dtype``."""
    name = select_kernel(module, x)
    module.last_kernel = name
    _record_run(module, x, name)
    return _LINEAR[name](module, x)


def _cache(module, key: str, make: Callable[[], object]):
    cache = module._kernel_cache
    if key not in cache:
        with torch.inference_mode(False), torch.no_grad():
            cache[key] = make()
    return cache[key]


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _bf16_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as contiguous bf16 ``[rows, K]``, the activations the packed kernels take."""
    return _flat(x).to(torch.bfloat16).contiguous()


def _finish(module, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Add the bias to a kernel's fresh ``[rows, N]`` output (in place unless autograd needs it) and shape it."""
    if module.bias is not None:
        bias = module.bias.to(y.dtype)
        y = torch.add(y, bias) if y.requires_grad else y.add_(bias)
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def _int4_scale_and_zeros(module, dtype: torch.dtype) -> torch.Tensor:
    """``[K/g, N, 2]`` (scale, offset) with ``w = (q - 8) * scale + offset`` as the int4pack kernels want."""
    scale = module.scale.float()
    if module.zero_point is None:
        offset = torch.zeros_like(scale)
    else:
        offset = (8.0 - module.zero_point.float()) * scale
    return torch.stack((scale, offset), dim=-1).transpose(0, 1).contiguous().to(dtype)


def _int4pack_cpu(module, x: torch.Tensor) -> torch.Tensor:
    _n, k = module.weight2d_shape

    def make():
        codes = unpack_int4(module.qweight, k).to(torch.int32)
        return (torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1),
                _int4_scale_and_zeros(module, torch.bfloat16))

    packed, sz = _cache(module, "int4pack_cpu", make)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(_bf16_rows(x), packed, module.group_size, sz)
    return _finish(module, y, x)


def _int4pack_cuda(module, x: torch.Tensor) -> torch.Tensor:
    _n, k = module.weight2d_shape

    def make():
        codes = unpack_int4(module.qweight, k)
        even_high = (codes[:, 0::2] << 4) | codes[:, 1::2]  # the CUDA op wants the even column high
        return (torch.ops.aten._convert_weight_to_int4pack(even_high.contiguous(), CUDA_INNER_K_TILES),
                _int4_scale_and_zeros(module, torch.bfloat16))

    packed, sz = _cache(module, "int4pack_cuda", make)
    y = torch.ops.aten._weight_int4pack_mm(_bf16_rows(x), packed, module.group_size, sz)
    return _finish(module, y, x)


def _int8pack_cpu(module, x: torch.Tensor) -> torch.Tensor:
    n, _ = module.weight2d_shape

    def make():
        return module.scale.expand(n).to(torch.bfloat16).contiguous()

    scales = _cache(module, "int8pack_scales", make)
    y = torch.ops.aten._weight_int8pack_mm(_bf16_rows(x), module.qweight, scales)
    return _finish(module, y, x)


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


def dequant_chunk_rows(k: int) -> int:
    """Output rows dequantized at a time for rows of length ``k`` (``DEQUANT_CHUNK_ELEMENTS`` weights)."""
    return max(16, DEQUANT_CHUNK_ELEMENTS // max(1, k))


def _dequant_chunked(module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize a chunk of output rows at a time into a reused buffer and multiply; memory stays O(chunk).

    With an input that needs a gradient the differentiable ``F.linear`` is used on fresh chunks instead.
    """
    n, k = module.weight2d_shape
    xf = _flat(x).to(dtype)
    chunk = min(n, dequant_chunk_rows(k))
    if torch.is_grad_enabled() and xf.requires_grad:
        outs = [F.linear(xf, module.dequantize_weight(dtype, flat=True, rows=slice(r, r + chunk)))
                for r in range(0, n, chunk)]
        return _finish(module, torch.cat(outs, dim=-1), x)
    wbuf = _SCRATCH.get("weight", chunk * k, dtype, xf.device).view(chunk, k)
    codes = _SCRATCH.get("codes", 2 * chunk * (k + 1), torch.uint8, xf.device)
    # INT8 scales are per output row: in half precision, scale the (rows x N) output instead of the (N x K)
    # weight when it is smaller, saving a slow half-precision pass (integers up to 255 are exact in bf16/fp16)
    out_scale = _output_scale(module, dtype) if xf.shape[0] < k else None
    scaled = out_scale is None

    def deq(r: int) -> torch.Tensor:
        return module.dequantize_into(wbuf[: min(chunk, n - r)], r, codes, scaled=scaled)

    if chunk == n and scaled:  # one chunk: a single addmm with the bias fused
        bias = None if module.bias is None else module.bias.to(dtype)
        y = F.linear(xf, deq(0), bias)
        return y.to(x.dtype).reshape(*x.shape[:-1], n)
    rows = xf.shape[0]
    if rows <= 256:  # few rows: write y transposed, so that each chunk's output is contiguous
        y_t = torch.empty(n, rows, dtype=dtype, device=xf.device)
        for r in range(0, n, chunk):
            w = deq(r)
            torch.mm(w, xf.t(), out=y_t[r:r + w.shape[0]])
        if out_scale is not None:
            y_t.mul_(out_scale)
        return _finish(module, y_t.t().contiguous(), x)
    y = torch.empty(rows, n, dtype=dtype, device=xf.device)  # many rows: x @ w.T is the faster GEMM shape
    for r in range(0, n, chunk):
        w = deq(r)
        y[:, r:r + w.shape[0]] = F.linear(xf, w)
    if out_scale is not None:
        y.mul_(out_scale.reshape(-1) if out_scale.dim() else out_scale)
    return _finish(module, y, x)


def _output_scale(module, dtype: torch.dtype) -> torch.Tensor | None:
    """The format's per-row scale (``[N, 1]`` or scalar) in ``dtype`` when it is cheaper to apply it to the
    output (half precision), else ``None``."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    return module.output_scale(dtype)


def _dequant_bf16(module, x: torch.Tensor) -> torch.Tensor:
    return _dequant_chunked(module, x, torch.bfloat16)


def _dequant(module, x: torch.Tensor) -> torch.Tensor:
    dtype = module.compute_dtype or x.dtype
    if dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        dtype = torch.float32
    return _dequant_chunked(module, x, dtype)


def _fused_cpu(module, x: torch.Tensor) -> torch.Tensor:
    """The compiled kernel on the stored buffers; float32 input and accumulation (:mod:`monoquant.fused`)."""
    xf = _flat(x).to(torch.float32).contiguous()
    if module.spec.kind == "int4":  # the two stored layouts the compiled kernel reads
        y = fused.int4_linear(xf, module.qweight, module.scale, module.zero_point, module.group_size)
    else:
        y = fused.int8_linear(xf, module.qweight, module.scale, module.zero_point)
    return _finish(module, y, x)


def _gptq_pending(module, x: torch.Tensor) -> torch.Tensor:
    w = module.gptq.weight
    dtype = module.compute_dtype or x.dtype
    y = F.linear(_flat(x).to(dtype), w.reshape(w.shape[0], -1).to(dtype))
    return _finish(module, y, x)


def _uncalibrated(module, x: torch.Tensor) -> torch.Tensor:
    module.input_quantizer.check_ready()  # raises CalibrationError naming the layer
    return _dequant(module, x)


def _w8a8(module, x: torch.Tensor, backend: str) -> torch.Tensor:
    """``x W^T`` from INT8 input codes and INT8 weight codes: exact integer sum, then a float32 rescale.

    Affine input codes ``[0, 255]`` are shifted by -128 into int8 and the shift moves into the zero-point,
    whose contribution ``zero * rowsum(W_q)`` is subtracted exactly. ``backend``: ``"int_mm"``
    (``torch._int_mm``), ``"fused"`` (the compiled int16-pair GEMM, :func:`monoquant.fused.w8a8_gemm`) or
    ``"sim"`` (the same integers in float64, exact below 2**53); all three round to the same float32 values.
    """
    act = module.input_quantizer
    x2d = _flat(x)
    a, x_scale, x_zero = act.int8_codes(x2d)
    zero = None if act.qtype.symmetric else x_zero - 128
    wq = module.qweight
    if backend == "sim":
        acc = a.double() @ wq.double().t()
        if zero is not None:
            acc.addr_(zero.reshape(-1).double().expand(acc.shape[0]),
                      _cache(module, "w8a8_rowsum_f64", lambda: wq.double().sum(1)), alpha=-1)
    else:
        if backend == "int_mm":
            acc = torch._int_mm(a, wq.t())
        else:  # the compiled vpmaddwd GEMM, on the weight repacked once into its panels
            acc = fused.w8a8_gemm(a, _cache(module, "w8a8_packed", lambda: fused.w8a8_pack(wq)), wq.shape[0])
        if zero is not None:  # one in-place rank-1 update (an outer product then a subtraction was 2 passes)
            rowsum = _cache(module, "w8a8_rowsum_i32", lambda: wq.sum(1, dtype=torch.int32))
            acc.addr_(zero.reshape(-1).to(torch.int32).expand(acc.shape[0]), rowsum, alpha=-1)
    # the integer sums are exact; scale per row of x, then per output channel, then add the bias
    if acc.dtype == torch.int32 and acc.device.type == "cpu" and fused.available():  # the same, in one pass
        bias = None if module.bias is None else module.bias.float().contiguous()
        y = fused.rescale_rows(acc, x_scale.float().contiguous(), module.scale.float().contiguous(), bias)
    else:
        y = acc.to(torch.float32).mul_(x_scale.float()).mul_(module.scale.float())  # in place: no temporary
        if module.bias is not None:
            y.add_(module.bias.to(y.dtype))
    act.nan_nonfinite_rows_(y, x2d, x_scale)
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def _w8a8_int_mm(module, x: torch.Tensor) -> torch.Tensor:
    return _w8a8(module, x, "int_mm")


def _w8a8_fused(module, x: torch.Tensor) -> torch.Tensor:
    return _w8a8(module, x, "fused")


def _w8a8_sim(module, x: torch.Tensor) -> torch.Tensor:
    return _w8a8(module, x, "sim")


def _act_sim(module, x: torch.Tensor) -> torch.Tensor:
    xq = module.input_quantizer.fake_quantize(x)
    return _LINEAR[select_kernel(module, xq, weights_only=True)](module, xq)


_LINEAR: dict[str, Callable] = {
    "gptq_pending": _gptq_pending,
    "uncalibrated": _uncalibrated,
    "w8a8_int_mm": _w8a8_int_mm,
    "w8a8_fused": _w8a8_fused,
    "w8a8_sim": _w8a8_sim,
    "act_sim": _act_sim,
    "int4pack_cuda": _int4pack_cuda,
    "int4pack_cpu": _int4pack_cpu,
    "int8pack_cpu": _int8pack_cpu,
    "fused_cpu": _fused_cpu,
    "dequant_bf16": _dequant_bf16,
    "dequant": _dequant,
}
KERNELS = tuple(_LINEAR)
