"""Feeding data to a model: one place that knows what a "batch" may look like.

Accepted ``data``: a ``DataLoader`` or any iterable of batches. A batch may be

* a tensor -> ``model(batch)``;
* a tuple or list -> ``model(batch[0])`` (the usual ``(inputs, targets)``);
* a dict -> ``model(**batch)`` (Hugging Face style keyword inputs);
* anything else, or any of the above when ``forward_fn(model, batch)`` is given -> ``forward_fn`` decides.

Tensors are moved to the model's device first (recursively inside tuples, lists and dicts).
"""

from __future__ import annotations

import itertools
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
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [to_device(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


def run_batch(model: nn.Module, batch: Any, forward_fn: ForwardFn | None = None) -> Any:
    """Run ``model`` on one ``batch`` following the rules in this module's docstring."""
    batch = to_device(batch, model_device(model))
    if forward_fn is not None:
        return forward_fn(model, batch)
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (list, tuple)) and batch:
        return model(batch[0])
    raise ConfigError(
        f"don't know how to feed a batch of type {type(batch).__name__} to the model: pass "
        "forward_fn=lambda model, batch: model(...)"
    )


def tqdm_disable(progress: bool | None) -> bool | None:
    """tqdm's ``disable`` for a ``progress`` option: ``None`` shows a bar only when stderr is a terminal."""
    return None if progress is None else not progress


def iter_batches(
    data: Iterable[Any], max_batches: int | None = DEFAULT_MAX_BATCHES, *, desc: str = "calibrating",
    progress: bool | None = None,
) -> Iterator[Any]:
    """Up to ``max_batches`` batches of ``data`` (all when ``None``), with a progress bar on a terminal."""
    if isinstance(data, (torch.Tensor, dict)) or not isinstance(data, Iterable):
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
