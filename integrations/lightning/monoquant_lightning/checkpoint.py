"""Restoring a quantized LightningModule from a Lightning checkpoint.

A checkpoint saved after :class:`~monoquant_lightning.PostTrainingQuantization` ran holds the quantized
layers' buffers (``qweight``, ``scale``, ``zero_point``...) in ``checkpoint["state_dict"]``, and the
callback's state (under its ``state_key``) lists which layers were quantized with which spec. A freshly
constructed LightningModule has float layers at those names, so the quantized structure has to be put back
*before* ``load_state_dict``:

* with the callback in ``Trainer(callbacks=[...])``, ``trainer.test(model, ckpt_path=...)`` (or
  ``validate``/``predict``/``fit``) does it for you;
* outside the Trainer, :func:`load_quantized_checkpoint` does it for a module you constructed;
* for ``MyModule.load_from_checkpoint(path)``, derive the module from :class:`QuantizedCheckpointMixin`
  (``class MyModule(QuantizedCheckpointMixin, L.LightningModule)``), whose ``on_load_checkpoint`` hook calls
  :func:`restore_quantized_structure`.

The structure is rebuilt with :func:`monoquant.quantize_` restricted to exactly the stored layer names
(the float weights it quantizes are placeholders that ``load_state_dict`` then overwrites), and checked
layer by layer against the stored schemes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

import monoquant as mq
from monoquant import SerializationError, exact_pattern, spec_from_dict, spec_to_dict

STATE_FORMAT = 1
"""Version of the callback state layout (``state["format"]``)."""


def config_to_dict(config: mq.QuantConfig) -> dict[str, Any]:
    """The parts of a :class:`~monoquant.QuantConfig` that determine the quantized structure."""
    return {
        "weights": spec_to_dict(config.weights),
        "activations": spec_to_dict(config.activations) if config.activations is not None else None,
        "compute_dtype": str(config.compute_dtype).removeprefix("torch.") if config.compute_dtype else None,
    }


def _rebuild(module: nn.Module, weights: mq.WeightSpec, activations: mq.WeightSpec | None,
             compute_dtype: torch.dtype | None, names: list[str]) -> dict[str, str]:
    """Quantize exactly the layers ``names`` of ``module`` (placeholder weights); returns ``{name: scheme}``."""
    # the stored buffers replace whatever quantize_ computes, so the cheapest method (round to nearest, what the
    # format alone is made by) builds the structure
    weights = weights.storage()
    only = mq.SkipRules(include=[exact_pattern(n) for n in names])
    cfg = mq.QuantConfig(weights=weights, activations=activations, skip=only, compute_dtype=compute_dtype)
    # the placeholder weights' measurements mean nothing: no AccuracyWarning about them (they were checked when
    # the model was quantized)
    report = mq.quantize_(module, cfg, progress=False, on_failure="ignore")
    return {row.name: row.scheme for row in report.quantized}


LOAD_FROM_CHECKPOINT_ROUTE = ("for MyModule.load_from_checkpoint(path), define the module as "
                              "class MyModule(QuantizedCheckpointMixin, L.LightningModule) "
                              "(from monoquant_lightning import QuantizedCheckpointMixin)")
"""The one-line route for ``load_from_checkpoint``, named by the errors of this module."""

ROUTE_KEY = f"monoquant: this checkpoint holds quantized layers; {LOAD_FROM_CHECKPOINT_ROUTE}"
"""A key the callback adds to ``checkpoint["state_dict"]`` of a quantized model (an empty tensor). The routes
that understand quantized checkpoints drop it; a plain ``MyModule.load_from_checkpoint(path)`` of a module
without :class:`QuantizedCheckpointMixin` fails on it, and PyTorch's "Unexpected key(s)" message then names the
mixin and the one-line fix, instead of only listing ``qweight`` keys."""


def mark_quantized(state_dict: dict[str, Any]) -> None:
    """Add :data:`ROUTE_KEY` to a quantized model's checkpoint state dict."""
    state_dict[ROUTE_KEY] = torch.zeros(0)


def drop_route_key(state_dict: Any, prefix: str = "") -> None:
    """Remove :data:`ROUTE_KEY` (if there) before the state dict is loaded."""
    if isinstance(state_dict, dict):
        state_dict.pop(prefix + ROUTE_KEY, None)


