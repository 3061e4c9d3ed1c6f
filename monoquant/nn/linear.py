"""``QuantLinear``: a drop-in replacement for ``nn.Linear`` with integer (or half) weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import kernels
from ..formats import Int8, WeightSpec
from .module import QuantModule
from .registry import register_layer


@register_layer
class QuantLinear(QuantModule):
    """``y = x W^T + b`` with ``W`` stored quantized; see :mod:`monoquant.kernels` for how it is computed.

    Build one with :meth:`from_float` (or let :func:`monoquant.quantize_` do it). The constructor makes an
    empty layer of the right shapes, which is what :func:`monoquant.load` fills from a file.
    """

    float_module_type = nn.Linear
    GEOMETRY = ("in_features", "out_features")
    kernel_family = "linear"
    supports_input_scale = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        spec: WeightSpec | None = None,
        *,
        group_size: int | None = None,
        compute_dtype: torch.dtype | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self._init_quant((out_features, in_features), spec or Int8(), bias=bias, group_size=group_size,
                         compute_dtype=compute_dtype, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x, self.in_features)
        return kernels.linear(self, self.scale_input(x))

    def kernel_summary(self) -> str:
        return kernels.kernel_summary(self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}" + \
            super().extra_repr()
