"""Half-precision weights (:class:`Float16`, :class:`BFloat16`): stored as they are, no scales."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .base import Stored, StoredWeight, WeightSpec, register_format


class HalfFormat(WeightSpec):
    """Weights stored as a 16-bit float dtype (``storage_dtype``)."""

    storage_dtype: ClassVar[torch.dtype]

    def empty_buffers(self, n: int, k: int, group_size: int | None, device: Any = None) -> Stored:
        return StoredWeight(torch.empty(n, k, dtype=self.storage_dtype, device=device))

    def quantize(self, weight2d: torch.Tensor, group_size: int | None = None, observer: Any = None) -> Stored:
        return StoredWeight(weight2d.detach().to(self.storage_dtype).clone())

    def dequantize_into(self, out: torch.Tensor, stored: Stored, row_start: int, params: tuple,
                        group_size: int | None, scratch: torch.Tensor | None = None, *,
                        scaled: bool = True) -> torch.Tensor:
        return out.copy_(stored.qweight[row_start:row_start + out.shape[0]])

    @classmethod
    def infer(cls, buffers: Mapping[str, torch.Tensor], cols: int) -> tuple[WeightSpec, int | None] | None:
        q = buffers.get("qweight")
        if set(buffers) != {"qweight"} or q.dtype != cls.storage_dtype or q.dim() != 2 or q.shape[1] != cols:
            return None
        return cls(), None


@register_format
@dataclass(frozen=True)
class Float16(HalfFormat):
    """Weights stored as IEEE half precision (no scales)."""

    kind: ClassVar[str] = "float16"
    layout: ClassVar[str] = "float16-rowmajor"
    storage_dtype: ClassVar[torch.dtype] = torch.float16
    thresholds: ClassVar[Mapping[str, float]] = {"weight_sqnr_db": 60.0, "output_sqnr_db": 35.0,
                                                 "end_to_end_sqnr_db": 30.0}


@register_format
@dataclass(frozen=True)
class BFloat16(HalfFormat):
    """Weights stored as bfloat16 (no scales)."""

    kind: ClassVar[str] = "bfloat16"
    layout: ClassVar[str] = "bfloat16-rowmajor"
    storage_dtype: ClassVar[torch.dtype] = torch.bfloat16
    thresholds: ClassVar[Mapping[str, float]] = {"weight_sqnr_db": 45.0, "output_sqnr_db": 35.0,
                                                 "end_to_end_sqnr_db": 30.0}
