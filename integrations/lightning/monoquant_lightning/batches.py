"""Batches for calibration and comparison, taken the way the Trainer takes validation batches.

Loaders come from an explicit ``calibration_dataloader`` or from the trainer's validation dataloaders (a
single loader, a list/tuple or a dict of loaders, already wrapped by the Trainer with a
``DistributedSampler`` under DDP, so each rank sees its own shard). Every batch goes through the
LightningModule's (or DataModule's) ``on_before_batch_transfer``, ``transfer_batch_to_device`` and
``on_after_batch_transfer`` hooks exactly as in the validation loop.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.model_helpers import is_overridden

from monoquant import call_form


def flatten_loaders(loaders: Any) -> list[Iterable[Any]]:
    """``[loader, ...]`` from a single loader, a list/tuple or a dict (insertion order, like Lightning)."""
    if loaders is None:
        return []
    if isinstance(loaders, dict):
        return [dl for v in loaders.values() for dl in flatten_loaders(v)]
    if isinstance(loaders, (list, tuple)):
        return [dl for v in loaders for dl in flatten_loaders(v)]
    return [loaders]


def missing_validation_data(trainer: pl.Trainer, pl_module: pl.LightningModule) -> str | None:
    """Why ``fit`` will run no validation batches, in words; ``None`` when it will have some."""
    source = getattr(trainer.fit_loop.epoch_loop.val_loop, "_data_source", None)  # where fit gets val loaders
    defined = source.is_defined() if source is not None else trainer.val_dataloaders is not None
    if not defined:
        return "fit was given no val_dataloaders and the module/datamodule defines no val_dataloader()"
    if trainer.limit_val_batches == 0:
        return "the Trainer has limit_val_batches=0"
    if not is_overridden("validation_step", pl_module):
        return f"{type(pl_module).__name__} defines no validation_step, so Lightning skips its val_dataloaders"
    return None


def validation_loaders(trainer: pl.Trainer) -> tuple[list[Iterable[Any]], list[float]]:
    """The trainer's validation loaders and the number of batches ``limit_val_batches`` allows in each.

    If validation has not run yet in this ``fit`` (e.g. ``num_sanity_val_steps=0`` and no epoch reached
    ``check_val_every_n_epoch``), the loaders are requested now, as the validation loop would.
    """
    if trainer.val_dataloaders is None and missing_validation_data(trainer, trainer.lightning_module) is None:
        trainer.fit_loop.epoch_loop.val_loop.setup_data()
    loaders = flatten_loaders(trainer.val_dataloaders)
    limits = list(trainer.num_val_batches) if loaders else []
    if len(limits) != len(loaders):  # validation never set up: no per-loader limit known
        limits = [math.inf] * len(loaders)
    return loaders, limits


def take_batches(trainer: pl.Trainer, loaders: list[Iterable[Any]], limits: list[float],
                 total: int) -> Iterator[Any]:
    """Up to ``total`` batches over all ``loaders`` (split evenly, each capped by its limit), on device.

    Each batch is prepared exactly as Lightning's evaluation loop does it, with its loader's index as
    ``dataloader_idx``: ``precision_plugin.convert_input``, ``LightningModule._on_before_batch_transfer``
    (the module's or datamodule's ``on_before_batch_transfer``), then ``trainer.strategy.batch_to_device``
    (``transfer_batch_to_device`` and ``on_after_batch_transfer``).
    """
    if not loaders:
        return
    share = math.ceil(total / len(loaders))
    left = total
    for idx, (loader, limit) in enumerate(zip(loaders, limits)):
        cap = int(min(share, limit, left))
        if cap <= 0:
            continue
        for batch in itertools.islice(loader, cap):
            left -= 1
            batch = trainer.precision_plugin.convert_input(batch)
            batch = trainer.lightning_module._on_before_batch_transfer(batch, dataloader_idx=idx)
            yield trainer.strategy.batch_to_device(batch, dataloader_idx=idx)


class Replay:
    """An iterable that starts over from ``make()`` on every ``iter()`` (sequential calibration reads its batches
    once per stage; a generator could be read only once)."""

    def __init__(self, make: Callable[[], Iterator[Any]]) -> None:
        self._make = make

    def __iter__(self) -> Iterator[Any]:
        return iter(self._make())


FORWARD_FN_HINT = "pass PostTrainingQuantization(..., forward_fn=lambda module, batch: module(...))"


def check_batch_fits_forward(module: pl.LightningModule, batch: Any) -> None:
    """Raise :class:`~monoquant.ConfigError` if the default feeding rule cannot call ``module.forward`` on
    ``batch`` (e.g. a dict batch ``{"inputs"}`` for ``forward(self, x)``), naming ``forward_fn``; keys ``forward``
    does not take are left out with a warning. The rule is the core's (:func:`monoquant.call_form`).
    """
    call_form(module, batch, hint=FORWARD_FN_HINT)
