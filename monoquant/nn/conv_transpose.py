"""``QuantConvTranspose2d``: a drop-in replacement for ``nn.ConvTranspose2d`` with a quantized kernel.

``nn.ConvTranspose2d`` stores its weight ``[in_channels, out_channels/groups, kh, kw]``; quantized, each output
channel is one row: the stored layout is ``[out_channels, in_channels/groups, kh, kw]`` (:meth:`float_weight`
and its inverse :meth:`float_layout` convert, groups included), so INT4 groups run along (input channel x kernel)
as for ``QuantConv2d``. ``forward`` dequantizes the (small) kernel and calls ``F.conv_transpose2d``.

GPTQ sees the layer as the direct convolution it equals: the input with ``stride - 1`` zeros between samples,
padded by ``dilation * (kernel - 1) - padding`` (plus ``output_padding`` after), stride 1, the kernel flipped
(:class:`TransposedConvGeometry` makes those patches in the stored weight's order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from ..formats import Int8, WeightSpec
from ..im2col import ConvGeometry, conv_patches
from .module import QuantModule
from .registry import register_layer


@dataclass(frozen=True)
class TransposedConvGeometry(ConvGeometry):
    """The direct convolution a transposed one equals (stride 1, ``pads`` as in the module docstring), on the
    input spread out by ``spread`` (the transposed conv's stride)."""

    spread: tuple[int, ...] = (1, 1)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """``[groups, rows, in/groups * kh * kw]`` patches ordered like the stored weight's rows."""
        if x.dim() == 3:
            x = x.unsqueeze(0)
        (sh, sw), (h, w) = self.spread, x.shape[-2:]
        spread = x.new_zeros(*x.shape[:-2], (h - 1) * sh + 1, (w - 1) * sw + 1)
        spread[..., ::sh, ::sw] = x
        p = conv_patches(spread, self)
        kh, kw = self.kernel_size
        flipped = p.reshape(*p.shape[:2], -1, kh, kw).flip(-1, -2)  # the direct conv's kernel is the flipped one
        return flipped.reshape(p.shape)


@register_layer
class QuantConvTranspose2d(QuantModule):
    """Quantized ``nn.ConvTranspose2d`` (``padding_mode="zeros"``, the only mode PyTorch supports for it)."""

    float_module_type = nn.ConvTranspose2d
    GEOMETRY = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "output_padding", "groups",
                "dilation")
    kernel_family = "conv"
    float_weight_ranks = (4,)  # not a rank fallback: a 4-D checkpoint weight is a QuantConv2d unless --layer says so

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        output_padding: int | tuple[int, int] = 0,
        groups: int = 1,
        bias: bool = True,
        dilation: int | tuple[int, int] = 1,
        spec: WeightSpec | None = None,
        *,
        group_size: int | None = None,
        compute_dtype: torch.dtype | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.padding = _pair(kernel_size), _pair(stride), _pair(padding)
        self.output_padding, self.dilation = _pair(output_padding), _pair(dilation)
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._init_quant(shape, spec or Int8(), bias=bias, group_size=group_size, compute_dtype=compute_dtype,
                         device=device, dtype=dtype)

    # ---- layouts: float [in, out/g, kh, kw] <-> stored [out, in/g, kh, kw] ---------------------------------
    @staticmethod
    def _swap_in_out(w: torch.Tensor, groups: int) -> torch.Tensor:
        """``[A, B/g, kh, kw]`` with A in g groups -> ``[B, A/g, kh, kw]`` (its own inverse with A and B swapped)."""
        a, b_g = w.shape[:2]
        w = w.reshape(groups, a // groups, b_g, *w.shape[2:]).transpose(1, 2)
        return w.reshape(groups * b_g, a // groups, *w.shape[3:])

    @classmethod
    def float_weight(cls, module: nn.Module) -> torch.Tensor:
        return cls._swap_in_out(module.weight, getattr(module, "groups", 1))  # a bare tensor (CLI): one group

    def float_layout(self, weight: torch.Tensor) -> torch.Tensor:
        return self._swap_in_out(weight, self.groups)

    @classmethod
    def stored_weight_shape(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (shape[1], shape[0], *shape[2:])  # one group (what a shape alone can tell)

    @classmethod
    def empty_for_weight(cls, shape: tuple[int, ...], bias: bool, spec: WeightSpec, **kwargs: Any) -> QuantModule:
        return cls(shape[0], shape[1], tuple(shape[2:]), bias=bias, spec=spec, **kwargs)

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        if getattr(module, "padding_mode", "zeros") != "zeros":
            return f"padding_mode={module.padding_mode!r}: a transposed convolution only pads with zeros"
        return None

    # ---- the contract ------------------------------------------------------------------------------------
    def input_spec(self) -> tuple[int | None, int]:
        return self.in_channels, -3

    def gptq_geometry(self) -> TransposedConvGeometry:
        pads: list[int] = []
        for k, p, d, extra in reversed(list(zip(self.kernel_size, self.padding, self.dilation,
                                                self.output_padding))):
            pads += [d * (k - 1) - p, d * (k - 1) - p + extra]  # F.pad order: last dim first; negative crops
        return TransposedConvGeometry(self.kernel_size, (1, 1), self.dilation, tuple(pads), "zeros", self.groups,
                                      spread=self.stride)

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:  # float's names
        x = self.prepare_input(input)
        dtype = self.compute_dtype or x.dtype
        weight = self.float_layout(self.compute_weight(dtype, "dequant_conv_transpose"))
        bias = None if self.bias is None else self.bias.to(dtype)
        x = self.quantize_input(x, sample_dims=3)
        output_padding = self.output_padding if output_size is None else nn.ConvTranspose2d._output_padding(
            self, x, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation)
        y = F.conv_transpose2d(x.to(dtype), weight, bias, self.stride, self.padding, output_padding, self.groups,
                               self.dilation)
        return y.to(x.dtype)

    def kernel_summary(self) -> str:
        return "dequant_conv_transpose"  # PyTorch has no low-bit transposed convolution kernel

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if self.output_padding != (0, 0):
            s += f", output_padding={self.output_padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s + super().extra_repr()
