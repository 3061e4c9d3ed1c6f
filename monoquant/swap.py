"""The one place that replaces modules inside a model, and puts them back.

A module can be registered under several parents (a layer used twice), carry hooks whose handles users keep,
and be an ``nn.TransformerEncoderLayer``'s ``linear1``/``linear2`` (whose fused fast path would bypass a quantized
layer). :class:`Swap` replaces modules everywhere they are registered, moves their hook dicts (so existing handles'
``remove()`` keeps working) and keeps a journal, so that :meth:`Swap.undo` restores the model exactly: the same
module objects under the same names, their tensors, hooks and flags untouched. Used by ``quantize_``,
``dequantize_``, ``load``, target-SQNR search and sensitivity alike.

Memory: the replaced modules stay alive (referenced by the journal) until :meth:`Swap.commit` or the end of the
``with`` block; until then a quantized model holds its float layers too.
"""

from __future__ import annotations

from collections import defaultdict
from types import TracebackType

from torch import nn

from .nn import QuantModule

HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
              "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")

_SAVED_FAST_PATH_FLAG = "_monoquant_activation_relu_or_gelu"

Parents = dict[int, list[tuple[nn.Module, str]]]


def parents(model: nn.Module) -> Parents:
    """``id(child) -> [(parent, attribute name), ...]`` over every place a module is registered in ``model``."""
    where: Parents = defaultdict(list)
    for _, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if child is not None and (parent, attr) not in where[id(child)]:
                where[id(child)].append((parent, attr))
    return where


def move_hooks(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst`` the very hook dicts of ``src``, so existing handles' ``remove()`` keeps working."""
    for hooks in HOOK_DICTS:
        if hasattr(src, hooks):
            setattr(dst, hooks, getattr(src, hooks))


class Swap:
    """A transaction of module replacements inside ``model``.

    >>> with Swap(model) as swap:           # doctest: +SKIP
    ...     swap.replace(old, new)           # everywhere ``old`` is registered
    ...     risky_step()                     # an exception here puts ``old`` back, then re-raises
    ...     swap.commit()                    # keep the change

    Leaving the block without :meth:`commit` (normally or by an exception) undoes every replacement.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._parents = parents(model)
        self._journal: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, attr, previous child)
        self._flags: list[nn.TransformerEncoderLayer] = []  # encoder layers whose fast-path flag this swap cleared
        self.replaced: dict[int, nn.Module] = {}  # id(old) -> new

    def replace(self, old: nn.Module, new: nn.Module) -> None:
        """Put ``new`` wherever ``old`` is registered in the model, with ``old``'s hooks (``old`` is unchanged)."""
        places = self._parents.get(id(old), [])
        move_hooks(old, new)
        for parent, attr in places:
            self._journal.append((parent, attr, parent._modules[attr]))
            setattr(parent, attr, new)
        self._parents[id(new)] = list(places)
        self.replaced[id(old)] = new

    def route_encoder_layers(self) -> None:
        """Make ``nn.TransformerEncoderLayer``s whose ``linear1``/``linear2`` are quantized call those layers.

        In eval mode without grad, PyTorch's fused encoder fast path reads ``linear1.weight``/``linear2.weight``
        instead of calling the layers: a quantized layer would then run as a float weight rebuilt on every call,
        and its activation quantization would be skipped. The fast path is only taken while the layer's
        ``activation_relu_or_gelu`` flag is set, so it is cleared on such layers (the flag does nothing else) and
        its value saved on the layer; :func:`restore_encoder_fast_paths` (and :meth:`undo`) restore it.
        """
        for layer in self.model.modules():
            if (isinstance(layer, nn.TransformerEncoderLayer) and not hasattr(layer, _SAVED_FAST_PATH_FLAG)
                    and any(isinstance(c, QuantModule) for c in (layer.linear1, layer.linear2))):
                setattr(layer, _SAVED_FAST_PATH_FLAG, layer.activation_relu_or_gelu)
                layer.activation_relu_or_gelu = 0
                self._flags.append(layer)

    def undo(self) -> None:
        """Put every replaced module back, newest first, and restore encoder flags; the model is as before."""
        for layer in reversed(self._flags):
            layer.activation_relu_or_gelu = getattr(layer, _SAVED_FAST_PATH_FLAG)
            delattr(layer, _SAVED_FAST_PATH_FLAG)
        for parent, attr, previous in reversed(self._journal):
            parent._modules[attr] = previous
        self._forget()

    def commit(self) -> None:
        """Keep the replacements; the replaced modules are no longer referenced from here."""
        self._forget()

    def _forget(self) -> None:
        self._journal.clear()
        self._flags.clear()
        self.replaced.clear()

    def __enter__(self) -> Swap:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.undo()  # a no-op after commit()


def restore_encoder_fast_paths(model: nn.Module) -> None:
    """Turn the fused fast path back on for every encoder layer whose flag :meth:`Swap.route_encoder_layers`
    cleared (once its quantized linears are float again: :func:`monoquant.dequantize_`)."""
    for layer in model.modules():
        if isinstance(layer, nn.TransformerEncoderLayer) and hasattr(layer, _SAVED_FAST_PATH_FLAG):
            layer.activation_relu_or_gelu = getattr(layer, _SAVED_FAST_PATH_FLAG)
            delattr(layer, _SAVED_FAST_PATH_FLAG)
