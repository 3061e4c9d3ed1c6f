"""Quantized module classes that replace ``nn.Linear`` / ``nn.Conv*`` in place."""

import torch
from torch import nn

from .conv import QuantConv1d, QuantConv2d, QuantConv3d
from .hf_conv1d import QuantHFConv1D
from .linear import QuantLinear
from .module import QuantModule

QUANT_CLASS_FOR = {
    QuantLinear.float_module_type: QuantLinear,
    QuantConv1d.float_module_type: QuantConv1d,
    QuantConv2d.float_module_type: QuantConv2d,
    QuantConv3d.float_module_type: QuantConv3d,
    QuantHFConv1D.float_module_type: QuantHFConv1D,  # a LazyType: matched by class path, never imported
}
"""Float module type -> quantized class (exact types; subclasses are matched by ``quant_class_for``)."""


def quant_class_for(module) -> type[QuantModule] | None:
    """The quantized class that replaces ``module``, or ``None`` if it is not a quantizable layer."""
    for float_type, quant_type in QUANT_CLASS_FOR.items():
        if isinstance(module, float_type):
            return quant_type
    return None


def float_weight(module: nn.Module) -> torch.Tensor:
    """The weight of quantizable float ``module`` laid out ``[out, in, ...]`` as quantized layers store it (a view:
    transformers' ``Conv1D`` stores it ``[in, out]``)."""
    return quant_class_for(module).float_weight(module)


__all__ = ["QuantModule", "QuantLinear", "QuantConv1d", "QuantConv2d", "QuantConv3d", "QuantHFConv1D",
           "float_weight", "quant_class_for"]
