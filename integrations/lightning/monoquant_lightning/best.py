"""Which float weights get quantized when training ends: the best checkpoint's or the last ones.

``weights="best"`` loads ``ModelCheckpoint(monitor=...).best_model_path`` into the module on every rank (the
path is broadcast from rank zero, the file read by each rank, as Lightning does for ``ckpt_path="best"``).
The default (``weights=None``) is ``"best"`` when the Trainer has a ``ModelCheckpoint`` with a ``monitor``,
``"last"`` otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from monoquant import ConfigError

Weights = Literal["best", "last"]
WEIGHTS = ("best", "last")


def monitored_checkpoint(trainer: pl.Trainer) -> ModelCheckpoint | None:
    """The first ``ModelCheckpoint`` of the Trainer that has a ``monitor`` (``None`` if there is none)."""
    return next((cb for cb in trainer.checkpoint_callbacks
                 if isinstance(cb, ModelCheckpoint) and cb.monitor is not None), None)


def resolve_weights(trainer: pl.Trainer, weights: Weights | None) -> Weights:
    """``weights`` itself, or the default for this Trainer; a ``"best"`` it cannot honour is a ConfigError."""
    if weights is None:
        return "best" if monitored_checkpoint(trainer) is not None else "last"
    if weights == "best" and monitored_checkpoint(trainer) is None:
        raise ConfigError("PostTrainingQuantization(weights='best') needs a ModelCheckpoint(monitor=...) in the "
                          "Trainer's callbacks to know which epoch was best; add one, or pass weights='last'")
    return weights


@dataclass
class BestWeights:
    """What :func:`load_best_weights` loaded: the checkpoint file, its step, and its monitored score."""

    path: str
    global_step: int
    epoch: int
    monitor: str
    score: float | None

    def describe(self) -> str:
        score = "" if self.score is None else f", {self.monitor}={self.score:.4g}"
        return f"best checkpoint {self.path} (epoch {self.epoch}, step {self.global_step}{score})"


def load_best_weights(trainer: pl.Trainer, pl_module: pl.LightningModule) -> BestWeights | None:
    """Load the monitored ModelCheckpoint's best checkpoint into ``pl_module`` (on every rank).

    Returns ``None`` when no best checkpoint was saved (e.g. validation never ran); the module keeps its
    current weights then.
    """
    callback = monitored_checkpoint(trainer)
    path = trainer.strategy.broadcast(callback.best_model_path if callback is not None else "", src=0)
    if not path:
        return None
    checkpoint: dict[str, Any] = trainer.strategy.load_checkpoint(path)
    pl_module.load_state_dict(checkpoint["state_dict"])
    score = callback.best_model_score
    return BestWeights(path=path, global_step=int(checkpoint.get("global_step", -1)),
                       epoch=int(checkpoint.get("epoch", -1)), monitor=callback.monitor,
                       score=None if score is None else float(score))
