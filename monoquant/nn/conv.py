"""``QuantConv1d/2d/3d``: drop-in replacements for ``nn.Conv1d/2d/3d`` with quantized kernels.

Weights are viewed as ``[out_channels, in_channels/groups * prod(kernel_size)]`` for quantization, so
INT4 groups run along the flattened (input channel x kernel) dimension. ``forward`` runs the conv kernel chosen
by measurement against the float path (dequantize the small kernel, ``F.conv*``): see
:mod:`monoquant.conv_kernels`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _ntuple, _reverse_repeat_tuple

from .. import call_plans, conv_kernels, kernels, ops
from ..formats import Int8, WeightSpec
from ..im2col import ConvGeometry
from .module import QuantModule
from .registry import register_layer


class _QuantConvNd(QuantModule):
    GEOMETRY = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                "padding_mode")
    _dims: int
    _conv = staticmethod(F.conv2d)
    kernel_family = "conv"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: str | int | tuple[int, ...] = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        spec: WeightSpec | None = None,
        *,
        group_size: int | None = None,
        compute_dtype: torch.dtype | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        tup = _ntuple(self._dims)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = tup(kernel_size), tup(stride), tup(dilation)
        self.padding = padding if isinstance(padding, str) else tup(padding)
        self.padding_mode = padding_mode
        self._reversed_padding_repeated_twice = self._reverse_padding()
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._init_quant(shape, spec or Int8(), bias=bias, group_size=group_size, compute_dtype=compute_dtype,
                         device=device, dtype=dtype)

    def _reverse_padding(self) -> list[int]:
        if not isinstance(self.padding, str):
            return list(_reverse_repeat_tuple(self.padding, 2))
        pads = [0, 0] * self._dims
        if self.padding == "same":
            for d, k, i in zip(self.dilation, self.kernel_size, range(self._dims - 1, -1, -1)):
                total = d * (k - 1)
                pads[2 * i] = total // 2
                pads[2 * i + 1] = total - total // 2
        return pads

    def kernel_summary(self) -> str:
        return conv_kernels.kernel_summary(self)

    rank_fallback = True

    def storage_bytes(self) -> int:
        """The stored buffers (:meth:`QuantModule.storage_bytes`) plus the dequantized kernel a small conv keeps
        to skip dequantizing it on every call (:func:`monoquant.kernels.kept_float_bytes`), twice for a 2-d/3-d
        conv, which may keep a channels-last copy of it too (on CPU: ``dequant_conv_channels_last`` in
        :mod:`monoquant.conv_kernels`); counted whether or not a forward has built them yet."""
        kept = kernels.kept_float_bytes(self)
        return super().storage_bytes() + (2 * kept if self._dims > 1 else kept)

    @classmethod
    def empty_for_weight(cls, shape: tuple[int, ...], bias: bool, spec: WeightSpec, **kwargs: Any) -> QuantModule:
        return cls(shape[1], shape[0], tuple(shape[2:]), bias=bias, spec=spec, **kwargs)

    def input_spec(self) -> tuple[int | None, int]:
        return self.in_channels, -(self._dims + 1)

    def gptq_geometry(self) -> ConvGeometry:
        return ConvGeometry.of(self)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # the float type's name: keyword callers work
        run = call_plans.lookup(self, input, True)  # an input like one before: one lookup, then the conv
        if run is not None:
            return run(self, input)
        x = self.prepare_input(input)
        if torch.compiler.is_compiling():  # one custom op per layer for torch.compile / torch.export
            return ops.conv(self, x)
        return conv_kernels.conv(self, x, raw_ok=x is input)

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The float path for prepared input ``x``: the input fake-quantized (with INT8 activations), the kernel
        dequantized (or the float weight GPTQ waits with), ``F.conv*`` in the compute dtype (else ``x``'s);
        what calibration passes run, and what every conv kernel is measured against."""
        dtype = self.compute_dtype or x.dtype
        weight = self.compute_weight(dtype, "dequant_conv")
        bias = None if self.bias is None else self.bias.to(dtype)
        x = self.quantize_input(x, sample_dims=self._dims + 1)  # static ones raise until frozen
        return self.float_conv(x.to(dtype), weight, bias).to(x.dtype)

    def float_conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.conv*`` of ``x`` with ``weight`` (``[out, in/groups, *kernel]``) and this layer's geometry."""
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return self._conv(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return self._conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
             f", padding={self.padding}")
        if self.dilation != (1,) * self._dims:
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s + super().extra_repr()


@register_layer
class QuantConv1d(_QuantConvNd):
    """Quantized ``nn.Conv1d``."""

    float_module_type = nn.Conv1d
    _dims = 1
    _conv = staticmethod(F.conv1d)
    float_weight_ranks = (3,)


@register_layer
class QuantConv2d(_QuantConvNd):
    """Quantized ``nn.Conv2d``."""

    float_module_type = nn.Conv2d
    _dims = 2
    _conv = staticmethod(F.conv2d)
    float_weight_ranks = (4,)


@register_layer
class QuantConv3d(_QuantConvNd):
    """Quantized ``nn.Conv3d``."""

    float_module_type = nn.Conv3d
    _dims = 3
    _conv = staticmethod(F.conv3d)
    float_weight_ranks = (5,)
