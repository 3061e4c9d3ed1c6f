"""The forms a quantization config may take when given to the callback, e.g. from a LightningCLI YAML file.

* a :class:`monoquant.QuantConfig`, or a bare weight format (``mq.Int4(group_size=32)``: weight-only);
* a format's kind as a string: ``"int8"``, ``"int4"``, ``"float16"``, ``"bfloat16"`` (that format's defaults);
* a format as a dict: ``{"kind": "int4", "group_size": 32, "method": "gptq"}`` (its fields and method
  options);
* a config as a dict: ``{"weights": <spec>, "activations": <spec>, "skip": {...}, "compute_dtype": "bfloat16"}``
  where each ``<spec>`` is one of the two forms above and ``skip`` holds keyword arguments of
  :meth:`monoquant.SkipRules.defaults` (``exclude``, ``include``, ``skip_head``, ``min_params``).

With ``jsonargparse`` installed (LightningCLI), importing :mod:`monoquant_lightning` also lets it build
``class_path: monoquant.QuantConfig`` / ``monoquant.Int4`` / ``monoquant.Int8`` ... entries: specs and
``QuantConfig`` are dataclasses, which jsonargparse otherwise refuses to subclass.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

import monoquant as mq
from monoquant import ConfigError, as_config, spec_from_dict

SpecLike = mq.WeightSpec | str | Mapping[str, Any]
ConfigLike = mq.QuantConfig | mq.WeightSpec | str | Mapping[str, Any]

CONFIG_KEYS = ("weights", "activations", "skip", "compute_dtype")


def coerce_spec(spec: SpecLike, where: str = "weights") -> mq.WeightSpec:
    """A weight format from a format, a kind name or a ``{"kind": ..., field: value}`` dict."""
    if isinstance(spec, mq.WeightSpec):
        return spec
    if isinstance(spec, str):
        spec = {"kind": spec}
    if not isinstance(spec, Mapping) or "kind" not in spec:
        raise ConfigError(f"{where} must be a format (mq.Int4(group_size=32)), a kind name ('int8', 'int4', "
                          f"'float16', 'bfloat16') or a dict {{'kind': 'int4', 'group_size': 32}}, got {spec!r}")
    try:
        return spec_from_dict(spec)
    except mq.SerializationError as e:
        raise ConfigError(f"{where}: {e}") from e


def coerce_config(config: ConfigLike) -> mq.QuantConfig:
    """A :class:`monoquant.QuantConfig` from any of the forms in this module's docstring."""
    if isinstance(config, (mq.QuantConfig, mq.WeightSpec)):
        return as_config(config)
    if isinstance(config, str) or (isinstance(config, Mapping) and "kind" in config):
        return as_config(coerce_spec(config))
    if not isinstance(config, Mapping):
        return as_config(config)  # raises the usual ConfigError
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown or "weights" not in config:
        raise ConfigError(f"a config dict takes the keys {list(CONFIG_KEYS)} ('weights' required), got "
                          f"{sorted(config)}; or give a format dict with a 'kind' key")
    skip = config.get("skip")
    if isinstance(skip, Mapping):
        skip = mq.SkipRules.defaults(**skip)
    dtype_name = config.get("compute_dtype")
    compute_dtype = dtype_name if not isinstance(dtype_name, str) else getattr(torch, dtype_name, dtype_name)
    activations = config.get("activations")
    return mq.QuantConfig(weights=coerce_spec(config["weights"]),
                          activations=None if activations is None else coerce_spec(activations, "activations"),
                          skip=skip, compute_dtype=compute_dtype)


def let_jsonargparse_build_configs() -> bool:
    """Allow ``class_path: monoquant.<Spec>`` / ``monoquant.QuantConfig`` in LightningCLI files (no-op without
    jsonargparse, or with one too old to have the setting); returns whether it was enabled."""
    try:
        from jsonargparse import set_parsing_settings
    except ImportError:
        return False
    try:
        set_parsing_settings(subclasses_enabled=[mq.WeightSpec, mq.QuantConfig])
    except TypeError:  # jsonargparse older than the subclasses_enabled setting: the dict forms still work
        return False
    return True
