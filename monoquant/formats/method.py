"""How a weight is made, apart from how it is stored: the method (RTN, MSE, GPTQ, AWQ) and its options.

A format (:mod:`monoquant.formats.base`) holds what the stored bytes mean; a :class:`MethodConfig` holds how they
were made. The public spelling ``mq.Int4(group_size=128, method="gptq", act_order=True)`` keeps working: a format
with method fields (marked with :data:`METHOD_FIELD`) builds both, ``spec.storage()`` is the format alone and
``spec.method_config`` the method. A file header stores the storage fields in a layer's ``spec`` entry and,
separately, ``method`` (:meth:`MethodConfig.to_dict`): the provenance of the bytes, which loading keeps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, SerializationError

METHOD_FIELD = {"method": True}
"""Dataclass field metadata of a format's method fields (``field(default=..., metadata=METHOD_FIELD)``)."""

METHODS = ("rtn", "mse", "gptq", "awq", "awq+gptq")
"""Weight methods of the integer formats: round to nearest, MSE clipping search, GPTQ, activation-aware scaling
(AWQ) with its clipping search, and AWQ scales followed by GPTQ rounding."""
GPTQ_METHODS = ("gptq", "awq+gptq")
"""Methods whose rounding is GPTQ's (they take the GPTQ options and wait for calibration data)."""
AWQ_METHODS = ("awq", "awq+gptq")
"""Methods that search per-input-channel scales on calibration activations (:mod:`monoquant.awq`)."""


def check_method(method: str, observer: object = None, act_order: bool | None = False, damping: float = 0.01,
                 sequential: bool | None = None, refit_scales: bool | None = None) -> None:
    """Validate the quantization method options shared by the integer formats."""
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    if method == "mse" and observer is not None:
        raise ConfigError("method='mse' picks the MSEObserver; pass either method='mse' or observer=..., not both")
    if method == "awq" and observer is not None:
        raise ConfigError("method='awq' chooses clipping ranges by its own search on the layer output; pass either "
                          "method='awq' or observer=..., not both (method='awq+gptq' takes an observer)")
    if act_order and method not in GPTQ_METHODS:
        raise ConfigError(f"act_order=True only applies to method='gptq' or 'awq+gptq', not {method!r}")
    for name, value in (("sequential", sequential), ("refit_scales", refit_scales)):
        if value is not None and (method not in GPTQ_METHODS or not isinstance(value, bool)):
            raise ConfigError(f"{name} only applies to method='gptq' or 'awq+gptq' and must be True or False, "
                              f"got {value!r}")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping > 0:
        raise ConfigError(f"damping must be a positive fraction of the Hessian's mean diagonal, got {damping}")


@dataclass(frozen=True)
class MethodConfig:
    """A method and its options (see :class:`~monoquant.Int8` for what each one does); validated on creation."""

    name: str = "rtn"
    act_order: bool | None = None
    damping: float = 0.01
    static_groups: bool | None = None
    refit_scales: bool | None = None
    sequential: bool | None = None

    def __post_init__(self) -> None:
        check_method(self.name, None, self.act_order, self.damping, self.sequential, self.refit_scales)
        if self.static_groups is not None and self.name not in GPTQ_METHODS:
            raise ConfigError("static_groups only applies to method='gptq' or 'awq+gptq'")

    def options(self) -> dict[str, Any]:
        """The options (everything but the name)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"}

    def to_dict(self) -> dict[str, Any]:
        """The provenance a file header stores: ``{"method": name}`` plus the options that are set."""
        defaults = MethodConfig()
        return {"method": self.name, **{k: v for k, v in self.options().items() if v != getattr(defaults, k)}}

    @classmethod
    def from_dict(cls, d: object, where: str = "file header") -> MethodConfig:
        """Inverse of :meth:`to_dict`, validating every field (``SerializationError`` names the bad one)."""
        if not isinstance(d, Mapping) or not isinstance(d.get("method"), str):
            raise SerializationError(f"{where}: a method entry must be an object with a string 'method', got {d!r}")
        options = {k: v for k, v in d.items() if k != "method"}
        known = {f.name: f.default for f in dataclasses.fields(cls) if f.name != "name"}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise SerializationError(f"{where}: unknown method option(s) {unknown}; was the file written by a newer "
                                     "monoquant?")
        for name, value in options.items():
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)) if name == "damping" else (
                value is None or isinstance(value, bool))
            if not ok:
                raise SerializationError(f"{where}: method option {name!r} has the wrong type: {value!r}")
        try:
            return cls(d["method"], **options)
        except ConfigError as e:
            raise SerializationError(f"{where}: invalid method {dict(d)}: {e}") from e
