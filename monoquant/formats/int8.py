"""INT8 weights: per-output-channel (default) or per-tensor scales, symmetric (int8 codes) or affine (uint8 codes
with a uint8 zero-point). Also the activation spec (per-tensor, affine by default, static or dynamic)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from ..errors import ConfigError
from ..qtypes import PerChannel, PerGroup, PerTensor, QType
from .base import SCALE_DTYPE, Stored, StoredWeight, WeightSpec, check_method, register_format
from .integer import IntegerFormat

ObserverLike = Any  # an Observer instance (used as a prototype) or a zero-argument factory returning one


@register_format
@dataclass(frozen=True)
class Int8(IntegerFormat):
    """8-bit integers. As a weight spec: per-output-channel (default) or per-tensor, symmetric by default.

    As an activation spec: per-tensor, affine by default (``symmetric=False``), qparams from ``observer``
    (default :class:`~monoquant.HistogramObserver`, outlier-robust) after calibration; ``dynamic=True`` computes
    per-token scales on the fly instead of calibrating. ``granularity`` and ``method`` only apply to weights.

    ``method``: ``"rtn"`` (round to nearest with the qparams of ``observer``), ``"mse"`` (the
    :class:`~monoquant.MSEObserver` clipping search) or ``"gptq"`` (needs calibration data; see
    :mod:`monoquant.gptq`, with ``act_order`` (``None``: GPTQ's default, on) and ``damping``, a fraction of
    the Hessian's mean diagonal; ranges from ``observer``, default the MSEObserver). ``refit_scales``
    (``None``: on) re-solves the scales for the codes GPTQ chose (:func:`monoquant.gptq.refit_group_scales`);
    ``sequential`` (``None``: off) collects each GPTQ layer's Hessian with the layers that run before it already
    quantized, when calibration data is given to :func:`~monoquant.quantize_` or
    :func:`~monoquant.calibrate_and_freeze`. ``"awq"`` (activation-aware scaling with its clipping search) and
    ``"awq+gptq"`` (AWQ scales, then GPTQ rounding with the GPTQ options) need ``calibration_data`` in
    :func:`~monoquant.quantize_`; see :mod:`monoquant.awq`.
    """

    kind: ClassVar[str] = "int8"
    layout: ClassVar[str] = "int8-rowmajor"
    bits: ClassVar[int] = 8
    thresholds: ClassVar[Mapping[str, float]] = {"weight_sqnr_db": 28.0, "output_sqnr_db": 25.0,
                                                 "end_to_end_sqnr_db": 20.0}

    symmetric: bool | None = None
    granularity: Literal["channel", "tensor"] = "channel"
    observer: ObserverLike = field(default=None, compare=False)
    method: str = "rtn"
    dynamic: bool = False
    act_order: bool | None = None
    damping: float = 0.01
    refit_scales: bool | None = None
    sequential: bool | None = None

    def __post_init__(self) -> None:
        if self.granularity not in ("channel", "tensor"):
            raise ConfigError(f"Int8 granularity must be 'channel' or 'tensor', got {self.granularity!r}")
        if self.symmetric is not None and not isinstance(self.symmetric, bool):
            raise ConfigError(f"symmetric must be True, False or None, got {self.symmetric!r}")
        check_method(self.method, self.observer, self.act_order, self.damping, self.sequential,
                     self.refit_scales)

    def weight_qtype(self) -> QType:
        return QType(8, symmetric=True if self.symmetric is None else self.symmetric)

    def activation_qtype(self) -> QType:
        return QType(8, symmetric=False if self.symmetric is None else self.symmetric)

    def weight_granularity(self, group_size: int | None = None) -> PerTensor | PerChannel | PerGroup:
        return PerChannel(0) if self.granularity == "channel" else PerTensor()

    def describe(self, group_size: int | None = None) -> str:
        return f"int8-{'sym' if self.weight_qtype().symmetric else 'affine'}-{self.granularity}"

    def empty_buffers(self, n: int, k: int, group_size: int | None, device: Any = None) -> Stored:
        symmetric = self.weight_qtype().symmetric
        pshape = (n,) if self.granularity == "channel" else ()
        return StoredWeight(torch.empty(n, k, dtype=torch.int8 if symmetric else torch.uint8, device=device),
                            torch.ones(pshape, dtype=SCALE_DTYPE, device=device),
                            None if symmetric else torch.zeros(pshape, dtype=torch.uint8, device=device))

    def encode(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> Stored:
        if self.weight_qtype().symmetric:
            return StoredWeight(codes.to(torch.int8), scale.to(SCALE_DTYPE), None)
        return StoredWeight(codes.to(torch.uint8), scale.to(SCALE_DTYPE), zero_point.to(torch.uint8))

    def output_scale(self, params: tuple) -> torch.Tensor | None:
        return params[0]  # one scale per output row (or one for all): it commutes with the matmul

    def kernels(self) -> tuple[str, ...]:
        if self.weight_qtype().symmetric:
            return ("int8pack_cpu", "fused_cpu", "w8a8_int_mm", "w8a8_fused", "w8a8_sim")
        return ("fused_cpu",)

    @classmethod
    def infer(cls, buffers: Mapping[str, torch.Tensor], cols: int) -> tuple[WeightSpec, int | None] | None:
        q, scale, zero = buffers.get("qweight"), buffers.get("scale"), buffers.get("zero_point")
        if (set(buffers) - {"qweight", "scale", "zero_point"} or q is None or scale is None or q.dim() != 2
                or q.shape[1] != cols or q.dtype not in (torch.int8, torch.uint8) or scale.dim() > 1):
            return None
        symmetric = q.dtype == torch.int8
        if symmetric != (zero is None):
            return None
        return cls(symmetric=symmetric, granularity="channel" if scale.dim() else "tensor"), None
