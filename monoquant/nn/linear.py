"""``QuantLinear``: a drop-in replacement for ``nn.Linear`` with integer (or half) weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import kernels
from ..config import Int8, QuantConfig, WeightSpec
from ..observers import Observer
from .module import QuantModule


class QuantLinear(QuantModule):
    """``y = x W^T + b`` with ``W`` stored quantized; see :mod:`monoquant.kernels` for how it is computed.

    Build one with :meth:`from_float` (or let :func:`monoquant.quantize_` do it). The constructor makes an
    empty layer of the right shapes, which is what :func:`monoquant.load` fills from a file.
    """

    float_module_type = nn.Linear

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

    @classmethod
    def from_float(
        cls,
        module: nn.Linear,
        config: QuantConfig | WeightSpec | None = None,
        *,
        name: str = "",
        observer: Observer | None = None,
        group_size: int | None = None,
    ) -> QuantLinear:
        """Quantize ``module``'s weight with ``config`` (a weight spec or a full config; default ``Int8()``)."""
        cls._check_float(module, name)
        spec, compute_dtype = cls._spec_of(config or Int8())
        q = cls(module.in_features, module.out_features, module.bias is not None, spec, group_size=group_size,
                compute_dtype=compute_dtype, device=module.weight.device, dtype=module.weight.dtype)
        q._load_float_weight(module.weight, observer)
        if module.bias is not None:
            q.bias.data.copy_(module.bias.detach())
        q.train(module.training)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(self, x)

    def to_float(self) -> nn.Linear:
        dev = self.qweight.device
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=dev, dtype=self.float_dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dequantize_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        lin.train(self.training)
        return lin

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}" + \
            super().extra_repr()
