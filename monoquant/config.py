"""User-facing configuration: :class:`QuantConfig` bundles a weight format (:class:`Int8`, :class:`Int4`,
:class:`NF4`, :class:`Float16`, :class:`BFloat16`: see :mod:`monoquant.formats`), an optional activation
format and skip rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import ConfigError
from .formats import FORMATS, BFloat16, Float16, Int4, Int8, WeightSpec, method_of
from .formats.int4 import KERNEL_GROUP_SIZES

if TYPE_CHECKING:
    from .rules import SkipRules

__all__ = ["KERNEL_GROUP_SIZES", "SMOOTHQUANT_ALPHA", "BFloat16", "Float16", "Int4", "Int8", "QuantConfig",
           "WeightSpec", "as_config", "spec_named"]

SMOOTHQUANT_ALPHA = 0.5
"""SmoothQuant's default migration strength (Xiao et al., 2023: 0.5 suits most models; raise it towards 0.75 when
activation outliers are extreme, lower it when weights have outliers of their own)."""


@dataclass
class QuantConfig:
    """What to quantize and how.

    Args:
        weights: the weight format (``Int8()``, ``Int4(group_size=...)``, ``NF4()``, ``Float16()``, ``BFloat16()``,
            or any registered :class:`~monoquant.formats.WeightSpec`).
        activations: optional activation format (``Int8(...)``) for static or dynamic activation quantization.
        skip: :class:`~monoquant.SkipRules`; ``None`` means ``SkipRules.defaults()``.
        embeddings: the weight format of embedding tables (layer classes whose ``config_field`` is
            ``"embeddings"``, such as :class:`~monoquant.QuantEmbedding`); ``None`` (default) keeps them float. A
            language-model head whose weight is tied to a quantized embedding shares its quantized table.
        compute_dtype: ``None`` lets the kernel table choose (bf16 where a low-bit kernel or a fast bf16
            GEMM exists); ``torch.float32`` forces float32 compute everywhere.
        smoothquant: SmoothQuant migration strength ``alpha`` in ``[0, 1]`` for INT8 activations (needs
            ``activations=mq.Int8(...)`` and ``calibration_data``): each Linear's input channel ``j`` is divided by
            ``max|x_j|^alpha / max|W_j|^(1 - alpha)`` and its weight column multiplied by it, moving activation
            outliers into the weights; folded into the preceding norm or Linear where possible (see
            :mod:`monoquant.awq`). ``True`` means :data:`SMOOTHQUANT_ALPHA` (0.5, the paper's default); ``None``: off.
    """

    weights: WeightSpec
    activations: Int8 | None = None
    skip: SkipRules | None = None
    compute_dtype: torch.dtype | None = None
    embeddings: WeightSpec | None = None
    smoothquant: float | bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.weights, WeightSpec):
            raise ConfigError(
                f"weights must be a format such as mq.Int8() or mq.Int4(group_size=128), got {self.weights!r}"
            )
        if self.activations is not None and not getattr(self.activations, "supports_activations", False):
            raise ConfigError(f"activations must be mq.Int8(...) or None, got {self.activations!r}")
        # options that only mean something on the other side would otherwise be silently ignored
        if getattr(self.weights, "dynamic", False):
            raise ConfigError("dynamic=True is for activations: pass activations=mq.Int8(dynamic=True) "
                              "(weights are always quantized ahead of time)")
        if self.activations is not None and method_of(self.activations).name != "rtn":
            m = method_of(self.activations).name
            raise ConfigError(f"method={m!r} is for weights: pass weights=mq.Int8(method={m!r}) or "
                              f"mq.Int4(method={m!r})")
        self._check_smoothquant()
        if self.embeddings is not None:
            if not isinstance(self.embeddings, WeightSpec):
                raise ConfigError(f"embeddings must be a weight format such as mq.Int8() or None, got "
                                  f"{self.embeddings!r}")
            embedding_method = method_of(self.embeddings)
            if embedding_method.is_gptq or embedding_method.is_awq or \
                    getattr(self.embeddings, "dynamic", False):
                raise ConfigError("embeddings are looked up, not multiplied: GPTQ, AWQ and dynamic=True do not apply; "
                                  "pass e.g. embeddings=mq.Int8() or mq.Int4(group_size=64)")
        if self.compute_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError(f"compute_dtype must be None, torch.float32, torch.bfloat16 or torch.float16, "
                              f"got {self.compute_dtype!r}")

    def _check_smoothquant(self) -> None:
        alpha = self.smoothquant
        if alpha is None:
            return
        if alpha is False or not isinstance(alpha, (bool, int, float)) or not 0 <= float(alpha) <= 1:
            raise ConfigError(f"smoothquant must be None, True (alpha {SMOOTHQUANT_ALPHA}) or a migration strength "
                              f"alpha in [0, 1], got {alpha!r}")
        if self.activations is None:
            raise ConfigError("smoothquant moves activation outliers into the weights for INT8 activations: pass "
                              "activations=mq.Int8() with it, or drop smoothquant")
        if method_of(self.weights).is_awq:
            raise ConfigError("smoothquant and method='awq' both scale each layer's input channels; pick one "
                              "(smoothquant for INT8 activations, awq for low-bit weights)")

    @property
    def smoothquant_alpha(self) -> float | None:
        """The SmoothQuant migration strength in effect (``None``: off)."""
        if self.smoothquant is None:
            return None
        return SMOOTHQUANT_ALPHA if self.smoothquant is True else float(self.smoothquant)

    @property
    def needs_calibration(self) -> bool:
        """True when quantizing with this config needs calibration data: static activations, GPTQ or AWQ weights."""
        acts = self.activations
        method = method_of(self.weights)
        return ((acts is not None and not acts.dynamic) or method.is_gptq or method.is_awq
                or self.smoothquant is not None)


def spec_named(name: str) -> WeightSpec:
    """The registered format called ``name`` (its ``kind``: ``"int8"``, ``"int4"``, ``"nf4"``...) with its
    defaults, e.g. ``spec_named("int4") == mq.Int4()``."""
    cls = FORMATS.get(name.strip().lower())
    if cls is None:
        raise ConfigError(f"no weight format is called {name!r}; the registered ones are {sorted(FORMATS)} "
                          "(or pass a format such as mq.Int4(group_size=64))")
    return cls()


def as_config(config: QuantConfig | WeightSpec | str) -> QuantConfig:
    """Accept a full :class:`QuantConfig`, a bare weight format (meaning weight-only quantization) or a format's
    name such as ``"int4"`` (that format with its defaults, weight-only)."""
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, str):
        config = spec_named(config)
    if isinstance(config, WeightSpec):
        return QuantConfig(weights=config)
    raise ConfigError(
        f"expected mq.QuantConfig(...), a weight format such as mq.Int4() or a format name such as 'int4', got "
        f"{type(config).__name__}"
    )
