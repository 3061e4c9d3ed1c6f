"""``PostTrainingQuantization``: quantize a LightningModule in place when ``Trainer.fit`` finishes training."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

import monoquant as mq
from monoquant.accuracy import evaluating
from monoquant.config import as_config
from monoquant.data import run_batch
from monoquant.errors import CalibrationError, ConfigError

from .batches import missing_validation_data, take_batches, validation_loaders
from .checkpoint import STATE_FORMAT, config_to_dict, restore_from_state_dict
from .comparison import OutputComparison

ForwardFn = Callable[[torch.nn.Module, Any], Any]


def no_data_error(why: str) -> CalibrationError:
    """The error for a config that needs calibration batches when there are none; ``why`` says why."""
    return CalibrationError(f"PostTrainingQuantization: the config needs calibration data (static activation "
                            f"quantization or method='gptq') but {why}; pass "
                            "PostTrainingQuantization(..., calibration_dataloader=loader), or give fit validation data")


class PostTrainingQuantization(Callback):
    """Quantize the LightningModule in place at the end of training, measure it, and watch its accuracy.

    When training ends (``on_train_end``, while the model is still on its device and, under DDP, the process
    group is up) the callback:

    1. runs the float model on up to ``compare_batches`` validation batches and keeps its outputs;
    2. quantizes the module in place with ``config`` (skip rules included) via :func:`monoquant.quantize_`;
    3. if the config needs activation statistics (static activations, GPTQ), calibrates on up to
       ``calibration_batches`` validation batches, all-reduces the observer statistics across ranks
       (:func:`monoquant.sync_observers`) and freezes them (:func:`monoquant.freeze`);
    4. runs the quantized model on the same comparison batches and measures the output SQNR and top-1
       agreement (the definitions and ``report.end_to_end`` keys of :func:`monoquant.compare`: ``sqnr_db``,
       ``top1_agreement``, ``batches``, ``samples``), summed over ranks with torchmetrics;
    5. on rank zero: prints the report table and logs ``quant/*`` metrics to every trainer logger.

    Batches come from the trainer's validation dataloaders (one, a list or a dict; ``limit_val_batches``
    respected; each DDP rank sees its shard) or from ``calibration_dataloader`` when given, and are moved
    with ``trainer.strategy.batch_to_device``, so the module's batch-transfer hooks apply. Batches run in
    eval mode under ``torch.no_grad()`` and the precision plugin's context (autocast for ``"bf16-mixed"``),
    as in the validation loop; training flags are restored afterwards.

    Accuracy watch: with ``monitor`` (any metric the module logs during validation, e.g. ``"val_acc"``), the
    callback records the float model's last value; when you later run ``trainer.validate(model, ...)`` on the
    quantized model it compares the two, logs ``quant/<monitor>_float`` and ``quant/<monitor>_quantized``,
    and, if the quantized value is worse by more than ``tolerance`` (absolute; ``mode="max"``: lower is
    worse, ``"min"``: higher is worse), warns with :class:`monoquant.AccuracyWarning` or raises
    :class:`monoquant.AccuracyError` (``on_failure="raise"``). The result is kept in :attr:`accuracy_check`.

    Args:
        config: a :class:`monoquant.QuantConfig` or a bare weight spec (``mq.Int4(group_size=32)``).
        calibration_batches: cap on calibration batches (split evenly over several validation loaders).
        compare_batches: batches used for the float-vs-quantized comparison (0 disables it).
        calibration_dataloader: use this loader (or any iterable of batches, e.g. ``[batch]``) instead of
            the validation dataloaders (for a module without validation data). It is used as given on every
            rank: give it a ``DistributedSampler`` to shard it under DDP.
        forward_fn: ``forward_fn(module, batch) -> output``; default: ``module(batch)`` for a tensor,
            ``module(batch[0])`` for a tuple/list, ``module(**batch)`` for a dict.
        monitor, mode, tolerance, on_failure: the accuracy watch described above. ``on_failure`` also
            applies to the end-to-end comparison: a model-output SQNR or top-1 agreement below ``thresholds``
            warns (or raises) when quantization ends, like ``mq.quantize_(..., calibration_data=...)``.
        thresholds: :class:`monoquant.Thresholds` or a dict of overrides for that check (default floors).
        verbose: print the report table on rank zero.

    After quantization, :attr:`report` holds the :class:`monoquant.QuantReport`. Calling ``fit`` again does
    not quantize again. Checkpoints saved afterwards restore with identical outputs when this callback is
    in the Trainer (``trainer.test(model, ckpt_path=...)``); outside the Trainer use
    :func:`monoquant_lightning.load_quantized_checkpoint`.
    """

    def __init__(
        self,
        config: mq.QuantConfig | mq.WeightSpec,
        *,
        calibration_batches: int = 32,
        compare_batches: int = 8,
        calibration_dataloader: Iterable[Any] | None = None,
        forward_fn: ForwardFn | None = None,
        monitor: str | None = None,
        mode: Literal["max", "min"] = "max",
        tolerance: float = 0.01,
        on_failure: Literal["warn", "raise"] = "warn",
        thresholds: mq.Thresholds | dict[str, Any] | None = None,
        verbose: bool = True,
    ) -> None:
        self.config = as_config(config)
        self.thresholds = mq.Thresholds.coerce(thresholds)
        if calibration_batches <= 0:
            raise ConfigError(f"calibration_batches must be positive, got {calibration_batches}")
        if compare_batches < 0:
            raise ConfigError(f"compare_batches must be >= 0, got {compare_batches}")
        if mode not in ("max", "min"):
            raise ConfigError(f"mode must be 'max' (higher is better) or 'min' (lower is better), got {mode!r}")
        if on_failure not in ("warn", "raise"):
            raise ConfigError(f"on_failure must be 'warn' or 'raise', got {on_failure!r}")
        if not tolerance >= 0:
            raise ConfigError(f"tolerance must be a non-negative number, got {tolerance!r}")
        if isinstance(calibration_dataloader, (torch.Tensor, dict)):
            raise ConfigError("calibration_dataloader must be a DataLoader or an iterable of batches; wrap a "
                              "single batch in a list: [batch]")
        self.calibration_batches = calibration_batches
        self.compare_batches = compare_batches
        self.calibration_dataloader = calibration_dataloader
        self.forward_fn = forward_fn
        self.monitor, self.mode, self.tolerance, self.on_failure = monitor, mode, tolerance, on_failure
        self.verbose = verbose
        self.report: mq.QuantReport | None = None
        self.quantized_layers: dict[str, str] = {}
        self.float_metric: float | None = None
        self.accuracy_check: dict[str, Any] | None = None

    # ---- identity / state ---------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        cfg = self.config
        return self._generate_state_key(
            weights=cfg.weights.describe(),
            activations=cfg.activations.describe() if cfg.activations is not None else None,
        )

    @property
    def quantized(self) -> bool:
        return bool(self.quantized_layers)

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "quantized": self.quantized,
            "config": config_to_dict(self.config),
            "layers": dict(self.quantized_layers),
            "float_metric": self.float_metric,
            "monitor": self.monitor,
            "report": self.report.to_dict() if self.report is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.quantized_layers = dict(state_dict.get("layers") or {})
        if state_dict.get("monitor") == self.monitor:
            self.float_metric = state_dict.get("float_metric")

    # ---- hooks --------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Prepare ``pl_module`` to receive a quantized checkpoint (``trainer.test(model, ckpt_path=...)``).

        The Trainer loads the model's state dict before any callback sees the checkpoint, so a
        ``load_state_dict`` pre-hook swaps in quantized layers wherever the incoming state dict holds them.
        """
        self._remove_hook()
        self._hook = pl_module.register_load_state_dict_pre_hook(self._before_load)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hook()

    def _remove_hook(self) -> None:
        if getattr(self, "_hook", None) is not None:
            self._hook.remove()
            self._hook = None

    def _before_load(self, module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        restore_from_state_dict(module, state_dict, self.config, prefix)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fail before training, not after it, when calibration will have no data."""
        if self.calibration_dataloader is not None or not self.config.needs_calibration:
            return
        if any(isinstance(m, mq.QuantModule) for m in pl_module.modules()):
            return
        why = missing_validation_data(trainer, pl_module)
        if why is not None:
            raise no_data_error(why)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if any(isinstance(m, mq.QuantModule) for m in pl_module.modules()):
            self._info(trainer, f"PostTrainingQuantization: {type(pl_module).__name__} is already quantized; "
                                "not quantizing it again")
            return
        if self.monitor is not None:
            value = trainer.callback_metrics.get(self.monitor)
            self.float_metric = float(value) if value is not None else None
            if value is None:
                self._warn(trainer, f"monitor {self.monitor!r} was not logged during fit "
                                    f"(logged: {sorted(trainer.callback_metrics)}); the accuracy check after "
                                    "quantization will have no float value to compare with", UserWarning)
        self.quantize(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is None or not self.quantized or trainer.state.fn != "validate" or trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            self._warn(trainer, f"monitor {self.monitor!r} was not logged by this validation run "
                                f"(logged: {sorted(trainer.callback_metrics)}); no accuracy check", UserWarning)
            return
        self._check_accuracy(trainer, float(value))

    # ---- quantization -------------------------------------------------------------------------------
    def _loaders(self, trainer: pl.Trainer) -> tuple[list[Iterable[Any]], list[float]]:
        if self.calibration_dataloader is not None:  # one iterable of batches (a list of batches is not flattened)
            return [self.calibration_dataloader], [math.inf]
        return validation_loaders(trainer)

    def _forward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Any:
        with trainer.precision_plugin.val_step_context():  # autocast etc., as in the validation loop
            return run_batch(pl_module, batch, self.forward_fn)

    def quantize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> mq.QuantReport:
        """Quantize ``pl_module`` now (what ``on_train_end`` does); returns the report."""
        loaders, limits = self._loaders(trainer)
        if not loaders and self.config.needs_calibration:
            raise no_data_error(missing_validation_data(trainer, pl_module) or "the validation dataloaders are empty")
        compare = list(take_batches(trainer, loaders, limits, self.compare_batches))
        with evaluating(pl_module):
            references = [self._forward(trainer, pl_module, b) for b in compare]

        with warnings.catch_warnings():
            if not trainer.is_global_zero:  # every rank quantizes, calibrates and compares; rank zero warns
                warnings.simplefilter("ignore")
            report = mq.quantize_(pl_module, self.config, progress=False)
            if mq.needs_calibration(pl_module):
                self._calibrate(trainer, pl_module, loaders, limits, report)
            if compare:
                comparison = OutputComparison(trainer.strategy.root_device)
                with evaluating(pl_module):
                    for batch, ref in zip(compare, references):
                        comparison.update(ref, self._forward(trainer, pl_module, batch), batch)
                report.end_to_end.update(comparison.compute())
                mq.accuracy.check_end_to_end(report, self.thresholds, self.on_failure)
        if not loaders:
            report.warnings.append("no end-to-end comparison: no validation data; pass calibration_dataloader=...")

        self.report = report
        self.quantized_layers = {row.name: row.scheme for row in report.quantized}
        self._publish(trainer, report)
        return report

    def _calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loaders: list[Iterable[Any]],
                   limits: list[float], report: mq.QuantReport) -> None:
        seen = 0
        with mq.calibrate(pl_module):
            for batch in take_batches(trainer, loaders, limits, self.calibration_batches):
                self._forward(trainer, pl_module, batch)
                seen += 1
        if seen == 0:
            source = "the validation dataloaders" if self.calibration_dataloader is None else "calibration_dataloader"
            raise no_data_error(f"{source} gave no batch")
        mq.sync_observers(pl_module)  # all-reduce over ranks (no-op without torch.distributed)
        report.record_frozen(mq.freeze(pl_module))

    # ---- reporting ----------------------------------------------------------------------------------
    def _publish(self, trainer: pl.Trainer, report: mq.QuantReport) -> None:
        if not trainer.is_global_zero:
            return
        if self.verbose:
            print(report)
        metrics: dict[str, float] = {
            "quant/layers_quantized": float(len(report.quantized)),
            "quant/layers_skipped": float(len(report.skipped)),
            "quant/bytes_before": float(report.bytes_before),
            "quant/bytes_after": float(report.bytes_after),
            "quant/size_ratio": float(report.size_ratio),
        }
        for key, value in report.end_to_end.items():
            metrics[f"quant/{key}"] = float(value)
        for row in report.quantized:
            if row.weight_sqnr_db is not None:
                metrics[f"quant/weight_sqnr_db/{row.name}"] = float(row.weight_sqnr_db)
        self._log(trainer, metrics)

    def _check_accuracy(self, trainer: pl.Trainer, quant_value: float) -> None:
        float_value = self.float_metric
        if float_value is None:
            self._warn(trainer, f"no float value of {self.monitor!r} was recorded before quantization; "
                                "no accuracy check", UserWarning)
            return
        drop = (float_value - quant_value) if self.mode == "max" else (quant_value - float_value)
        failed = bool(trainer.strategy.broadcast(drop > self.tolerance, src=0))
        self.accuracy_check = {"monitor": self.monitor, "float": float_value, "quantized": quant_value,
                               "drop": drop, "tolerance": self.tolerance, "failed": failed}
        self._log(trainer, {f"quant/{self.monitor}_float": float_value, f"quant/{self.monitor}_quantized": quant_value})
        if not failed:
            return
        message = (f"{self.monitor} got worse by {drop:.4g} after quantization ({float_value:.4g} float -> "
                   f"{quant_value:.4g} quantized), more than tolerance={self.tolerance}; keep sensitive layers "
                   "float with SkipRules(exclude=[...]) or use a wider format")
        if self.report is not None and trainer.is_global_zero:
            self.report.warnings.append(message)
        if self.on_failure == "raise":
            raise mq.AccuracyError(message, report=self.report)
        self._warn(trainer, message, mq.AccuracyWarning)

    @staticmethod
    def _log(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    @staticmethod
    def _warn(trainer: pl.Trainer, message: str, category: type[Warning]) -> None:
        if trainer.is_global_zero:
            warnings.warn(message, category, stacklevel=3)

    @staticmethod
    def _info(trainer: pl.Trainer, message: str) -> None:
        if trainer.is_global_zero:
            print(message)
