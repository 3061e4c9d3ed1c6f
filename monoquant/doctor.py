"""``monoquant doctor``: what this machine offers monoquant's kernels (CPU features, which kernels can run, the
compiled kernels' build state and cache folder), as text lines. Builds nothing unless asked to."""

from __future__ import annotations

import os
import sys

import torch

from . import fused, hardware, kernels
from ._version import __version__

_CPU_CHECKS = (("AVX2", "_is_avx2_supported"), ("AVX-512", "_is_avx512_supported"),
               ("AVX512-VNNI", "_is_vnni_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"),
               ("AMX tiles", "_is_amx_tile_supported"), ("AMX fp16", "_is_amx_fp16_supported"))
"""Feature name and the ``torch.cpu`` check that answers it (checks this torch lacks are left out)."""


def cpu_features() -> list[tuple[str, bool]]:
    """``(feature, present)`` for each CPU feature the kernels care about, as torch sees it."""
    return [(name, bool(getattr(torch.cpu, check)())) for name, check in _CPU_CHECKS if hasattr(torch.cpu, check)]


def _cache_source() -> str:
    for var in ("MONOQUANT_EXT_DIR", "TORCH_EXTENSIONS_DIR"):
        if os.environ.get(var):
            return f"${var}"
    return "default"


def kernel_availability(extension: bool) -> list[tuple[str, bool, str]]:
    """``(kernel, runs here, what it needs)`` for the kernels of :mod:`monoquant.kernels` (the CUDA one listed
    when CUDA is present); ``extension``: whether the compiled kernels are built here."""
    present = kernels.torch_ops_present()
    int_dot, bf16 = kernels.cpu_has_int_dot(), kernels.cpu_has_fast_bf16()
    rows = [
        ("int4pack_cpu", present["int4pack_cpu"], "torch op aten._weight_int4pack_mm_for_cpu"),
        ("int8pack_cpu", present["int8pack"], "torch op aten._weight_int8pack_mm"),
        ("fused_cpu", extension, "compiled kernels (csrc/fused_linear.cpp)"),
        ("fused_bf16", extension and hardware.cpu_has_avx512_bf16(),
         "compiled kernels with AVX512-BF16 (vdpbf16ps) on the stored codes, few rows"),
        ("fused_bf16_gemm", extension and hardware.cpu_has_avx512_bf16(),
         "compiled kernels with AVX512-BF16: weight dequantized once per call into bf16 panels"),
        ("w8a8_int_mm", present["int_mm"] and int_dot, "torch._int_mm, fast only with VNNI or AMX"),
        ("w8a8_onednn", present["onednn_qlinear"] and hardware.cpu_has_amx() and extension,
         "oneDNN's int8 matmul, weight prepacked (AMX-INT8 tiles; without AMX a slow reference loop)"),
        ("w8a8_vnni", hardware.cpu_has_avx512_vnni() and extension,
         "compiled AVX512-VNNI layer: quantize, u8 x s8 vpdpbusd GEMM, epilogue in one call"),
        ("w8a8_fused", extension, "compiled int16-pair GEMM (vpmaddwd), for CPUs without VNNI/AMX"),
        ("dequant_bf16", bf16, "native bf16 GEMMs (AMX or AVX512-BF16)"),
        ("dequant", True, "dequantize, then the float GEMM: always"),
    ]
    if torch.cuda.is_available():
        rows.insert(0, ("int4pack_cuda", present["int4pack_cuda"], "CUDA >= sm80"))
    return rows


def report(build: bool = False) -> list[str]:
    """The lines ``monoquant doctor`` prints; ``build=True`` builds the compiled kernels first if needed."""
    if build:
        fused.load()
    lines = [f"monoquant {__version__}, torch {torch.__version__}, Python {sys.version.split()[0]} ({sys.executable})",
             f"CPU: {fused.cpu_identity()}",
             "CPU features (torch.cpu): " + ", ".join(f"{n} {'yes' if ok else 'no'}" for n, ok in cpu_features()),
             f"torch's own CPU kernels use: {torch.backends.cpu.get_cpu_capability()}",
             f"compiled kernels: {fused.build_state()}",
             f"  cache: {fused.cache_root()} ({_cache_source()})",
             f"  this installation's build folder: {fused.build_directory()}"]
    state = fused.build_state()
    extension = state.startswith(("loaded", "built"))
    unbuilt = "not built" if state.startswith("not built") else "no"
    lines.append("kernels:")
    rows = kernel_availability(extension)
    width = max(len(name) for name, _, _ in rows)
    for name, ok, why in rows:
        answer = "yes" if ok else (unbuilt if "compiled" in why else "no")
        lines.append(f"  {name:<{width}}  {answer:<9}  {why}")
    return lines
