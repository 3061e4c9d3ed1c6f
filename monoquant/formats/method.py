"""How a weight is made, apart from how it is stored: the method (RTN, MSE, GPTQ, AWQ), its options and the
observer that chooses its ranges.

A format (:mod:`monoquant.formats.base`) holds what the stored bytes mean; a :class:`MethodConfig` holds how they
were made. A format that several methods can make (``Int8``, ``Int4``: see :func:`method_options`) carries one
:class:`MethodConfig` as its single field ``method_config``; its public spelling
``mq.Int4(group_size=128, method="gptq", act_order=True)`` builds both, and ``spec.method``, ``spec.act_order``...
read the method config back. ``spec.storage()`` is the format alone. A file header stores the storage fields in
a layer's ``spec`` entry and, separately, ``method`` (:meth:`MethodConfig.to_dict`): the provenance of the bytes,
which loading keeps.

The observer belongs to the method: it chooses the ranges the codes are rounded in, so it is part of how the bytes
were made, not of what they mean. Like today it is a prototype (each layer gets its own copy), it is not compared
and it is not written to files.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError, SerializationError

if TYPE_CHECKING:
    from ..observers import Observer

METHODS = ("rtn", "mse", "gptq", "awq", "awq+gptq")
"""Weight methods of the integer formats: round to nearest, MSE clipping search, GPTQ, activation-aware scaling
(AWQ) with its clipping search, and AWQ scales followed by GPTQ rounding."""
GPTQ_METHODS = ("gptq", "awq+gptq")
"""Methods whose rounding is GPTQ's (they take the GPTQ options and wait for calibration data)."""
MSE_RANGES = ("mse", "gptq")
"""Methods whose ranges come from the :class:`~monoquant.MSEObserver` unless an ``observer`` is given; the others use
min/max ranges (see :meth:`MethodConfig.make_observer`)."""
AWQ_METHODS = ("awq", "awq+gptq")
"""Methods that search per-input-channel scales on calibration activations (:mod:`monoquant.awq`)."""


def check_method(method: str, observer: object = None, act_order: bool | None = False, damping: float = 0.01,
                 sequential: bool | None = None, refit_scales: bool | None = None,
                 output_aware: bool | None = None) -> None:
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
    for name, value in (("sequential", sequential), ("refit_scales", refit_scales), ("output_aware", output_aware)):
        if value is not None and (method not in GPTQ_METHODS or not isinstance(value, bool)):
            raise ConfigError(f"{name} only applies to method='gptq' or 'awq+gptq' and must be True or False, "
                              f"got {value!r}")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping > 0:
        raise ConfigError(f"damping must be a positive fraction of the Hessian's mean diagonal, got {damping}")


