"""NF4 weights: the 16-level *normal float* code of QLoRA (Dettmers et al., 2023) as bitsandbytes stores it.

Each group of ``group_size`` weights along the input dimension keeps one float32 scale, its absolute maximum;
each weight becomes the index of the code value nearest to ``w / absmax`` (a 4-bit code, packed two per byte
exactly like INT4: see :mod:`monoquant.packing`) and is decoded as ``NF4_VALUES[code] * absmax`` by table
lookup. The code values are quantiles of a standard normal distribution, so weights that look normal lose less
than with INT4's evenly spaced levels.

Stored buffers of an ``[N, K]`` weight:

============  ===========================================  ================================================
``qweight``   uint8 ``[N, ceil(K/2)]``                     codes, low nibble = even column
``scale``     float32 ``[N, K/g]``                         absmax of each group (1.0 for an all-zero group)
``codebook``  float32 ``[16]``                             :data:`NF4_VALUES`
============  ===========================================  ================================================

The ``codebook`` makes a file self-describing (it holds the code values; 64 bytes per layer) and tells an NF4
state dict from a symmetric INT4 one, which has the same ``qweight`` and ``scale``. Like every stored buffer it
keeps its dtype under ``model.half()`` / ``model.to(dtype)``. Dequantization uses :data:`NF4_VALUES` (never a
value read back from the device); a state dict whose codebook differs from it is not recognised as NF4.

No PyTorch low-bit kernel computes with NF4 codes (``int4pack`` assumes evenly spaced levels), so NF4 layers
always dequantize and then run a float GEMM. GPTQ is not offered: it needs a uniform integer grid.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch

from ..errors import ConfigError, NonFiniteWeightError
from ..packing import pack_int4, unpack_int4_into
from ..qtypes import PerGroup
from .base import SCALE_DTYPE, GroupWise, Stored, WeightSpec, register_format

# The NF4 code of bitsandbytes (``bitsandbytes.functional.get_4bit_type("nf4")``), written out as it is there.
# Derivation (``create_normal_map(offset=0.9677083, use_extra_value=True)``): the standard normal quantiles
# ``Phi^-1(p)`` at the 8 points ``p = linspace(offset, 0.5, 9)[:-1]`` (positive side) and, negated, at the 7 points
# ``linspace(offset, 0.5, 8)[:-1]`` (negative side), plus an exact 0; sorted, divided by the largest, rounded to
# float32. ``offset`` = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2 puts the outermost levels at +-1 while keeping the tails
# finite. The code is asymmetric (8 positive levels, 7 negative) so that 0 is exactly representable.
# tests/test_nf4.py recomputes these values from the derivation.
NF4_VALUES: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
"""The 16 NF4 code values, ascending (code ``i`` means ``NF4_VALUES[i] * absmax``); each is exact in float32."""

CODEBOOK_DTYPE = torch.float32
"""Stored dtype of the ``codebook`` buffer."""


def codebook_tensor(device: Any = None) -> torch.Tensor:
    """The ``codebook`` buffer's value: :data:`NF4_VALUES`, ``float32 [16]``."""
    return torch.tensor(NF4_VALUES, dtype=CODEBOOK_DTYPE, device=device)


class NF4Weight(NamedTuple):
    """An NF4 weight's buffers (see the module docstring)."""

    qweight: torch.Tensor
    scale: torch.Tensor
    codebook: torch.Tensor


