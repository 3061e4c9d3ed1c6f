"""Function-style access to the weight formats of :mod:`monoquant.formats` (``quantize_weight(spec, w)``...).

Each function asks the format it is given (``spec``); the formats own the behaviour (the module keeps its 0.1
name: "scheme" is otherwise only a format's label, :meth:`~monoquant.formats.WeightSpec.describe`). A stored
weight is a ``NamedTuple`` of buffers (:class:`~monoquant.formats.StoredWeight` or a format's own
``stored_type``).
"""

from __future__ import annotations

import torch

from .formats import SCALE_DTYPE, IntegerFormat, Stored, StoredWeight, WeightSpec
from .observers import Observer
from .qtypes import PerChannel, PerGroup, PerTensor, QType

__all__ = ["SCALE_DTYPE", "Stored", "StoredWeight", "dequantize_weight", "encode_codes", "qparams_for",
           "quantize_weight",
           "weight_granularity", "weight_qtype"]


def _integer(spec: WeightSpec) -> IntegerFormat:
    return spec.as_integer()


def weight_granularity(spec: WeightSpec, group_size: int | None) -> PerTensor | PerChannel | PerGroup:
    """Where the integer format ``spec`` keeps one scale."""
    return _integer(spec).weight_granularity(group_size)


def weight_qtype(spec: WeightSpec) -> QType:
    """The integer qtype of ``spec``'s codes."""
    return _integer(spec).weight_qtype()


def qparams_for(spec: WeightSpec, weight2d: torch.Tensor, group_size: int | None,
                observer: Observer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float64, rounded to the stored dtype) and zero-point of a weight, chosen by ``observer``."""
    return _integer(spec).qparams(weight2d, group_size, observer)


def encode_codes(spec: WeightSpec, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> Stored:
    """Store integer ``codes`` (int64 in the qtype's range, ``[N, K]``) with their qparams."""
    return _integer(spec).encode(codes, scale, zero_point)


def quantize_weight(spec: WeightSpec, weight2d: torch.Tensor, group_size: int | None = None,
                    observer: Observer | None = None) -> Stored:
    """Round-to-nearest quantization of a 2-D float weight into its stored buffers."""
    return spec.quantize(weight2d, group_size, observer)


def dequantize_weight(spec: WeightSpec, stored: Stored, cols: int, group_size: int | None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float ``[N, K]`` weight in ``dtype`` from stored buffers (exactly ``(q - zero) * scale`` for integers)."""
    return spec.dequantize(stored, cols, group_size, dtype)
