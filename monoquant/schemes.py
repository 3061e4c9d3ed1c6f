"""How each weight spec is stored, and the two conversions float <-> stored.

Stored buffers of a quantized weight whose 2-D view is ``[N, K]`` (conv kernels are viewed as
``[out_channels, in_channels/groups * prod(kernel)]``):

============  ==========================================  ===================  ======================
spec          ``qweight``                                 ``scale`` (float32)  ``zero_point``
============  ==========================================  ===================  ======================
Int8 sym      int8 ``[N, K]``                             ``[N]`` or ``[]``    none
Int8 affine   uint8 ``[N, K]``                            ``[N]`` or ``[]``    uint8, same as scale
Int4 affine   uint8 ``[N, ceil(K/2)]`` (see packing.py)   ``[N, K/g]``         uint8 ``[N, K/g]``
Int4 sym      same, codes offset by +8                    ``[N, K/g]``         none (implicitly 8)
Float16/BF16  float16/bfloat16 ``[N, K]``                 none                 none
============  ==========================================  ===================  ======================

Scales are float32 (exact enough that dequantized weights equal a float64 reference quantizer and
cheap: 4 bytes per 128 weights at INT4-g128). Dequantization is ``(q - zero_point) * scale``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import functional as F
from .config import Int4, Int8, WeightSpec
from .errors import ConfigError
from .observers import Observer
from .packing import pack_int4, unpack_int4
from .qtypes import PerChannel, PerGroup, PerTensor, QType

SCALE_DTYPE = torch.float32
INT4_SYMMETRIC_OFFSET = 8


class StoredWeight(NamedTuple):
    qweight: torch.Tensor
    scale: torch.Tensor | None
    zero_point: torch.Tensor | None


def weight_granularity(spec: WeightSpec, group_size: int | None) -> PerTensor | PerChannel | PerGroup:
    if isinstance(spec, Int4):
        if group_size is None:
            raise ConfigError("an Int4 weight needs a resolved group size")
        return PerGroup(group_size)
    if isinstance(spec, Int8):
        return spec.weight_granularity()
    raise ConfigError(f"{spec.kind} weights have no quantization granularity")


def weight_qtype(spec: WeightSpec) -> QType:
    if isinstance(spec, (Int4, Int8)):
        return spec.weight_qtype()
    raise ConfigError(f"{spec.kind} weights have no integer qtype")


def encode_codes(
    spec: WeightSpec, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
) -> StoredWeight:
    """Store integer ``codes`` (int64 in the qtype's range, ``[N, K]``) with their float64/int64 qparams."""
    qtype = weight_qtype(spec)
    scale = scale.to(SCALE_DTYPE)
    if isinstance(spec, Int4):
        if qtype.symmetric:
            return StoredWeight(pack_int4(codes + INT4_SYMMETRIC_OFFSET), scale, None)
        return StoredWeight(pack_int4(codes), scale, zero_point.to(torch.uint8))
    if qtype.symmetric:
        return StoredWeight(codes.to(torch.int8), scale, None)
    return StoredWeight(codes.to(torch.uint8), scale, zero_point.to(torch.uint8))


def qparams_for(
    spec: WeightSpec, weight2d: torch.Tensor, group_size: int | None, observer: Observer | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float64, rounded to the stored dtype) and zero-point of a weight, chosen by ``observer``."""
    qtype, granularity = weight_qtype(spec), weight_granularity(spec, group_size)
    observer = observer if observer is not None else spec.make_observer()
    observer.configure(qtype, granularity)
    observer(weight2d)
    scale, zero = observer.calculate_qparams()
    # round the scale to its stored dtype first, so codes are computed with the scale that is stored
    return scale.to(SCALE_DTYPE).double(), zero


def quantize_weight(
    spec: WeightSpec, weight2d: torch.Tensor, group_size: int | None = None, observer: Observer | None = None
) -> StoredWeight:
    """Round-to-nearest quantization of a 2-D float weight into its stored buffers."""
    if spec.kind in ("float16", "bfloat16"):
        return StoredWeight(weight2d.detach().to(spec.storage_dtype).clone(), None, None)
    scale, zero = qparams_for(spec, weight2d, group_size, observer)
    granularity = weight_granularity(spec, group_size)
    view = F.group_view(weight2d.detach(), granularity)
    codes = F.quantize(view, F.expand_qparam(scale, granularity), F.expand_qparam(zero, granularity),
                       weight_qtype(spec))
    return encode_codes(spec, codes.reshape(weight2d.shape[0], -1), scale, zero)


def decode_codes(spec: WeightSpec, qweight: torch.Tensor, zero_point: torch.Tensor | None,
                 cols: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Integer codes ``[N, K]`` (uint8/int8) and the zero-point to subtract (``None`` means 0)."""
    if isinstance(spec, Int4):
        codes = unpack_int4(qweight, cols)
        if zero_point is None:
            return codes, torch.full((), INT4_SYMMETRIC_OFFSET, dtype=torch.uint8, device=qweight.device)
        return codes, zero_point
    return qweight, zero_point


def dequantize_weight(
    spec: WeightSpec,
    stored: StoredWeight,
    cols: int,
    group_size: int | None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Float ``[N, K]`` weight in ``dtype`` from stored buffers (exactly ``(q - zero) * scale``)."""
    if spec.kind in ("float16", "bfloat16"):
        return stored.qweight.to(dtype)
    granularity = weight_granularity(spec, group_size)
    codes, zero = decode_codes(spec, stored.qweight, stored.zero_point, cols)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    if zero is not None and zero.dim():
        zero = F.expand_qparam(zero, granularity)
    w = F.dequantize(F.group_view(codes, granularity), F.expand_qparam(stored.scale, granularity), zero, compute)
    return w.reshape(codes.shape[0], cols).to(dtype)
