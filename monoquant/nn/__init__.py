"""Quantized module classes that replace ``nn.Linear`` / ``nn.Conv*`` in place."""

from .conv import QuantConv1d, QuantConv2d, QuantConv3d
from .linear import QuantLinear
from .module import QuantModule

QUANT_CLASS_FOR = {
    QuantLinear.float_module_type: QuantLinear,
    QuantConv1d.float_module_type: QuantConv1d,
    QuantConv2d.float_module_type: QuantConv2d,
    QuantConv3d.float_module_type: QuantConv3d,
}
"""Float module type -> quantized class (exact types; subclasses are matched by ``quant_class_for``)."""


def quant_class_for(module) -> type[QuantModule] | None:
    """The quantized class that replaces ``module``, or ``None`` if it is not a quantizable layer."""
    for float_type, quant_type in QUANT_CLASS_FOR.items():
        if isinstance(module, float_type):
            return quant_type
    return None


__all__ = ["QuantModule", "QuantLinear", "QuantConv1d", "QuantConv2d", "QuantConv3d", "quant_class_for"]