@register_format
@dataclass(frozen=True)
class NF4(GroupWise, WeightSpec):
    """4-bit normal-float weights (QLoRA / bitsandbytes NF4): absmax per group along the input dimension,
    codes packed two per byte, decoded by table lookup.

    ``group_size`` (default 64, bitsandbytes' block size) must be positive; when a layer's input size is not a
    multiple of it the group is chosen as for :class:`~monoquant.Int4` (one group per row if the row is no longer;
    else the largest of ``group_size/2, /4, ...`` down to 32 that divides the row; else the largest divisor of the
    row between ``group_size`` and 32; else the layer is skipped).
    Quantization is round-to-nearest with the absmax scale: there is no observer, ``method`` or GPTQ.
    """

    kind: ClassVar[str] = "nf4"
    layout: ClassVar[str] = "nf4-bnb-absmax-packed-low-nibble-even-column"
    bits: ClassVar[int] = 4
    stored_type: ClassVar[type[tuple]] = NF4Weight
    shared_buffers: ClassVar[tuple[str, ...]] = ("codebook",)  # one per layer, not per row
    # Measured with benchmarks/bench_sqnr.py (every layer quantized, NF4-g64, seven small models): on the healthy
    # models the lowest per-layer weight SQNR was 19.0 dB, output SQNR 18.9 dB and model-output SQNR 15.8 dB (all on
    # Student-t weights), within 3 dB of INT4-g64 affine everywhere (NF4 is up to 2.9 dB lower on uniform init
    # weights, equal on normal ones, 0.5 dB higher on heavy tails). INT4's floors therefore fit NF4 too: >= 7 dB
    # below every healthy layer, while the damaged-layer model's 8.8 dB output SQNR still fails the 10 dB floor.
    thresholds: ClassVar[Mapping[str, float]] = {"weight_sqnr_db": 12.0, "output_sqnr_db": 10.0,
                                                 "end_to_end_sqnr_db": 8.0}

    group_size: int = 64

    def __post_init__(self) -> None:
        PerGroup(self.group_size)  # validates

    def promotion(self) -> WeightSpec | None:
        from .int8 import Int8  # the next precision up: 8-bit weights per output channel

        return Int8()

    def describe(self, group_size: int | None = None) -> str:
        return f"nf4-g{group_size or self.group_size}"

    def empty_buffers(self, n: int, k: int, group_size: int | None, device: Any = None) -> Stored:
        return NF4Weight(torch.empty(n, (k + 1) // 2, dtype=torch.uint8, device=device),
                         torch.ones(n, k // _group(group_size), dtype=SCALE_DTYPE, device=device),
                         codebook_tensor(device))

    # ---- float -> stored -------------------------------------------------------------------------------------
    def quantize(self, weight2d: torch.Tensor, group_size: int | None = None, observer: Any = None) -> Stored:
        """Codes of the nearest NF4 value to ``w / absmax`` per group, computed in float64 with the float32 absmax
        that is stored. A value exactly halfway between two code values takes the lower code."""
        if observer is not None:
            raise ConfigError("NF4 scales are each group's absmax; it takes no observer")
        n, k = weight2d.shape
        g = _group(group_size)
        groups = weight2d.detach().double().reshape(n, k // g, g)
        absmax = groups.abs().amax(dim=-1)
        if not bool(torch.isfinite(absmax).all()):
            raise NonFiniteWeightError("NF4 cannot store a weight with NaN or Inf; fix the checkpoint or skip the "
                                       "layer with SkipRules(exclude=[...])")
        # the stored float32 scale is the one codes are computed with; an all-zero group keeps scale 1 (codes of 0)
        scale = torch.where(absmax > 0, absmax, torch.ones((), dtype=absmax.dtype, device=absmax.device))
        scale = scale.to(SCALE_DTYPE)
        values = torch.tensor(NF4_VALUES, dtype=torch.float64, device=weight2d.device)
        midpoints = (values[1:] + values[:-1]) / 2  # exact in float64: the values are float32
        codes = torch.bucketize(groups / scale.double().unsqueeze(-1), midpoints)  # x <= midpoint -> lower code
        return NF4Weight(pack_int4(codes.reshape(n, k)), scale, codebook_tensor(weight2d.device))

    # ---- stored -> float -------------------------------------------------------------------------------------
    def dequant_params(self, stored: Stored, dtype: torch.dtype) -> tuple[torch.Tensor]:
        """The per-group scale in ``dtype``, ``[N, K/g, 1]`` to broadcast against the grouped weight."""
        return (stored.scale.to(dtype).unsqueeze(-1),)

    def dequantize_into(self, out: torch.Tensor, stored: Stored, row_start: int, params: tuple,
                        group_size: int | None, scratch: torch.Tensor | None = None, *,
                        scaled: bool = True) -> torch.Tensor:
        """``NF4_VALUES[code] * scale`` in ``out.dtype``: one table-lookup pass writes the code values, one pass
        multiplies each group by its scale. In float64 that is the stored value exactly, in float32 the stored value
        rounded once; in bf16/fp16 the code value and the scale are rounded to the dtype before the product (as
        INT4's scale is). ``scaled`` is ignored: the scales are per group, not per output row."""
        rows = slice(row_start, row_start + out.shape[0])
        unpack_int4_into(out, stored.qweight[rows], NF4_VALUES, scratch)
        out.view(out.shape[0], -1, _group(group_size)).mul_(params[0][rows])
        return out

    @classmethod
    def infer(cls, buffers: Mapping[str, torch.Tensor], cols: int) -> tuple[WeightSpec, int | None] | None:
        q, scale, codebook = buffers.get("qweight"), buffers.get("scale"), buffers.get("codebook")
        if (set(buffers) != {"qweight", "scale", "codebook"} or q.dim() != 2 or q.dtype != torch.uint8
                or q.shape[1] != (cols + 1) // 2 or scale.dim() != 2 or scale.dtype != SCALE_DTYPE
                or not scale.shape[1] or cols % scale.shape[1] or codebook.dtype != CODEBOOK_DTYPE
                or not torch.equal(codebook.cpu(), codebook_tensor())):
            return None
        group_size = cols // scale.shape[1]
        return cls(group_size=group_size), group_size


def _group(group_size: int | None) -> int:
    if group_size is None:
        raise ConfigError("an NF4 weight needs a resolved group size")
    return group_size
