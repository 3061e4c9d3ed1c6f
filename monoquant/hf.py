"""transformers integration: ``save_pretrained`` / ``from_pretrained`` of monoquant models (needs the
``[transformers]`` extra; imported only by ``import monoquant.hf`` or by ``mq.quantize_`` on a transformers model).

Importing this module registers the ``"monoquant"`` quantization method with transformers
(``register_quantization_config`` / ``register_quantizer``):

* ``mq.quantize_(model, config)`` on a ``PreTrainedModel`` attaches a :class:`MonoQuantConfig` and the quantizer,
  so ``model.save_pretrained(d)`` writes the quantized tensors (sharded by transformers' ``max_shard_size``) and a
  ``quantization_config`` in ``config.json`` that holds monoquant's header (each quantized layer's entry);
* ``AutoModel*.from_pretrained(d)`` (after ``import monoquant.hf``) builds the model on the meta device, swaps in
  empty quantized layers from that header and lets transformers load the stored tensors into them: no float
  weight is ever allocated, and outputs are bit-identical to the saved model's;
* ``from_pretrained(float_checkpoint, quantization_config=MonoQuantConfig(mq.QuantConfig(...)))`` quantizes while
  loading (round-to-nearest or MSE ranges); configs that need calibration data are refused with the call to
  use instead.

``mq.load(model, d)`` reads the same folders without transformers' loader.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .config import QuantConfig, WeightSpec, as_config
from .errors import ConfigError, SerializationError
from .nn import QuantModule
from .quantize import quantize_
from .serialization import FORMAT_VERSION, QUANT_METHOD, header_of, install_layers, stored_once

__all__ = ["MonoQuantConfig", "MonoQuantHfQuantizer", "attach", "detach"]


class MonoQuantConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a monoquant model for transformers.

    Args:
        config: what ``from_pretrained`` quantizes a *float* checkpoint with (an ``mq.QuantConfig`` or a weight
            spec such as ``mq.Int8()``); not stored in ``config.json``.
        modules: the header of a quantized checkpoint: ``{layer name: entry}`` as ``mq.save`` writes it (filled
            by ``save_pretrained``; read by ``from_pretrained``).
    """

    def __init__(self, config: QuantConfig | WeightSpec | None = None, *, modules: dict[str, Any] | None = None,
                 aliases: dict[str, str] | None = None, format_version: int = FORMAT_VERSION, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.config = as_config(config) if config is not None else None
        self.modules = modules
        self.aliases = dict(aliases or {})
        self.format_version = format_version

    def to_dict(self) -> dict[str, Any]:
        """What ``config.json`` holds: the method, the header format version and the header itself."""
        return {"quant_method": QUANT_METHOD, "format_version": self.format_version, "modules": self.modules,
                "aliases": self.aliases}


class MonoQuantHfQuantizer(HfQuantizer):
    """transformers' side of monoquant: builds quantized layers before ``from_pretrained`` loads tensors (a
    quantized checkpoint), or quantizes after it (a float checkpoint with a :class:`MonoQuantConfig` config)."""

    requires_calibration = False
    quantization_config: MonoQuantConfig

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        qc = self.quantization_config
        if self.pre_quantized and qc.modules is None:
            raise SerializationError("the checkpoint's quantization_config (quant_method 'monoquant') has no "
                                     "'modules' header; save the quantized model again with save_pretrained")
        if not self.pre_quantized:
            if qc.config is None:
                raise ConfigError("MonoQuantConfig() needs the config to quantize with: "
                                  "MonoQuantConfig(mq.QuantConfig(mq.Int8()))")
            if qc.config.needs_calibration:
                raise ConfigError("this config needs calibration data (static activations or GPTQ), which "
                                  "from_pretrained cannot give: load the float model with from_pretrained(path), "
                                  "then call mq.quantize_(model, config, calibration_data=...)")

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if self.pre_quantized:
            install_layers(model, self.quantization_config.modules, "the checkpoint's quantization_config")
            _untie_quantized(model)
            aliases = {f"^{re.escape(a)}$" for a in self.quantization_config.aliases}  # filled by _share, not missing
            model._keys_to_ignore_on_load_missing = set(model._keys_to_ignore_on_load_missing or ()) | aliases
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if self.pre_quantized:
            _share(model, self.quantization_config.aliases)
        else:
            quantize_(model, self.quantization_config.config, progress=False)
            self.pre_quantized = True
        self.quantization_config.modules = header_of(model)
        return model

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, str]]:
        """Before ``save_pretrained`` writes ``config.json``: the header describes the model as it is now, and a
        tensor shared by several names (a head tied to a quantized embedding) is stored once, the other names
        recorded as aliases (safetensors refuses shared tensors; transformers knows only tied float weights)."""
        self.quantization_config.modules = header_of(model)
        state, self.quantization_config.aliases = stored_once(model.state_dict())
        return state, {}

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _untie_quantized(model: nn.Module) -> None:
    """Leave quantized layers out of transformers' tied-weight table (``{"lm_head.weight": "...embed_tokens.weight"}``):
    they have no float ``weight`` to tie; their shared buffers are tied by :func:`_share` from the header's aliases."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if not isinstance(tied, dict):
        return

    def quantized(key: str) -> bool:
        prefix = key.rpartition(".")[0]
        try:
            return isinstance(model.get_submodule(prefix), QuantModule)
        except AttributeError:
            return False

    model.all_tied_weights_keys = {t: s for t, s in tied.items() if not (quantized(t) or quantized(s))}


def _share(model: nn.Module, aliases: dict[str, str]) -> None:
    """Make each alias name the same tensor as its stored name again (transformers left the aliases empty)."""
    for alias, target in aliases.items():
        prefix, _, attr = alias.rpartition(".")
        owner = model.get_submodule(prefix) if prefix else model
        slots = owner._parameters if attr in owner._parameters else owner._buffers
        slots[attr] = model.get_parameter(target) if attr in owner._parameters else model.get_buffer(target)


register_quantization_config(QUANT_METHOD)(MonoQuantConfig)
register_quantizer(QUANT_METHOD)(MonoQuantHfQuantizer)


def attach(model: nn.Module) -> None:
    """Mark a quantized transformers model as monoquant-quantized, so that ``save_pretrained`` writes its quantized
    tensors with the header in ``config.json`` (``mq.quantize_`` calls this on transformers models)."""
    qc = MonoQuantConfig()  # the header is written by save_pretrained: layers may still be calibrating now
    quantizer = MonoQuantHfQuantizer(qc, pre_quantized=True)
    model.config.quantization_config = qc
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD


def detach(model: nn.Module) -> None:
    """Undo :func:`attach` (``mq.dequantize_`` calls this): the model saves as a float model again."""
    if isinstance(getattr(model, "hf_quantizer", None), MonoQuantHfQuantizer):
        model.hf_quantizer.remove_quantization_config(model)
