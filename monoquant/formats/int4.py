"""INT4 weights: group-wise scales along the input dimension, two codes packed per byte (see
:mod:`monoquant.packing`), affine by default (uint8 zero-point per group) or symmetric (codes stored as ``q + 8``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import InitVar, dataclass, field
from typing import Any, ClassVar

import torch

from .. import fused, hardware
from ..errors import ConfigError
from ..packing import INT4_CODES, pack_int4, unpack_int4, unpack_int4_into
from ..qtypes import PerChannel, PerGroup, PerTensor, QType
from .base import SCALE_DTYPE, GroupWise, Stored, StoredWeight, WeightSpec, register_format
from .integer import (
    FUSED_BF16_BLOCK,
    IntegerFormat,
    fused_bf16_candidate,
    fused_bf16_eligible,
    fused_bf16_gemm_candidate,
    fused_candidate,
)
from .kernel import KernelCandidate, KernelQuery, QuantWeight, bf16_rows
from .method import ROUND_TO_NEAREST, MethodConfig, method_options, take_method_options

KERNEL_GROUP_SIZES = (256, 128, 64, 32)
"""Group sizes the packed INT4 kernels accept, largest first."""

CUDA_INNER_K_TILES = 8
"""``innerKTiles`` of the CUDA int4pack layout (2, 4 or 8 are valid; 8 is what torchao uses; K must be a multiple
of ``16 * innerKTiles``). The CPU op ignores the argument (its layout does not tile K), so 1 is passed there."""


# ---- the kernels that run INT4 (registered by Int4.kernel_candidates) -------------------------------------
def _group_ok(w: QuantWeight) -> bool:
    g = w.group_size
    return g in KERNEL_GROUP_SIZES and w.shape2d[1] % g == 0


def _scale_and_zeros(w: QuantWeight) -> torch.Tensor:
    """``[K/g, N, 2]`` bf16 (scale, offset) with ``w = (q - 8) * scale + offset``, as the int4pack ops want."""
    stored = w.stored
    scale = stored.scale.float()
    offset = torch.zeros_like(scale) if stored.zero_point is None else (8.0 - stored.zero_point.float()) * scale
    return torch.stack((scale, offset), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)


def _int4pack_cpu_eligible(w: QuantWeight, q: KernelQuery) -> bool:
    return (q.low_bit_ok and q.device.type == "cpu" and hardware.HAS["int4pack_cpu"] and _group_ok(w)
            and q.n % 16 == 0)


def _int4pack_cpu(w: QuantWeight, x2d: torch.Tensor) -> torch.Tensor:
    def make():
        codes = unpack_int4(w.stored.qweight, w.shape2d[1]).to(torch.int32)
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), _scale_and_zeros(w)

    packed, sz = w.cached("int4pack_cpu", make)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(bf16_rows(x2d), packed, w.group_size, sz)


def _int4pack_cuda_eligible(w: QuantWeight, q: KernelQuery) -> bool:
    return (q.low_bit_ok and q.device.type == "cuda" and hardware.HAS["int4pack_cuda"] and _group_ok(w) and q.n % 8 == 0
            and q.k % (16 * CUDA_INNER_K_TILES) == 0 and hardware.cuda_supports_int4pack(q.device))


def _int4pack_cuda(w: QuantWeight, x2d: torch.Tensor) -> torch.Tensor:
    def make():
        codes = unpack_int4(w.stored.qweight, w.shape2d[1])
        even_high = (codes[:, 0::2] << 4) | codes[:, 1::2]  # the CUDA op wants the even column high
        return (torch.ops.aten._convert_weight_to_int4pack(even_high.contiguous(), CUDA_INNER_K_TILES),
                _scale_and_zeros(w))

    packed, sz = w.cached("int4pack_cuda", make)
    return torch.ops.aten._weight_int4pack_mm(bf16_rows(x2d), packed, w.group_size, sz)


def _fused_int4(w: QuantWeight, x2d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    stored = w.stored
    return fused.int4_linear(x2d.to(torch.float32).contiguous(), stored.qweight, stored.scale, stored.zero_point,
                             w.group_size, None if bias is None else bias.to(torch.float32).contiguous())


def _bind_fused_int4(w: QuantWeight):
    call, buffers, group_size = fused.compiled("int4_linear"), w.buffers, w.group_size
    return lambda x2d, bias: call(x2d, buffers["qweight"], buffers["scale"], buffers["zero_point"], group_size, bias)


def _fused_bf16_int4_eligible(w: QuantWeight, q: KernelQuery) -> bool:
    return fused_bf16_eligible(w, q) and w.group_size is not None and w.group_size % FUSED_BF16_BLOCK == 0


def _fused_bf16_int4(w: QuantWeight, x2d: torch.Tensor) -> torch.Tensor:
    stored = w.stored
    return fused.int4_linear_bf16(bf16_rows(x2d), stored.qweight, stored.scale, stored.zero_point, w.group_size)


def _fused_bf16_gemm_int4(w: QuantWeight, x2d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    stored = w.stored
    return fused.int4_gemm_bf16(bf16_rows(x2d), stored.qweight, stored.scale, stored.zero_point, w.group_size, bias)


INT4PACK_CUDA = KernelCandidate("int4pack_cuda", _int4pack_cuda, _int4pack_cuda_eligible, layouts=("int4pack_cuda",))
"""torch's tinygemm INT4 kernel on CUDA >= sm80 (bf16)."""
INT4PACK_CPU = KernelCandidate("int4pack_cpu", _int4pack_cpu, _int4pack_cpu_eligible, max_rows=48, tune_max_rows=256,
                               layouts=("int4pack_cpu",))