@dataclass(frozen=True)
class MethodConfig:
    """A method and its options (see :class:`~monoquant.Int8` for what each one does); validated on creation.

    ``observer`` (an :class:`~monoquant.observers.Observer` used as a prototype, or a factory; ``None``: the
    method's default) chooses the ranges; it is neither compared nor written to files."""

    name: str = "rtn"
    act_order: bool | None = None
    damping: float = 0.01
    static_groups: bool | None = None
    refit_scales: bool | None = None
    sequential: bool | None = None
    output_aware: bool | None = None
    observer: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        check_method(self.name, self.observer, self.act_order, self.damping, self.sequential, self.refit_scales,
                     self.output_aware)
        if self.static_groups is not None and self.name not in GPTQ_METHODS:
            raise ConfigError("static_groups only applies to method='gptq' or 'awq+gptq'")

    @property
    def is_gptq(self) -> bool:
        """Whether GPTQ rounds the codes (``"gptq"``, ``"awq+gptq"``): the layer waits for calibration data."""
        return self.name in GPTQ_METHODS

    @property
    def is_awq(self) -> bool:
        """Whether per-input-channel scales are searched on calibration activations (``"awq"``, ``"awq+gptq"``)."""
        return self.name in AWQ_METHODS

    def option(self, name: str) -> Any:
        """The value of a format's method option ``name``: ``"method"`` is :attr:`name`, the others are fields."""
        return getattr(self, "name" if name == "method" else name)

    def options(self) -> dict[str, Any]:
        """The options a file records (everything but the name and the observer)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.compare and f.name != "name"}

    def make_observer(self) -> Observer:
        """A fresh weight observer: a copy of the ``observer`` prototype, or the method's default (the
        :class:`~monoquant.MSEObserver` for ``"mse"`` and ``"gptq"``, else the :class:`~monoquant.MinMaxObserver`).

        ``"awq+gptq"`` uses min/max ranges: measured with ``benchmarks/bench_accuracy.py`` (AMD EPYC Zen 4), they
        beat the MSEObserver's on both of its models, the transformer stack (INT4-g128 end-to-end SQNR 39.04 vs
        38.63 dB; g32 39.50 vs 39.57 dB) and the Llama-style model (perplexity +0.157% vs +0.243% over float),
        where for ``"gptq"`` alone the MSEObserver wins on the stack (32.53 vs 32.09 dB)."""
        from ..observers import MinMaxObserver, MSEObserver

        proto = self.observer
        if proto is None:
            return MSEObserver() if self.name in MSE_RANGES else MinMaxObserver()
        if isinstance(proto, torch.nn.Module):
            return copy.deepcopy(proto)
        if callable(proto):
            return proto()
        raise ConfigError(f"observer must be an Observer instance or a factory, got {type(proto).__name__}")

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
        known = MethodConfig().options()
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


ROUND_TO_NEAREST = MethodConfig()
"""Round to nearest with the min/max range: the default method, and how formats made one way only are made."""


# ---- the public spelling: a format's method options -------------------------------------------------------------
def _option_property(option: str) -> property:
    return property(lambda self: self.method_config.option(option),
                    doc=f"``method_config.option({option!r})``: how the weights are made (see :class:`MethodConfig`).")


def _method_repr(self: Any) -> str:
    storage = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
               if f.repr and f.name != "method_config"]
    method, default = self.method_config, ROUND_TO_NEAREST
    given = [f"{o}={method.option(o)!r}" for o in type(self).method_option_names
             if method.option(o) != default.option(o)]
    return f"{type(self).__name__}({', '.join(storage + given)})"


def method_options(cls: type) -> type:
    """Class decorator (under ``@register_format``, over ``@dataclass(frozen=True)``) of a format that several
    methods can make. Its method options are declared as init-only fields with the method's defaults
    (``method: InitVar[str] = "rtn"``), beside one field the constructor does not take,
    ``method_config: MethodConfig = field(default=ROUND_TO_NEAREST, init=False)``, which its
    ``__post_init__(self, *options)`` builds with :func:`take_method_options`. The decorator makes each option
    readable (``spec.method`` is ``spec.method_config.name``, ``spec.act_order`` is ``spec.method_config.act_order``
    ...), so ``dataclasses.replace(spec, act_order=True)`` keeps the other options, and writes the ``repr`` in the
    public spelling (``Int4(group_size=128, symmetric=False, method='gptq')``). ``spec.with_method(m)`` makes the
    format by a :class:`MethodConfig`."""
    fields = {f.name for f in dataclasses.fields(cls)}
    if "method_config" not in fields:
        raise ConfigError(f"{cls.__name__} needs a field method_config: MethodConfig to take method options")
    options = tuple(p for p in inspect.signature(cls.__init__).parameters if p != "self" and p not in fields)
    known = {"method", *(f.name for f in dataclasses.fields(MethodConfig) if f.name != "name")}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"{cls.__name__}: {unknown} are not method options (known: {sorted(known)})")
    cls.method_option_names = options
    for option in options:
        setattr(cls, option, _option_property(option))
    cls.__repr__ = _method_repr
    return cls


def take_method_options(spec: Any, given: tuple[Any, ...]) -> None:
    """Build a format's ``method_config`` from the method options passed to its constructor (``given``, in the
    order of its ``method_option_names``), validated: ``ConfigError`` names a bad option."""
    options = {("name" if o == "method" else o): v for o, v in zip(type(spec).method_option_names, given)}
    object.__setattr__(spec, "method_config", MethodConfig(**options))