class QuantizedCheckpointMixin:
    """Lets ``MyModule.load_from_checkpoint(path)`` load checkpoints saved after quantization.

    ``class MyModule(QuantizedCheckpointMixin, L.LightningModule): ...`` (the mixin first). Its
    ``on_load_checkpoint`` puts the quantized layers the checkpoint stores back into the freshly constructed
    module (:func:`restore_quantized_structure`) before Lightning loads the state dict, then calls the next
    ``on_load_checkpoint`` in the MRO (yours, if you define one in the class). Float checkpoints load as usual.
    """

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_quantized_structure(self, checkpoint)  # type: ignore[arg-type]
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]


def float_layers_in(module: nn.Module, state_dict: dict[str, Any], prefix: str = "") -> list[str]:
    """Quantized layers of ``module`` for which ``state_dict`` holds a float ``weight`` and no ``qweight``
    (a checkpoint saved before quantization, restored into the quantized module)."""
    return [name for name, m in module.named_modules() if isinstance(m, mq.QuantModule)
            and f"{prefix}{name}.weight" in state_dict and f"{prefix}{name}.qweight" not in state_dict]


def _match_state(module: nn.Module, names: list[str], keys: set[str], prefix: str = "") -> None:
    """Drop calibration-time submodules of the rebuilt layers that the saved state no longer has.

    A freshly quantized layer may carry modules that exist only until ``mq.freeze`` (e.g. an activation
    observer); the saved model had dropped them, so its state dict has none of their keys.
    """
    for name in names:
        layer = module.get_submodule(name)
        for sub_name, sub in list(layer.named_modules()):
            if not sub_name or not any(True for _ in sub.state_dict()):
                continue
            where = f"{prefix}{name}.{sub_name}."
            if not any(k.startswith(where) for k in keys):
                parent_name, _, attr = sub_name.rpartition(".")
                parent = layer.get_submodule(parent_name) if parent_name else layer
                if attr in parent._modules:
                    setattr(parent, attr, None)


def _check_names(module: nn.Module, names: list[str]) -> None:
    have = dict(module.named_modules())
    missing = [n for n in names if n not in have]
    if missing:
        raise SerializationError(f"the checkpoint has quantized layers {missing} that {type(module).__name__} "
                                 "does not have; construct the same model class the checkpoint was saved from, "
                                 "with the same arguments")


def restore_quantized_structure(module: nn.Module, checkpoint: dict[str, Any], state_key: str | None = None) -> bool:
    """Swap the layers a checkpoint stores quantized into ``module`` (in place), ready for ``load_state_dict``.

    Args:
        module: the (float) LightningModule or ``nn.Module`` the checkpoint was saved from, freshly
            constructed (finite weights; they are placeholders).
        checkpoint: the loaded checkpoint dict (``torch.load(path, weights_only=False)`` or the argument
            of ``on_load_checkpoint``).
        state_key: the callback's ``state_key``; needed only when the checkpoint holds several
            ``PostTrainingQuantization`` states.

    Returns:
        ``True`` if layers were swapped; ``False`` if the checkpoint holds no quantized model or ``module``
        already has the quantized structure.

    Raises:
        SerializationError: the checkpoint's layers don't match ``module`` (names or schemes).

    Also drops :data:`ROUTE_KEY` from ``checkpoint["state_dict"]``, so the state dict then loads strictly.
    """
    drop_route_key(checkpoint.get("state_dict"))
    state = find_callback_state(checkpoint, state_key)
    if state is None:
        stored = quantized_names(checkpoint.get("state_dict") or {})
        if stored:
            raise SerializationError(
                f"the checkpoint stores quantized layers {stored} but no PostTrainingQuantization state (saved with "
                "weights_only=True?); load it with the callback in the Trainer, which rebuilds the layers from its "
                "config: Trainer(callbacks=[PostTrainingQuantization(config)]).test(model, ckpt_path=...); or "
                "save the checkpoint with the callback state (trainer.save_checkpoint(path)) and "
                f"{LOAD_FROM_CHECKPOINT_ROUTE}")
        return False
    if not state.get("quantized"):
        return False
    layers: dict[str, str] = state["layers"]
    if any(isinstance(m, mq.QuantModule) for m in module.modules()):
        return False
    _check_names(module, list(layers))
    cfg = state["config"]
    got = _rebuild(module, spec_from_dict(cfg["weights"]),
                   spec_from_dict(cfg["activations"]) if cfg.get("activations") else None,
                   getattr(torch, cfg["compute_dtype"]) if cfg.get("compute_dtype") else None, list(layers))
    if isinstance(checkpoint.get("state_dict"), dict):
        _match_state(module, list(layers), set(checkpoint["state_dict"]))
    if got != layers:
        diff = sorted(n for n in set(got) | set(layers) if got.get(n) != layers.get(n))
        raise SerializationError(f"could not rebuild the quantized structure stored in the checkpoint: layers "
                                 f"{diff} differ (stored {[layers.get(n) for n in diff]}, rebuilt "
                                 f"{[got.get(n) for n in diff]}); was the model's architecture changed?")
    return True


