"""Feeding data to a model: one place that knows what a "batch" may look like.

Accepted ``data``: a ``DataLoader`` or any iterable of batches. A batch may be

* a tensor -> ``model(batch)``;
* a tuple or list -> ``model(batch[0])`` (the usual ``(inputs, targets)``);
* any ``Mapping`` (a dict, a tokenizer's ``BatchEncoding``...) -> ``model(**batch)`` (Hugging Face style keyword
  inputs). Keys ``forward`` does not accept (``labels`` for a bare encoder...) are dropped with a one-time
  warning when ``forward`` takes no ``**kwargs``; a batch that still cannot be bound (a required argument
  missing) is refused with a :class:`~monoquant.ConfigError` naming ``forward_fn`` (:func:`call_form`);
* anything else, or any of the above when ``forward_fn(model, batch)`` is given -> ``forward_fn`` decides.

Tensors are moved to the model's device first (recursively inside tuples, lists and mappings).
"""

from __future__ import annotations

import inspect
import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import ConfigError

ForwardFn = Callable[[nn.Module, Any], Any]

DEFAULT_MAX_BATCHES = 64
"""Default cap on calibration batches: enough for stable min/max and histogram statistics on typical
batch sizes (>= 1,000 samples at batch 16) while keeping calibration to seconds on a CPU."""


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer not on the meta device (CPU for a model with none)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor inside it moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [to_device(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


FORWARD_FN_HINT = "pass forward_fn=lambda model, batch: model(...)"
"""How to take over feeding, for :func:`call_form`'s refusals (integrations pass their own wording)."""

_noted: set[tuple[type, frozenset[str]]] = set()


def _signature(module: nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(module.forward)
    except (TypeError, ValueError):  # no introspectable signature (a C function...): nothing to check
        return None


def call_form(module: nn.Module, batch: Any, *, hint: str = FORWARD_FN_HINT) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` that the default feeding rule calls ``module`` with for ``batch`` (this module's docstring).

    For a ``Mapping`` batch, keys that ``module.forward`` does not accept are left out (with a warning, once per
    model type and set of keys) unless ``forward`` takes ``**kwargs``. Only the signature is checked
    (``inspect.Signature.bind``); nothing runs.

    Raises:
        ConfigError: the batch is of a type the rule cannot feed, or ``forward`` cannot be called with it (a
            required argument missing, a tensor for a keyword-only ``forward``); the message ends with ``hint``.
    """
    if isinstance(batch, torch.Tensor):
        how, args, kwargs = "model(batch)", (batch,), {}
    elif isinstance(batch, Mapping):
        how, args, kwargs = "model(**batch)", (), dict(batch)
    elif isinstance(batch, (list, tuple)) and batch:
        how, args, kwargs = "model(batch[0])", (batch[0],), {}
    else:
        raise ConfigError(f"don't know how to feed a batch of type {type(batch).__name__} to the model; {hint}")
    signature = _signature(module)
    if signature is None:
        return args, kwargs
    params = signature.parameters.values()
    dropped: frozenset[str] = frozenset()
    if kwargs and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        takes = {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                      inspect.Parameter.KEYWORD_ONLY)}
        dropped = frozenset(kwargs) - takes
        kwargs = {k: v for k, v in kwargs.items() if k in takes}
    try:
        signature.bind(*args, **kwargs)
    except TypeError as e:
        keys = f" with keys {sorted(batch)}" if isinstance(batch, Mapping) else ""
        raise ConfigError(f"batches are fed as {how}, but they are {type(batch).__name__}s{keys} and "
                          f"{type(module).__name__}.forward{signature} cannot take that ({e}); {hint}, e.g. "
                          "forward_fn=lambda model, batch: model(batch['x'])") from e
    if dropped and (type(module), dropped) not in _noted:
        _noted.add((type(module), dropped))
        warnings.warn(f"{type(module).__name__}.forward takes no {sorted(dropped)}: leaving these batch keys out "
                      f"(feeding {sorted(kwargs)}); {hint} to feed batches differently", stacklevel=3)
    return args, kwargs


def run_batch(model: nn.Module, batch: Any, forward_fn: ForwardFn | None = None) -> Any:
    """Run ``model`` on one ``batch`` following the rules in this module's docstring."""
    batch = to_device(batch, model_device(model))
    if forward_fn is not None:
        return forward_fn(model, batch)
    args, kwargs = call_form(model, batch)
    return model(*args, **kwargs)


def tqdm_disable(progress: bool | None) -> bool | None:
    """tqdm's ``disable`` for a ``progress`` option: ``None`` shows a bar only when stderr is a terminal."""
    return None if progress is None else not progress


def iter_batches(
    data: Iterable[Any], max_batches: int | None = DEFAULT_MAX_BATCHES, *, desc: str = "calibrating",
    progress: bool | None = None,
) -> Iterator[Any]:
    """Up to ``max_batches`` batches of ``data`` (all when ``None``), with a progress bar on a terminal."""
    if isinstance(data, (torch.Tensor, Mapping)) or not isinstance(data, Iterable):
        raise ConfigError(
            f"calibration data must be an iterable of batches (a DataLoader, a list of tensors...), got "
            f"{type(data).__name__}; wrap a single batch in a list: [batch]"
        )
    if max_batches is not None and max_batches <= 0:
        raise ConfigError(f"max_batches must be positive or None, got {max_batches}")
    try:
        total = len(data)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_batches is not None:
        total = min(total, max_batches) if total is not None else max_batches
    disable = tqdm_disable(progress)
    with tqdm(total=total, desc=desc, unit="batch", disable=disable, leave=False) as bar:
        for batch in itertools.islice(data, max_batches):
            yield batch
            bar.update(1)


def reiterable(data: Iterable[Any] | None, max_batches: int | None) -> Iterable[Any] | None:
    """``data`` itself if it can be iterated more than once, else its first ``max_batches`` batches as a list (a
    generator would be exhausted by the first pass: calibration before measurement, or the first stage of a
    sequential calibration)."""
    if data is None:
        return None
    if isinstance(data, (torch.Tensor, Mapping)) or not isinstance(data, Iterable):
        next(iter_batches(data))  # raises the usual error message
    if iter(data) is data:  # a one-shot iterator
        return list(iter_batches(data, max_batches, progress=False))
    return data
