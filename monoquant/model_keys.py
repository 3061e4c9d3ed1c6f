"""Keys a model tells us to ignore in a checkpoint, and its non-persistent buffers after a meta-device build.

Checkpoints saved by older code often hold buffers that newer code made non-persistent (BERT's
``embeddings.position_ids``, rotary ``inv_freq``) or keys the model lists in ``_keys_to_ignore_on_load_unexpected``
(a transformers convention: regular expressions searched in each key). Non-persistent buffers are in no file, so a
model built on ``torch.device("meta")`` keeps them on meta after loading: :func:`materialize_buffers` gives them
their values the way transformers does (empty tensors, then the model's own weight init for just those). Nothing
here imports transformers: models are recognised by what they have.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn


def non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: buffer}`` of every buffer of ``model`` that ``state_dict`` leaves out."""
    out = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for name in module._non_persistent_buffers_set:
            buf = module._buffers.get(name)
            if buf is not None:
                out[f"{prefix}.{name}" if prefix else name] = buf
    return out


def ignorable_keys(model: nn.Module, keys: Iterable[str]) -> list[str]:
    """The ``keys`` (sorted) that ``model`` declares ignorable: its non-persistent buffers' names and those matching a
    pattern of ``model._keys_to_ignore_on_load_unexpected``."""
    patterns = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    buffers = set(non_persistent_buffers(model))
    return sorted(k for k in keys if k in buffers or any(p.search(k) for p in patterns))


def materialize_buffers(model: nn.Module, device: torch.device) -> tuple[list[str], list[str]]:
    """Give every non-persistent buffer still on the meta device a value on ``device``.

    A transformers model (one with ``initialize_weights``) gets them as ``from_pretrained`` does: empty tensors,
    every other tensor marked initialized (``_is_hf_initialized``), then the model's weight init, which fills only
    the unmarked ones (``position_ids``, ``inv_freq``...). Returns ``(filled, left)``: names given values, and
    names of buffers this cannot fill (other models: their values live in code this does not know).
    """
    meta = {n: b for n, b in non_persistent_buffers(model).items() if b.device.type == "meta"}
    if not meta or not hasattr(model, "initialize_weights"):
        return [], sorted(meta)
    owners = []
    for name, buf in meta.items():
        prefix, _, attr = name.rpartition(".")
        owner = model.get_submodule(prefix) if prefix else model
        owner._buffers[attr] = torch.empty_like(buf, device=device)
        owners.append(owner)
    fresh = {id(owner._buffers[n.rpartition(".")[2]]) for owner, n in zip(owners, meta)}
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in fresh:
            t._is_hf_initialized = True
    for owner in owners:
        owner._is_hf_initialized = False
    with torch.no_grad():
        model.initialize_weights()
    return sorted(meta), []