"""torch's packed INT4 kernel on CPU (bf16). ``max_rows``: its time grows linearly with rows while a dequantize
+ bf16 GEMM costs a near-constant dequantize plus a cheap GEMM; measured with ``bench_linear.py --crossover``
(4096x4096, AVX512 + AMX), packed vs dequantize ms at 48 / 64 rows: 9.2 vs 11.6 / 12.3 vs 12.1 on 2 threads,
18.8 vs 17.6 / 25.2 vs 17.0 on 1 thread. Both sides scale with the layer's size, so the crossing row count does
not depend on it."""
FUSED_INT4 = fused_candidate(_fused_int4, _bind_fused_int4)
"""The compiled kernel on the stored INT4 layout (float32)."""
FUSED_BF16_INT4 = fused_bf16_candidate(_fused_bf16_int4, _fused_bf16_int4_eligible)
"""The compiled AVX512-BF16 kernel on the stored INT4 layout (bf16, group tables looked up per code)."""
FUSED_BF16_GEMM_INT4 = fused_bf16_gemm_candidate(_fused_bf16_gemm_int4)
"""The compiled AVX512-BF16 panel GEMM on the stored INT4 layout (bf16, the weight dequantized once per call)."""


@register_format
@method_options
@dataclass(frozen=True)
class Int4(GroupWise, IntegerFormat):
    """4-bit weights, group-wise along the input dimension, packed two per byte, affine by default.

    ``group_size`` must be positive. When a layer's input size is not a multiple of it, the group is chosen
    by :func:`~monoquant.formats.base.resolve_group_size`: one group per row if the row is no longer than
    ``group_size``; else the largest of ``group_size/2, /4, ...`` (down to 32) that divides the row; else the
    largest divisor of the row between ``group_size`` and 32; else the layer is skipped and reported.

    How the weights are made (``observer``, ``method``, ``act_order``, ``damping``, ``refit_scales``,
    ``sequential``): as for :class:`Int8` (``"rtn"``, ``"mse"``, ``"gptq"``, ``"awq"`` or ``"awq+gptq"``); they
    build :attr:`method_config` and read it back.
    ``static_groups`` (GPTQ; ``None``: on): every group's qparams come from the original weight before GPTQ
    starts, instead of from its error-compensated weights when its first column comes up; the stored layout
    is the same either way.
    ``output_aware`` (GPTQ; ``None``: :data:`monoquant.gptq.DEFAULT_OPTIONS`): layers with at most
    :data:`monoquant.output_aware.OUTPUT_AWARE_WEIGHTS` weights are rounded against the error at the model output
    instead of their own (one extra float pass with gradients per calibration batch; see
    :mod:`monoquant.output_aware`).
    """

    kind: ClassVar[str] = "int4"
    layout: ClassVar[str] = "int4-packed-low-nibble-even-column"
    bits: ClassVar[int] = 4
    thresholds: ClassVar[Mapping[str, float]] = {"weight_sqnr_db": 12.0, "output_sqnr_db": 10.0,
                                                 "end_to_end_sqnr_db": 8.0}
    symmetric_offset: ClassVar[int] = 8
    costly_at_model_ends: ClassVar[bool] = True
    fused_dequantize: ClassVar[Callable[..., torch.Tensor] | None] = staticmethod(fused.dequantize_int4_into)

    group_size: int = 128
    symmetric: bool = False
    # how the weights are made: init-only, folded into method_config (see formats/method.py)
    observer: InitVar[Any] = None
    method: InitVar[str] = "rtn"
    act_order: InitVar[bool | None] = None
    damping: InitVar[float] = 0.01
    static_groups: InitVar[bool | None] = None
    refit_scales: InitVar[bool | None] = None
    sequential: InitVar[bool | None] = None
    output_aware: InitVar[bool | None] = None
    method_config: MethodConfig = field(default=ROUND_TO_NEAREST, init=False)

    def __post_init__(self, *method_options: Any) -> None:
        PerGroup(self.group_size)  # validates
        if not isinstance(self.symmetric, bool):
            raise ConfigError(f"symmetric must be True or False, got {self.symmetric!r}")
        take_method_options(self, method_options)

    def weight_qtype(self) -> QType:
        return QType(4, symmetric=self.symmetric)

    def weight_granularity(self, group_size: int | None = None) -> PerTensor | PerChannel | PerGroup:
        if group_size is None:
            raise ConfigError("an Int4 weight needs a resolved group size")
        return PerGroup(group_size)

    def describe(self, group_size: int | None = None) -> str:
        return f"int4-{'sym' if self.symmetric else 'affine'}-g{group_size or self.group_size}"

    def empty_buffers(self, n: int, k: int, group_size: int | None, device: Any = None) -> Stored:
        pshape = (n, k // group_size)
        return StoredWeight(torch.empty(n, (k + 1) // 2, dtype=torch.uint8, device=device),
                            torch.ones(pshape, dtype=SCALE_DTYPE, device=device),
                            None if self.symmetric else torch.zeros(pshape, dtype=torch.uint8, device=device))

    def encode(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> Stored:
        if self.symmetric:
            return StoredWeight(pack_int4(codes + self.symmetric_offset), scale.to(SCALE_DTYPE), None)
        return StoredWeight(pack_int4(codes), scale.to(SCALE_DTYPE), zero_point.to(torch.uint8))

    def widen_into(self, out: torch.Tensor, qweight_rows: torch.Tensor, scratch: torch.Tensor | None) -> None:
        unpack_int4_into(out, qweight_rows, INT4_CODES, scratch)

    def group_rows_view(self, out: torch.Tensor, group_size: int | None) -> torch.Tensor:
        return out.view(out.shape[0], out.shape[1] // group_size, group_size)

    def promotion(self) -> WeightSpec | None:
        from .int8 import Int8  # the next precision up: 8-bit weights per output channel

        return Int8()

    def kernel_candidates(self) -> tuple[KernelCandidate, ...]:
        return (INT4PACK_CUDA, INT4PACK_CPU, FUSED_INT4, FUSED_BF16_INT4, FUSED_BF16_GEMM_INT4)

    @classmethod
    def infer(cls, buffers: Mapping[str, torch.Tensor], cols: int) -> tuple[WeightSpec, int | None] | None:
        q, scale, zero = buffers.get("qweight"), buffers.get("scale"), buffers.get("zero_point")
        if (set(buffers) - {"qweight", "scale", "zero_point"} or q is None or scale is None or q.dim() != 2
                or q.dtype != torch.uint8 or q.shape[1] != (cols + 1) // 2 or scale.dim() != 2):
            return None
        if not scale.shape[1] or cols % scale.shape[1]:
            return None
        group_size = cols // scale.shape[1]
        return cls(group_size=group_size, symmetric=zero is None), group_size
