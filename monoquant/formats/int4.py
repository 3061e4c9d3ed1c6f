"""INT4 weights: group-wise scales along the input dimension, two codes packed per byte (see
:mod:`monoquant.packing`), affine by default (uint8 zero-point per group) or symmetric (codes stored as ``q + 8``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..errors import ConfigError
from ..packing import INT4_CODES, pack_int4, unpack_int4_into
from ..qtypes import PerChannel, PerGroup, PerTensor, QType
from .base import GPTQ_METHODS, SCALE_DTYPE, GroupWise, Stored, StoredWeight, WeightSpec, check_method, register_format
from .integer import IntegerFormat

KERNEL_GROUP_SIZES = (256, 128, 64, 32)
"""Group sizes the packed INT4 kernels accept, largest first."""


@register_format
@dataclass(frozen=True)
class Int4(GroupWise, IntegerFormat):
    """4-bit weights, group-wise along the input dimension, packed two per byte, affine by default.

    ``group_size`` must be positive. When a layer's input size is not a multiple of it, the group is chosen
    by :func:`~monoquant.formats.base.resolve_group_size`: one group per row if the row is no longer than
    ``group_size``; else the largest of ``group_size/2, /4, ...`` (down to 32) that divides the row; else the
    largest divisor of the row between ``group_size`` and 32; else the layer is skipped and reported.

    ``method``, ``act_order``, ``damping``, ``sequential``: as for :class:`Int8` (``"rtn"``, ``"mse"``,
    ``"gptq"``, ``"awq"`` or ``"awq+gptq"``).
    ``static_groups`` (GPTQ; ``None``: on): every group's qparams come from the original weight before GPTQ
    starts, instead of from its error-compensated weights when its first column comes up; the stored layout
    is the same either way.
    """

    kind: ClassVar[str] = "int4"
    layout: ClassVar[str] = "int4-packed-low-nibble-even-column"
    bits: ClassVar[int] = 4
    thresholds: ClassVar[Mapping[str, float]] = {"weight_sqnr_db": 12.0, "output_sqnr_db": 10.0,
                                                 "end_to_end_sqnr_db": 8.0}
    symmetric_offset: ClassVar[int] = 8

    group_size: int = 128
    symmetric: bool = False
    observer: Any = field(default=None, compare=False)
    method: str = "rtn"
    act_order: bool | None = None
    damping: float = 0.01
    static_groups: bool | None = None
    refit_scales: bool | None = None
    sequential: bool | None = None

    def __post_init__(self) -> None:
        PerGroup(self.group_size)  # validates
        if not isinstance(self.symmetric, bool):
            raise ConfigError(f"symmetric must be True or False, got {self.symmetric!r}")
        check_method(self.method, self.observer, self.act_order, self.damping, self.sequential,
                     self.refit_scales)
        if self.static_groups is not None and self.method not in GPTQ_METHODS:
            raise ConfigError("static_groups only applies to method='gptq' or 'awq+gptq'")

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

    def kernels(self) -> tuple[str, ...]:
        return ("int4pack_cuda", "int4pack_cpu", "fused_cpu")

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
