"""``QuantHFConv1D``: a quantized twin of Hugging Face transformers' ``Conv1D`` (GPT-2, OpenAI GPT, ImageGPT...).

``transformers.pytorch_utils.Conv1D(nf, nx)`` is a linear layer whose weight is stored transposed, ``[nx, nf]``
(``[in, out]``), and computes ``y = x @ W + b``. Its quantized twin stores the weight the way
:class:`QuantLinear` does (``[out, in]``: transposed once, when quantizing), so it runs on QuantLinear's kernels,
saves in the same layout and shares every code path that knows QuantLinear.

monoquant never imports ``transformers``: the float type is recognised by the dotted name of a class in the
module's MRO (:class:`LazyType`), so models built on a subclass of ``Conv1D`` match too, and the core works
without ``transformers`` installed. Only :meth:`QuantHFConv1D.to_float` (turning the layer back into a
``Conv1D``, as :func:`monoquant.dequantize_` does) imports it, since it must build one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import WeightSpec
from ..errors import MissingExtraError
from .linear import QuantLinear


def class_path(cls: type) -> str:
    """``"package.module.QualName"`` of ``cls``: how a float type is named without importing it."""
    return f"{cls.__module__}.{cls.__qualname__}"


class LazyType(type):
    """Metaclass of stand-in types: ``isinstance(obj, T)`` is true when a class in ``type(obj).__mro__`` has the
    dotted path ``T.path``. The real class is never imported, so the check costs nothing when its package is
    absent (no object can then be an instance of it)."""

    path: str

    def __instancecheck__(cls, obj: object) -> bool:
        return cls.__subclasscheck__(type(obj))

    def __subclasscheck__(cls, sub: type) -> bool:
        return any(class_path(c) == cls.path for c in getattr(sub, "__mro__", ()))

    @classmethod
    def for_path(mcs, path: str) -> LazyType:
        """A stand-in type for the class at dotted ``path`` (named like it, for error messages)."""
        return mcs(path.rpartition(".")[2], (), {"path": path, "__doc__": f"Matches instances of {path}."})


class QuantHFConv1D(QuantLinear):
    """Quantized ``transformers.pytorch_utils.Conv1D``: ``y = x W + b`` with ``W`` (``[nx, nf]``) stored quantized.

    Stored like a :class:`QuantLinear` of ``nx`` inputs and ``nf`` outputs (``qweight`` is ``[nf, nx]``); the
    ``weight`` property gives the dequantized weight in ``Conv1D``'s own ``[nx, nf]`` layout for code that reads
    it directly. Build one with :meth:`from_float` (or let :func:`monoquant.quantize_` do it).
    """

    float_module_path = "transformers.pytorch_utils.Conv1D"
    """The float type, by name (never imported)."""
    float_module_type = LazyType.for_path(float_module_path)
    GEOMETRY = ("nf", "nx")

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
