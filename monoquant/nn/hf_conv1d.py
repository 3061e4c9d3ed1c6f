"""``QuantHFConv1D``: a quantized twin of Hugging Face transformers' ``Conv1D`` (GPT-2, OpenAI GPT, ImageGPT...).

``transformers.pytorch_utils.Conv1D(nf, nx)`` is a linear layer whose weight is stored transposed, ``[nx, nf]``
(``[in, out]``), and computes ``y = x @ W + b``. Its quantized twin stores the weight the way
:class:`QuantLinear` does (``[out, in]``: transposed once, when quantizing), so it runs on QuantLinear's kernels,
saves in the same layout and shares every code path that knows QuantLinear.

monoquant never imports ``transformers``: the float type is recognised by the dotted name of a class in the
module's MRO (``float_module_path``, read by the layer registry), so models built on a subclass of ``Conv1D``
match too, and the core works
without ``transformers`` installed. Only :meth:`QuantHFConv1D.to_float` (turning the layer back into a
``Conv1D``, as :func:`monoquant.dequantize_` does) imports it, since it must build one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import MissingExtraError
from ..formats import WeightSpec
from .linear import QuantLinear
from .module import QuantModule
from .registry import register_layer


@register_layer
class QuantHFConv1D(QuantLinear):
    """Quantized ``transformers.pytorch_utils.Conv1D``: ``y = x W + b`` with ``W`` (``[nx, nf]``) stored quantized.

    Stored like a :class:`QuantLinear` of ``nx`` inputs and ``nf`` outputs (``qweight`` is ``[nf, nx]``); the
    ``weight`` property gives the dequantized weight in ``Conv1D``'s own ``[nx, nf]`` layout for code that reads
    it directly. Build one with :meth:`from_float` (or let :func:`monoquant.quantize_` do it).
    """

    float_module_type = None  # not nn.Linear: transformers' class, matched by name (never imported)
    float_module_path = "transformers.pytorch_utils.Conv1D"
    GEOMETRY = ("nf", "nx")
    rank_fallback = False  # a 2-D checkpoint weight is a Linear one unless a pattern names it (--conv1d)

    def __init__(
        self,
        nf: int,
        nx: int,
        bias: bool = True,
        spec: WeightSpec | None = None,
        *,
        group_size: int | None = None,
        compute_dtype: torch.dtype | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(nx, nf, bias, spec, group_size=group_size, compute_dtype=compute_dtype, device=device,
                         dtype=dtype)
        self.nf, self.nx = nf, nx

    @classmethod
    def empty_for_weight(cls, shape: tuple[int, ...], bias: bool, spec: WeightSpec, **kwargs: Any) -> QuantModule:
        nx, nf = shape  # Conv1D stores [in, out]
        return cls(nf, nx, bias, spec, **kwargs)

    @classmethod
    def stored_weight_shape(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(reversed(shape))

    @classmethod
    def float_weight(cls, module: nn.Module) -> torch.Tensor:
        """``Conv1D``'s ``[nx, nf]`` weight seen as ``[nf, nx]`` (a transposed view)."""
        return module.weight.t()

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized float weight in ``Conv1D``'s ``[nx, nf]`` layout, rebuilt on every access."""
        return super().weight.t()

    def to_float(self) -> nn.Module:
        """A ``transformers`` ``Conv1D`` with the weight this layer computes with (see :meth:`QuantModule.to_float`)."""
        try:
            from transformers.pytorch_utils import Conv1D
        except ImportError as e:
            raise MissingExtraError("turning a QuantHFConv1D back into a float Conv1D needs transformers: "
                                    "pip install monoquant[transformers]") from e
        module = Conv1D(self.nf, self.nx).to(device=self.qweight.device, dtype=self.float_dtype)
        with torch.no_grad():
            module.weight.copy_(self.weight)
            if self.bias is not None:
                module.bias.copy_(self.bias)
            else:
                module.bias.zero_()  # Conv1D always has a bias; zero computes what this layer computes
        module.train(self.training)
        return module

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, bias={self.bias is not None}" + super(QuantLinear, self).extra_repr()
