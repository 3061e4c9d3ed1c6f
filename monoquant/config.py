"""User-facing configuration: weight/activation specs (:class:`Int8`, :class:`Int4`, :class:`Float16`,
:class:`BFloat16`) and :class:`QuantConfig` which bundles them with skip rules.

Specs are frozen dataclasses: hashable, comparable, and safe to share between layers. An ``observer``
given to a spec is a *prototype*: each layer gets its own deep copy (or a fresh instance when a factory
callable is given).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from .errors import ConfigError
from .qtypes import PerChannel, PerGroup, PerTensor, QType

if TYPE_CHECKING:
    from .observers import Observer
    from .rules import SkipRules

ObserverLike = Any  # an Observer instance (used as a prototype) or a zero-argument factory returning one

KERNEL_GROUP_SIZES = (256, 128, 64, 32)
"""Group sizes the packed INT4 kernels accept, largest first."""

METHODS = ("rtn", "mse", "gptq")


def _check_method(method: str, observer: object = None, act_order: bool = False, damping: float = 0.01) -> None:
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    if method == "mse" and observer is not None:
        raise ConfigError("method='mse' picks the MSEObserver; pass either method='mse' or observer=..., not both")
    if act_order and method != "gptq":
        raise ConfigError("act_order=True only applies to method='gptq'")
    if not damping > 0:
        raise ConfigError(f"damping must be a positive fraction of the Hessian's mean diagonal, got {damping}")


@dataclass(frozen=True)
class WeightSpec:
    """Base class of all specs. Subclasses describe storage; :mod:`monoquant.schemes` implements it."""

    @property
    def kind(self) -> str:  # "int8", "int4", "float16", "bfloat16"
        raise NotImplementedError

    def describe(self, group_size: int | None = None) -> str:
        return self.kind

    def make_observer(self) -> Observer:
        """A fresh observer for one tensor: a copy of the prototype, or the default (min/max)."""
        from .observers import MinMaxObserver, MSEObserver

        proto = getattr(self, "observer", None)
        if proto is None:
            return MSEObserver() if getattr(self, "method", "rtn") in ("mse", "gptq") else MinMaxObserver()
        if isinstance(proto, torch.nn.Module):
            return copy.deepcopy(proto)
        if callable(proto):
            return proto()
        raise ConfigError(f"observer must be an Observer instance or a factory, got {type(proto).__name__}")


@dataclass(frozen=True)
class Int8(WeightSpec):
    """8-bit integers. As a weight spec: per-output-channel (default) or per-tensor, symmetric by default.

    As an activation spec: per-tensor, affine by default (``symmetric=False``), qparams from ``observer``
    (default :class:`~monoquant.MinMaxObserver`) after calibration; ``dynamic=True`` computes per-token
    scales on the fly instead of calibrating. ``granularity`` and ``method`` only apply to weights.

    ``method``: ``"rtn"`` (round to nearest with the qparams of ``observer``), ``"mse"`` (the
    :class:`~monoquant.MSEObserver` clipping search) or ``"gptq"`` (needs calibration data; see
    :mod:`monoquant.gptq`, with ``act_order`` (``None``: GPTQ's default, on) and ``damping``, a fraction of
    the Hessian's mean diagonal; ranges from ``observer``, default the MSEObserver).
    """

    symmetric: bool | None = None
    granularity: Literal["channel", "tensor"] = "channel"
    observer: ObserverLike = field(default=None, compare=False)
    method: str = "rtn"
    dynamic: bool = False
    act_order: bool | None = None
    damping: float = 0.01

    def __post_init__(self) -> None:
        if self.granularity not in ("channel", "tensor"):
            raise ConfigError(f"Int8 granularity must be 'channel' or 'tensor', got {self.granularity!r}")
        _check_method(self.method, self.observer, self.act_order, self.damping)

    @property
    def kind(self) -> str:
        return "int8"

    def weight_qtype(self) -> QType:
        return QType(8, symmetric=True if self.symmetric is None else self.symmetric)

    def activation_qtype(self) -> QType:
        return QType(8, symmetric=False if self.symmetric is None else self.symmetric)

    def weight_granularity(self) -> PerTensor | PerChannel:
        return PerChannel(0) if self.granularity == "channel" else PerTensor()

    def describe(self, group_size: int | None = None) -> str:
        return f"int8-{'sym' if self.weight_qtype().symmetric else 'affine'}-{self.granularity}"


@dataclass(frozen=True)
class Int4(WeightSpec):
    """4-bit weights, group-wise along the input dimension, packed two per byte, affine by default.

    ``group_size`` must be positive. When a layer's input size is not a multiple of it, the group is chosen
    by :meth:`resolve_group_size`: one group per row if the row is no longer than ``group_size``; else the
    largest of ``group_size/2, group_size/4, ...`` (down to 32) that divides the row; else the layer is
    skipped and reported.

    ``method``, ``act_order``, ``damping``: as for :class:`Int8` (``"rtn"``, ``"mse"`` or ``"gptq"``).
    ``static_groups`` (GPTQ; ``None``: on): every group's qparams come from the original weight before GPTQ
    starts, instead of from its error-compensated weights when its first column comes up; the stored layout
    is the same either way.
    """

    group_size: int = 128
    symmetric: bool = False
    observer: ObserverLike = field(default=None, compare=False)
    method: str = "rtn"
    act_order: bool | None = None
    damping: float = 0.01
    static_groups: bool | None = None

    def __post_init__(self) -> None:
        PerGroup(self.group_size)  # validates
        _check_method(self.method, self.observer, self.act_order, self.damping)
        if self.static_groups is not None and self.method != "gptq":
            raise ConfigError("static_groups only applies to method='gptq'")

    @property
    def kind(self) -> str:
        return "int4"

    def weight_qtype(self) -> QType:
        return QType(4, symmetric=self.symmetric)

    def resolve_group_size(self, cols: int) -> int | None:
        """The group size used for rows of length ``cols``, or ``None`` if no acceptable group exists."""
        if cols % self.group_size == 0:
            return self.group_size
        if cols <= self.group_size:
            return cols
        g = self.group_size // 2
        while g >= 32:
            if cols % g == 0:
                return g
            g //= 2
        return None

    def describe(self, group_size: int | None = None) -> str:
        return f"int4-{'sym' if self.symmetric else 'affine'}-g{group_size or self.group_size}"


@dataclass(frozen=True)
class Float16(WeightSpec):
    """Weights stored as IEEE half precision (no scales)."""

    @property
    def kind(self) -> str:
        return "float16"

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch.float16


@dataclass(frozen=True)
class BFloat16(WeightSpec):
    """Weights stored as bfloat16 (no scales)."""

    @property
    def kind(self) -> str:
        return "bfloat16"

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch.bfloat16


@dataclass
class QuantConfig:
    """What to quantize and how.

    Args:
        weights: the weight spec (``Int8()``, ``Int4(group_size=...)``, ``Float16()``, ``BFloat16()``).
        activations: optional activation spec (``Int8(...)``) for static or dynamic activation quantization.
        skip: :class:`~monoquant.SkipRules`; ``None`` means ``SkipRules.defaults()``.
        compute_dtype: ``None`` lets the kernel table choose (bf16 where a low-bit kernel or a fast bf16
            GEMM exists); ``torch.float32`` forces float32 compute everywhere.
    """

    weights: WeightSpec
    activations: Int8 | None = None
    skip: SkipRules | None = None
    compute_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.weights, WeightSpec):
            raise ConfigError(
                f"weights must be a spec such as mq.Int8() or mq.Int4(group_size=128), got {self.weights!r}"
            )
        if self.activations is not None and not isinstance(self.activations, Int8):
            raise ConfigError(f"activations must be mq.Int8(...) or None, got {self.activations!r}")
        # options that only mean something on the other side would otherwise be silently ignored
        if isinstance(self.weights, Int8) and self.weights.dynamic:
            raise ConfigError("dynamic=True is for activations: pass activations=mq.Int8(dynamic=True) "
                              "(weights are always quantized ahead of time)")
        if self.activations is not None and self.activations.method == "gptq":
            raise ConfigError("method='gptq' is for weights: pass weights=mq.Int8(method='gptq') or "
                              "mq.Int4(method='gptq')")
        if self.compute_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError(f"compute_dtype must be None, torch.float32, torch.bfloat16 or torch.float16, "
                              f"got {self.compute_dtype!r}")

    @property
    def needs_calibration(self) -> bool:
        """True when quantizing with this config needs calibration data: static activations or GPTQ weights."""
        acts = self.activations
        return (acts is not None and not acts.dynamic) or getattr(self.weights, "method", "rtn") == "gptq"


def as_config(config: QuantConfig | WeightSpec) -> QuantConfig:
    """Accept a full :class:`QuantConfig` or a bare weight spec (meaning weight-only quantization)."""
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, WeightSpec):
        return QuantConfig(weights=config)
    raise ConfigError(
        f"expected mq.QuantConfig(...) or a weight spec such as mq.Int4(), got {type(config).__name__}"
    )