def restore_from_state_dict(module: nn.Module, state_dict: dict[str, Any], config: mq.QuantConfig,
                            prefix: str = "") -> list[str]:
    """Swap in quantized layers wherever ``state_dict`` holds a ``qweight`` for a float layer of ``module``.

    Used by the callback inside the Trainer (a ``load_state_dict`` pre-hook), where the checkpoint's callback
    state is not available yet: the layers come from the state dict, the schemes from ``config``. Returns the
    swapped names; raises :class:`~monoquant.SerializationError` if the stored buffers don't have the shapes
    and dtypes ``config`` gives (the checkpoint was quantized with another config).
    """
    modules = dict(module.named_modules())
    names = [n for n in quantized_names(state_dict, prefix) if not isinstance(modules.get(n), mq.QuantModule)]
    if not names:
        return []
    _check_names(module, names)
    _rebuild(module, config.weights, config.activations, config.compute_dtype, names)
    _match_state(module, names, set(state_dict), prefix)
    swapped = dict(module.named_modules())
    for name in names:
        for key, buf in swapped[name].state_dict().items():
            stored = state_dict.get(f"{prefix}{name}.{key}")
            if stored is not None and (stored.shape != buf.shape or stored.dtype != buf.dtype):
                raise SerializationError(
                    f"layer {name!r}: the checkpoint stores {key} as {stored.dtype} {tuple(stored.shape)} but this "
                    f"callback's config gives {buf.dtype} {tuple(buf.shape)}; create PostTrainingQuantization with "
                    "the config the checkpoint was quantized with")
    return names


def quantized_names(state_dict: dict[str, Any], prefix: str = "") -> list[str]:
    """Names (below ``prefix``) of the layers ``state_dict`` stores quantized, i.e. with a ``qweight``."""
    return [k[len(prefix):-len(".qweight")] for k in state_dict if k.startswith(prefix) and k.endswith(".qweight")]


def find_callback_state(checkpoint: dict[str, Any], state_key: str | None = None) -> dict[str, Any] | None:
    """The ``PostTrainingQuantization`` state inside a checkpoint (``None`` if there is none).

    States are recognised by their content, so a subclass of the callback (whose ``state_key`` starts with
    its own class name) is found too."""
    states = {k: v for k, v in (checkpoint.get("callbacks") or {}).items()
              if isinstance(v, dict) and {"format", "layers", "config"} <= v.keys()}
    if state_key is not None:
        return states.get(state_key)
    if len(states) > 1:
        raise SerializationError(f"the checkpoint holds several PostTrainingQuantization states {sorted(states)}; "
                                 "pass state_key=callback.state_key to choose one")
    return next(iter(states.values()), None)


def load_quantized_checkpoint(module: nn.Module, path: str | Path, *, state_key: str | None = None,
                              map_location: Any = "cpu", strict: bool = True) -> nn.Module:
    """Load a Lightning checkpoint saved after quantization into a freshly constructed ``module``.

    Outside the Trainer: ``model = load_quantized_checkpoint(MyLitModule(), "last.ckpt")``. Puts back the
    quantized layers (see :func:`restore_quantized_structure`), then loads ``checkpoint["state_dict"]``;
    the result gives outputs identical to the model that was saved. Returns ``module``.
    """
    checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    if "state_dict" not in checkpoint:
        raise SerializationError(f"{path} is not a Lightning checkpoint (no 'state_dict' entry)")
    floats = float_layers_in(module, checkpoint["state_dict"])
    if floats:
        raise SerializationError(
            f"{path} holds float weights (saved before quantization) for layers {floats} that "
            f"{type(module).__name__} has quantized; load it into a freshly constructed (float) module and quantize "
            "that (mq.quantize_(module, config)), or restore it in a Trainer with the PostTrainingQuantization "
            "callback, which quantizes the float weights again")
    restore_quantized_structure(module, checkpoint, state_key)
    module.load_state_dict(checkpoint["state_dict"], strict=strict)
    return module
