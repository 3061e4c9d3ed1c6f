"""The one table of quantized layer classes: ``quantize_``, ``load``, the CLI and the report all read it.

A layer class registers itself with :func:`register_layer` and declares what it replaces: a float module type
(``float_module_type = nn.Linear``) or, for libraries monoquant must not import, a dotted path matched against
the float module's class hierarchy (``float_module_path = "transformers.pytorch_utils.Conv1D"``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ..errors import ConfigError

if TYPE_CHECKING:
    from .module import QuantModule

LAYERS: dict[str, type[QuantModule]] = {}
"""Registered quantized layer classes by class name (the name stored in file headers)."""


def register_layer(cls: type[QuantModule]) -> type[QuantModule]:
    """Class decorator: make ``cls`` a quantized layer type that ``quantize_`` swaps in and ``load`` rebuilds."""
    if getattr(cls, "float_module_type", None) is None and not getattr(cls, "float_module_path", None):
        raise ConfigError(f"{cls.__name__} must declare float_module_type (a class) or float_module_path "
                          "('package.module.Class') to be registered")
    other = LAYERS.get(cls.__name__)
    if other is not None and other is not cls:
        raise ConfigError(f"a quantized layer class named {cls.__name__} is already registered ({other.__module__})")
    LAYERS[cls.__name__] = cls
    return cls


def _class_paths(module: nn.Module) -> set[str]:
    return {f"{t.__module__}.{t.__qualname__}" for t in type(module).__mro__}


def replaces(cls: type[QuantModule], module: nn.Module) -> bool:
    """Whether layer class ``cls`` is the quantized twin of float ``module`` (subclasses included)."""
    float_type = getattr(cls, "float_module_type", None)
    if float_type is not None and isinstance(module, float_type):
        return True
    path = getattr(cls, "float_module_path", None)
    return bool(path) and path in _class_paths(module)


def quant_class_for(module: nn.Module) -> type[QuantModule] | None:
    """The quantized class that replaces ``module``, or ``None`` if it is not a quantizable layer.

    An exact float type wins over a base-class match (so a class registered for a subclass of ``nn.Linear``
    takes precedence over :class:`QuantLinear`)."""
    matches = [cls for cls in LAYERS.values() if replaces(cls, module)]
    for cls in matches:
        if getattr(cls, "float_module_type", None) is type(module):
            return cls
    return matches[-1] if matches else None


def layer_class(name: object) -> type[QuantModule] | None:
    """The registered layer class called ``name`` (as stored in a file header), or ``None``."""
    return LAYERS.get(name) if isinstance(name, str) else None
