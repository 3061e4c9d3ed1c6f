"""``--simulate-avx2``: run a benchmark on an AVX-512 machine as if its CPU had AVX2 only.

What changes: PyTorch's own vectorised kernels (``ATEN_CPU_CAPABILITY=avx2``), oneDNN (``ONEDNN_MAX_CPU_ISA=AVX2``:
its bf16 and int8 GEMMs lose AVX-512, VNNI and AMX) and MKL (``MKL_ENABLE_INSTRUCTIONS=AVX2``: the float32 GEMM
baseline) are capped at AVX2; monoquant's fused kernel is built for Haswell (``MONOQUANT_EXT_ARCH=haswell``: its
AVX2 path); and monoquant's capability checks (integer dot products, fast bf16) answer False, as on such a CPU.
What does not: the cache sizes, memory bandwidth and clock of this machine, so the figures approximate an AVX2
CPU of the same generation rather than measure one. The variables must be set before ``import torch``.
"""

from __future__ import annotations

import os
import sys

FLAG = "--simulate-avx2"
ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
       "MONOQUANT_EXT_ARCH": "haswell"}


def requested() -> bool:
    """True (and the environment set) when the command line asks for the simulation; call before importing torch."""
    if FLAG not in sys.argv:
        return False
    os.environ.update(ENV)
    return True


def mask_capabilities(mq) -> str:
    """Make monoquant's CPU checks answer as on an AVX2-only CPU; returns a line for the benchmark header."""
    from monoquant import hardware

    hardware.cpu_has_int_dot = lambda: False  # read by the formats' INT8-input kernels
    hardware.cpu_has_fast_bf16 = lambda: False
    hardware.cpu_has_avx512_bf16 = lambda: False  # read by the formats' fused_bf16 kernels
    mq.kernels.cpu_has_fast_bf16 = lambda: False  # read by the shared dequantize rows
    mq.kernels.cpu_has_int_dot = lambda: False  # kernels' own reference (the dispatch and the header line)
    hardware.cpu_has_avx512_vnni = lambda: False  # read by Int8's w8a8_vnni candidate
    return ("SIMULATED AVX2-only CPU (--simulate-avx2): " + " ".join(f"{k}={v}" for k, v in ENV.items())
            + "; VNNI/AMX/bf16 checks forced off")
