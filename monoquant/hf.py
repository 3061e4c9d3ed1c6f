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

It also makes monoquant the reader of the Hub's INT4 checkpoints: ``from_pretrained`` of a folder (or Hub repo)
whose ``config.json`` has a GPTQ ``quantization_config`` (``quant_method "gptq"``, 4 bits, ``checkpoint_format``
``gptq``/``gptq_v2``, with or without ``desc_act``) or an AWQ one (``quant_method "awq"``, ``version "gemm"``)
loads their layers as monoquant ``Int4`` ``QuantLinear`` layers on the CPU, with bit-exact dequantized weights
(:mod:`monoquant.hub_formats`), instead of transformers' GPU-first GPTQ/AWQ backends. Such a model is then a
monoquant model (``save_pretrained`` writes monoquant's format; ``mq.save(model, f, format="gptq")`` writes
GPTQ). It does so only where transformers' own loaders cannot run (their backend ``gptqmodel`` is not installed,
so nothing a user set up is replaced); :func:`use_monoquant_for_hub_checkpoints` chooses monoquant anyway,
:func:`use_transformers_for_hub_checkpoints` hands the two methods back to transformers.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import hub_formats
from . import safetensors_io as stio
from .config import QuantConfig, WeightSpec, as_config
from .errors import ConfigError, SerializationError
from .nn import QuantModule
from .quantize import quantize_
from .serialization import FORMAT_VERSION, QUANT_METHOD, header_of, install_layers, load, stored_once

__all__ = ["HubCheckpointQuantizer", "MonoQuantConfig", "MonoQuantHfQuantizer", "attach", "detach",
           "transformers_backend_installed", "use_monoquant_for_hub_checkpoints",
           "use_transformers_for_hub_checkpoints"]


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


# ---- Hub GPTQ / AWQ checkpoints ------------------------------------------------------------------------------
class _HubSlot(nn.Module):
    """Stands in for one ``nn.Linear`` while transformers loads a Hub layer's tensors (``qweight``, ``qzeros``,
    ``scales``, ``g_idx``, ``bias``, shaped as the checkpoint has them) into its buffers; ``linear`` is the
    (meta-device) float layer it replaces, put back before the tensors are converted."""

    def __init__(self, linear: nn.Linear, tensors: dict[str, stio.TensorInfo]) -> None:
        super().__init__()
        self.__dict__["linear"] = linear  # not a submodule: its float weight is in no checkpoint
        for name, info in tensors.items():
            self.register_buffer(name, torch.empty(info.shape, dtype=info.dtype, device="meta"))


class HubCheckpointQuantizer(HfQuantizer):
    """transformers' ``from_pretrained`` of a GPTQ or AWQ checkpoint, read into monoquant's INT4 layers (see the
    module docstring). The config is transformers' own ``GPTQConfig``/``AwqConfig``, parsed from ``config.json``."""

    requires_calibration = False

    def __init__(self, quantization_config: QuantizationConfigMixin, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._slots: dict[str, _HubSlot] = {}

    def _config(self) -> dict[str, Any]:
        return hub_formats.config_dict(self.quantization_config)

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        method = hub_formats.layout_of(self._config(), "the checkpoint's quantization_config").method
        if not self.pre_quantized:
            raise ConfigError(f"monoquant reads {method.upper()} checkpoints but does not quantize float ones "
                              "while loading with a GPTQConfig/AwqConfig: load the float model with "
                              "from_pretrained(path), then call mq.quantize_(model, mq.Int4(group_size=128, "
                              f"method={method + '+gptq' if method == 'awq' else method!r}), calibration_data=...)")

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> nn.Module:
        files = list(checkpoint_files or [])
        if not files or any(not str(f).endswith(".safetensors") for f in files):
            raise SerializationError(f"monoquant reads GPTQ/AWQ checkpoints from safetensors files; this one has "
                                     f"{[Path(f).name for f in files]}: convert it to safetensors first")
        tensors = {name: info for f in files for name, info in stio.read_header(f).tensors.items()}
        where = str(Path(files[0]).parent)
        for prefix in hub_formats.hub_layers(tensors):
            linear = hub_formats.float_linear(model, prefix, where)
            parts = {n: tensors[f"{prefix}.{n}"] for n in hub_formats.HUB_TENSORS if f"{prefix}.{n}" in tensors}
            self._slots[prefix] = _HubSlot(linear, parts)
            model.set_submodule(prefix, self._slots[prefix])
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        hub: dict[str, torch.Tensor] = {}
        for prefix, slot in self._slots.items():
            hub.update({f"{prefix}.{n}": t for n, t in slot.named_buffers()})
            model.set_submodule(prefix, slot.linear)
        float_keys = {f"{prefix}.{n}" for prefix in self._slots for n in ("weight", "bias")}
        state = {k: t for k, t in model.state_dict().items() if k not in float_keys}
        self._slots.clear()
        load(model, {**state, **hub}, quantization_config=self._config())
        attach(model)  # from now on a monoquant model: save_pretrained writes monoquant's format
        return model

    def is_serializable(self) -> bool:
        return False  # never asked: the loaded model carries MonoQuantHfQuantizer

    @property
    def is_trainable(self) -> bool:
        return False


HUB_METHODS = ("gptq", "awq")
"""The ``quant_method`` values whose checkpoints monoquant can read in ``from_pretrained``."""
TRANSFORMERS_BACKEND = "gptqmodel"
"""The package transformers' own GPTQ and AWQ quantizers need (5.x); without it they refuse to load."""
_TRANSFORMERS_OWN = {method: AUTO_QUANTIZER_MAPPING[method] for method in HUB_METHODS}


def transformers_backend_installed() -> bool:
    """Whether transformers' own GPTQ/AWQ loaders can run here (their backend package is installed)."""
    return importlib.util.find_spec(TRANSFORMERS_BACKEND) is not None


def use_monoquant_for_hub_checkpoints() -> None:
    """Read GPTQ and AWQ checkpoints with monoquant in ``from_pretrained`` (what importing this module does by
    itself only where transformers' own loaders cannot run)."""
    AUTO_QUANTIZER_MAPPING.update({method: HubCheckpointQuantizer for method in HUB_METHODS})


def use_transformers_for_hub_checkpoints() -> None:
    """Give GPTQ and AWQ checkpoints back to transformers' own quantizers (its GPU backends); checkpoints already
    loaded stay as they are."""
    AUTO_QUANTIZER_MAPPING.update(_TRANSFORMERS_OWN)


if not transformers_backend_installed():  # nothing a user set up is replaced: transformers would refuse them
    use_monoquant_for_hub_checkpoints()


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
