"""What this machine and this torch build can run: the CPU-feature and op-presence checks that kernel candidates
(:mod:`monoquant.formats` registers them, :mod:`monoquant.kernels` dispatches) base their eligibility on.

One place, so a format's kernel and the dispatcher read the same answers (tests patch :data:`HAS`)."""

from __future__ import annotations

import functools

import torch

HAS = {
    "int4pack_cpu": hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"),
    "int4pack_cuda": hasattr(torch.ops.aten, "_weight_int4pack_mm"),
    "int8pack": hasattr(torch.ops.aten, "_weight_int8pack_mm"),
    "int_mm": hasattr(torch, "_int_mm"),
    "onednn_qlinear": hasattr(torch.ops.onednn, "qlinear_pointwise") and hasattr(torch.ops.onednn, "qlinear_prepack"),
}
"""Which optional ops this torch build has (read at call time, so tests may change an entry)."""


def _torch_cpu(check: str) -> bool:
    """``torch.cpu.<check>()`` (e.g. ``_is_vnni_supported``), False where this torch has no such check."""
    return bool(getattr(torch.cpu, check, lambda: False)())


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when this CPU runs bf16 GEMMs natively (AMX or AVX512-BF16), so bf16 beats float32."""
    return any(map(_torch_cpu, ("_is_amx_tile_supported", "_is_avx512_bf16_supported")))


@functools.cache
def cpu_has_avx512_bf16() -> bool:
    """True when this CPU has the AVX512-BF16 dot-product instruction (``vdpbf16ps``), which the compiled
    ``fused_bf16`` kernels use (AMX CPUs have it too)."""
    return _torch_cpu("_is_avx512_bf16_supported")


@functools.cache
def cpu_has_int_dot() -> bool:
    """True when this CPU has integer dot-product instructions (AVX512-VNNI / AVX-VNNI or AMX), without which
    ``torch._int_mm`` on CPU is a slow reference loop (measured 100x slower than float32 on AVX2)."""
    return any(map(_torch_cpu, ("_is_vnni_supported", "_is_avx512_vnni_supported", "_is_amx_tile_supported")))


@functools.cache
def cpu_has_amx() -> bool:
    """True when this CPU has AMX tiles (which oneDNN's int8 matmul primitive needs to be fast, see
    ``formats/int8.py``)."""
    return _torch_cpu("_is_amx_tile_supported")


@functools.cache
def cpu_has_avx512_vnni() -> bool:
    """True when this CPU has AVX512-VNNI (``vpdpbusd`` on 512-bit vectors), which the compiled ``w8a8_vnni``
    kernel needs (torch's ``_is_vnni_supported`` reads cpuinfo's AVX512-VNNI flag)."""
    return all(map(_torch_cpu, ("_is_avx512_supported", "_is_vnni_supported")))


@functools.cache
def cuda_supports_int4pack(device: torch.device) -> bool:
    """The CUDA ``_weight_int4pack_mm`` kernel uses bf16 tensor-core MMA, available from compute capability 8.0."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def int_mm_shape_ok(device: torch.device, rows: int, n: int, k: int) -> bool:
    """Whether ``torch._int_mm`` accepts ``[rows, k] x [k, n]`` on ``device`` (CPU: any; CUDA: rows > 16 and
    ``n``, ``k`` multiples of 8)."""
    if device.type == "cpu":
        return True
    return device.type == "cuda" and rows > 16 and n % 8 == 0 and k % 8 == 0
