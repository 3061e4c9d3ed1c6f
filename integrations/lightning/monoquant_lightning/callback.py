"""``PostTrainingQuantization``: quantize a LightningModule in place when ``Trainer.fit`` finishes training."""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

import monoquant as mq
from monoquant import CalibrationError, ConfigError, evaluating, method_of, run_batch

from .artifact import write_artifact
from .batches import Replay, check_batch_fits_forward, missing_validation_data, take_batches, validation_loaders
from .best import WEIGHTS, BestWeights, Weights, load_best_weights, resolve_weights
from .checkpoint import (
    STATE_FORMAT,
    config_to_dict,
    drop_route_key,
    float_layers_in,
    mark_quantized,
    restore_from_state_dict,
)
from .comparison import OutputComparison
from .configs import ConfigLike, coerce_config

ForwardFn = Callable[[torch.nn.Module, Any], Any]
Loaders = tuple[list[Iterable[Any]], list[float]]


def no_data_error(why: str) -> CalibrationError:
    """The error for a config that needs calibration batches when there are none; ``why`` says why."""
    return CalibrationError(f"PostTrainingQuantization: the config needs calibration data (static activation "
                            f"quantization or method='gptq') but {why}; pass "
                            "PostTrainingQuantization(..., calibration_dataloader=loader), or give fit validation data")


REPORT_FILE = "monoquant_report.md"
"""The report's file name in the trainer's log directory."""

class _LoadHook:
    """A ``load_state_dict`` hook that calls a method of the callback through a weak reference, so that a
    ``copy.deepcopy`` of the module (EMA copies, snapshots) copies neither the callback nor what it holds."""

    def __init__(self, callback: Callback, method: str) -> None:
        self.callback, self.method = weakref.ref(callback), method

    def __call__(self, module: torch.nn.Module, *args: Any) -> None:
        callback = self.callback()
        trainer = _attached_trainer(module)
        if callback is None or (trainer is not None and callback not in trainer.callbacks):
            return  # left behind by a run that ended without teardown, in another Trainer: not ours to act on
        getattr(callback, self.method)(module, *args)


def _attached_trainer(module: torch.nn.Module) -> pl.Trainer | None:
    try:
        return module.trainer if isinstance(module, pl.LightningModule) else None
    except RuntimeError:  # not attached to a Trainer
        return None


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


class PostTrainingQuantization(Callback):
    """Quantize the LightningModule in place at the end of training, measure it, and watch its accuracy.

    When training ends (``on_train_end``, while the model is still on its device and, under DDP, the process
    group is up) the callback:

    1. with ``weights="best"``, loads the best checkpoint's weights on every rank (see ``weights`` below);
    2. runs the float model on up to ``compare_batches`` validation batches and keeps its outputs;
    3. quantizes the module in place with ``config`` (skip rules included) via :func:`monoquant.quantize_`;
    4. if the config needs activation statistics (static activations, GPTQ), calibrates on up to
       ``calibration_batches`` validation batches, all-reduces the observer statistics across ranks
       (:func:`monoquant.sync_observers`) and freezes them (:func:`monoquant.freeze`);
    5. runs the quantized model on the same comparison batches and measures the output SQNR and top-1
       agreement (the definitions and ``report.end_to_end`` keys of :func:`monoquant.compare`: ``sqnr_db``,
       ``top1_agreement``, ``batches``, ``samples``) and each quantized layer's output SQNR against its
       float twin on the same inputs (``output_sqnr_db`` of the report rows), summed over ranks;
    6. records the result (:attr:`report`, :attr:`quantized_layers`), then checks the comparison against
       ``thresholds``; on rank zero prints the report table and logs ``quant/*`` metrics to every logger;
    7. with ``save_to``, writes the quantized module with :func:`monoquant.save` on rank zero and prints and
       logs its path and size (``quant/file_bytes``).

    Batches come from the trainer's validation dataloaders (one, a list or a dict; ``limit_val_batches``
    respected; each DDP rank sees its shard) or from ``calibration_dataloader`` when given, and are moved
    with ``trainer.strategy.batch_to_device``, so the module's batch-transfer hooks apply. Batches run in
    eval mode under ``torch.no_grad()`` and the precision plugin's context (autocast for ``"bf16-mixed"``),
    as in the validation loop; training flags are restored afterwards. When ``fit`` starts (before any
    training step) one such batch is checked against the module's ``forward`` signature
    (:func:`monoquant.call_form`): dict keys ``forward`` does not take (a label key for ``forward(self, x)``) are
    left out with one warning, and a batch it still cannot take is a :class:`monoquant.ConfigError` naming
    ``forward_fn`` then, not a ``TypeError`` after training.

    Accuracy watch: with ``monitor`` (any metric the module logs during validation, e.g. ``"val_acc"``), the
    callback records the float model's value (that of the quantized weights: the best checkpoint's with
    ``weights="best"``, the last validation's otherwise); when you later run ``trainer.validate(model, ...)``
    on the quantized model it compares the two, logs ``quant/<monitor>_float`` and
    ``quant/<monitor>_quantized``, and, if the quantized value is worse by more than ``tolerance``
    (absolute; ``mode="max"``: lower is worse, ``"min"``: higher is worse), warns with
    :class:`monoquant.AccuracyWarning` or raises :class:`monoquant.AccuracyError` (``on_failure="raise"``).
    The result is kept in :attr:`accuracy_check`.

    ``on_failure="raise"`` leaves the module **quantized**, and the callback records it before raising
    (:attr:`report`, :attr:`quantized_layers`, the callback state), so checkpoints saved afterwards restore
    like any other quantized checkpoint; no ``save_to`` file is written for a model that failed the check.

    Args:
        config: a :class:`monoquant.QuantConfig`, a bare weight format (``mq.Int4(group_size=32)``), or the
            string/dict forms of :mod:`monoquant_lightning.configs` (for YAML files; LightningCLI also
            takes ``class_path: monoquant.QuantConfig`` / ``monoquant.Int4``).
        weights: which float weights to quantize when training ends: ``"best"`` loads the best checkpoint of
            the Trainer's ``ModelCheckpoint(monitor=...)`` (on every rank); ``"last"`` takes the weights the
            module holds. Default (``None``): ``"best"`` when the Trainer has a ``ModelCheckpoint`` with a
            ``monitor``, else ``"last"``. If no best checkpoint was saved, the last weights are quantized with
            a warning.
        save_to: write the quantized module there with :func:`monoquant.save` when quantization ends: a
            ``.safetensors`` file path, or a directory (the file is ``<dir>/<ModuleClass>.safetensors``).
            Load it for inference without Lightning: ``mq.load(MyNet(), path)``.
        calibration_batches: cap on calibration batches (split evenly over several validation loaders).
        compare_batches: batches used for the float-vs-quantized comparison (0 disables it, and the per-layer
            output SQNR, which keeps the float layers alive until it is measured).
        calibration_dataloader: use this loader (or any iterable of batches, e.g. ``[batch]``) instead of
            the validation dataloaders (for a module without validation data). It is used as given on every
            rank: give it a ``DistributedSampler`` to shard it under DDP.
        forward_fn: ``forward_fn(module, batch) -> output``; default: ``module(batch)`` for a tensor,
            ``module(batch[0])`` for a tuple/list, ``module(**batch)`` for a dict or any ``Mapping``.
        monitor, mode, tolerance, on_failure: the accuracy watch described above. ``on_failure`` also
            applies to the end-to-end comparison: a model-output SQNR or top-1 agreement below ``thresholds``
            warns (or raises) when quantization ends, like ``mq.quantize_(..., calibration_data=...)``.
        thresholds: :class:`monoquant.Thresholds` or a dict of overrides for that check (default floors).
        verbose: print the report table on rank zero.

    Checkpoints: calling ``fit`` again does not quantize again. Checkpoints saved after quantization restore
    with identical outputs when this callback is in the Trainer (``trainer.test(model, ckpt_path=...)``);
    outside the Trainer use :func:`monoquant_lightning.load_quantized_checkpoint`, and for
    ``MyModule.load_from_checkpoint(path)`` derive the module from
    :class:`monoquant_lightning.QuantizedCheckpointMixin`. A checkpoint saved *before* quantization (e.g.
    ``trainer.test(model, ckpt_path="best")`` after ``fit``) restored into the quantized module is quantized
    again with the same config, calibrated (where the config needs data) on ``calibration_dataloader`` or
    the validation loaders of the last ``fit``; without either, that is a :class:`monoquant.CalibrationError`
    saying what to pass.
    """

    def __init__(
        self,
        config: ConfigLike,
        *,
        weights: Weights | None = None,
        save_to: str | Path | None = None,
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
        self.config = coerce_config(config)
        self.thresholds = mq.Thresholds.coerce(thresholds)
        if weights not in (None, *WEIGHTS):
            raise ConfigError(f"weights must be 'best', 'last' or None (best when a ModelCheckpoint monitors a "
                              f"metric), got {weights!r}")
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
        self.weights, self.save_to = weights, save_to
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
        self.source: dict[str, Any] | None = None  # which float weights were quantized (weights, checkpoint...)
        self.saved_path: Path | None = None
        self.report_path: Path | None = None
        """Where the report was written as Markdown (``<trainer.log_dir>/monoquant_report.md``), on rank zero."""
        self._monitor_history: dict[int, float] = {}  # global_step -> monitor value, from fit's validations
        self._fit_loaders: Loaders | None = None  # the last fit's batch sources, to re-quantize float checkpoints
        self._hooks: list[Any] = []
        self._requantize_with: Loaders | None = None  # set while a float checkpoint loads into the quantized module
        self._requantized = False

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
            "source": self.source,
            "report": self.report.to_dict() if self.report is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._requantized:  # a checkpoint from before quantization: its state describes the float model
            self._requantized = False
            return
        self.quantized_layers = dict(state_dict.get("layers") or {})
        self.source = state_dict.get("source")
        if state_dict.get("monitor") == self.monitor:
            self.float_metric = state_dict.get("float_metric")

    # ---- hooks --------------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """A quantized model's checkpoint carries a key that tells a plain ``load_from_checkpoint`` what to do."""
        if self.quantized and isinstance(checkpoint.get("state_dict"), dict):
            mark_quantized(checkpoint["state_dict"])

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Prepare ``pl_module`` to receive a checkpoint (``trainer.test(model, ckpt_path=...)``).

        The Trainer loads the model's state dict before any callback sees the checkpoint, so a
        ``load_state_dict`` pre-hook swaps in quantized layers wherever the incoming state dict holds them,
        or, for a float state dict arriving in a quantized module, makes those layers float again; a post-hook
        then quantizes the loaded float weights with this config.
        """
        self._remove_hooks()
        self._hooks = [pl_module.register_load_state_dict_pre_hook(_LoadHook(self, "_before_load")),
                       pl_module.register_load_state_dict_post_hook(_LoadHook(self, "_after_load"))]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()  # the Trainer calls no teardown after an exception
        self._requantize_with = None

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _before_load(self, module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        self._requantized = False
        drop_route_key(state_dict, prefix)
        if not float_layers_in(module, state_dict, prefix):
            restore_from_state_dict(module, state_dict, self.config, prefix)
            return
        # a checkpoint saved before quantization arrives in the quantized module: its float weights load into
        # float layers, and _after_load quantizes them again (when resuming fit: when training ends)
        trainer = _attached_trainer(module)
        resuming = trainer is None or trainer.state.fn == "fit"
        self._requantize_with = None if resuming else self._requantize_data(trainer)  # raises before any change
        mq.dequantize_(module)
        if resuming:
            self.quantized_layers, self.report = {}, None

    def _after_load(self, module: torch.nn.Module, incompatible_keys: Any) -> None:
        if self._requantize_with is None:
            return
        loaders, self._requantize_with = self._requantize_with, None
        trainer = _attached_trainer(module)
        self._info(trainer, f"PostTrainingQuantization: {trainer.ckpt_path or 'the checkpoint'} holds float "
                            "weights (saved before quantization); quantizing them with the same config")
        self.quantize(trainer, module, loaders)
        self._requantized = True

    def _requantize_data(self, trainer: pl.Trainer) -> Loaders:
        """Batches to quantize a restored float checkpoint with: ``calibration_dataloader``, or the last fit's
        validation loaders; a CalibrationError saying what to pass when the config needs data and has none."""
        if self.calibration_dataloader is not None:
            return self._loaders(trainer)
        if self._fit_loaders is not None and self._fit_loaders[0]:
            return self._fit_loaders
        if self.config.needs_calibration:
            raise CalibrationError(
                f"{trainer.ckpt_path or 'the checkpoint'} holds float weights (saved before quantization) for "
                "layers this module has quantized; quantizing them again with "
                f"{self.config.weights.describe()} needs calibration data and this Trainer has none: pass "
                "PostTrainingQuantization(..., calibration_dataloader=loader), or restore a checkpoint saved after "
                "quantization (trainer.save_checkpoint(path) once fit has ended)")
        return [], []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fail before training, not after it: a ``weights`` choice or data the quantization cannot use."""
        if any(isinstance(m, mq.QuantModule) for m in pl_module.modules()):
            return
        self._monitor_history = {}
        resolve_weights(trainer, self.weights)
        if self.calibration_dataloader is None and self.config.needs_calibration:
            why = missing_validation_data(trainer, pl_module)
            if why is not None:
                raise no_data_error(why)
        if self.forward_fn is None:
            self._check_first_batch(trainer, pl_module)

    def _check_first_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        source = self.calibration_dataloader
        if source is not None and iter(source) is source:  # a one-shot iterator: peeking would consume a batch
            return
        if source is None and missing_validation_data(trainer, pl_module) is not None:
            return
        loaders, limits = self._loaders(trainer)
        with torch.random.fork_rng(devices=[]):  # a DataLoader iterator draws a seed: leave training's RNG alone
            batch = next(take_batches(trainer, loaders, limits, 1), None)
        if batch is not None:
            check_batch_fits_forward(pl_module, batch)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if any(isinstance(m, mq.QuantModule) for m in pl_module.modules()):
            self._info(trainer, f"PostTrainingQuantization: {type(pl_module).__name__} is already quantized; "
                                "not quantizing it again")
            return
        best = None
        if resolve_weights(trainer, self.weights) == "best":
            best = load_best_weights(trainer, pl_module)
            if best is None:
                self._warn(trainer, "weights='best' but the ModelCheckpoint saved no best checkpoint (did "
                                    "validation run?); quantizing the last weights", UserWarning)
        self.source = {"weights": "best", "checkpoint": best.path, "epoch": best.epoch, "global_step": best.global_step,
                       "monitor": best.monitor, "score": best.score} if best else {"weights": "last"}
        if best is not None:
            self._info(trainer, f"PostTrainingQuantization: quantizing the {best.describe()}")
        self.float_metric = self._float_value(trainer, best)
        self._fit_loaders = self._loaders(trainer)
        self.quantize(trainer, pl_module, self._fit_loaders)
        if self.save_to is not None:
            self._save(trainer, pl_module)

    def _float_value(self, trainer: pl.Trainer, best: BestWeights | None) -> float | None:
        """The monitored metric of the float weights being quantized (``None``, with a warning, if unknown)."""
        if self.monitor is None:
            return None
        if best is None:
            value = trainer.callback_metrics.get(self.monitor)
            value = float(value) if value is not None else None
        elif best.monitor == self.monitor:
            value = best.score
        else:
            value = self._monitor_history.get(best.global_step)
        if value is None:
            self._warn(trainer, f"monitor {self.monitor!r} was not logged for the weights being quantized "
                                f"(logged: {sorted(trainer.callback_metrics)}); the accuracy check after "
                                "quantization will have no float value to compare with", UserWarning)
        return value

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is None or trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.state.fn == "fit":
            if value is not None:  # ModelCheckpoint (ordered last) saves at this very global_step
                self._monitor_history[trainer.global_step] = float(value)
            return
        if not self.quantized or trainer.state.fn != "validate":
            return
        if value is None:
            self._warn(trainer, f"monitor {self.monitor!r} was not logged by this validation run "
                                f"(logged: {sorted(trainer.callback_metrics)}); no accuracy check", UserWarning)
            return
        self._check_accuracy(trainer, float(value))

    # ---- quantization -------------------------------------------------------------------------------
    def _loaders(self, trainer: pl.Trainer) -> Loaders:
        if self.calibration_dataloader is not None:  # one iterable of batches (a list of batches is not flattened)
            return [self.calibration_dataloader], [math.inf]
        return validation_loaders(trainer)

    def _forward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Any:
        with trainer.precision_plugin.val_step_context():  # autocast etc., as in the validation loop
            return run_batch(pl_module, batch, self.forward_fn)

    def quantize(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                 loaders: Loaders | None = None) -> mq.QuantReport:
        """Quantize ``pl_module`` now (what ``on_train_end`` does after choosing the weights); returns the report.

        ``loaders``: ``([loader, ...], [batch limit, ...])`` to take batches from; default: the
        ``calibration_dataloader`` or the trainer's validation loaders.
        """
        loaders, limits = loaders if loaders is not None else self._loaders(trainer)
        if not loaders and self.config.needs_calibration:
            raise no_data_error(missing_validation_data(trainer, pl_module) or "the validation dataloaders are empty")
        compare = list(take_batches(trainer, loaders, limits, self.compare_batches))
        with evaluating(pl_module):
            references = [self._forward(trainer, pl_module, b) for b in compare]
        floats = dict(pl_module.named_modules()) if compare else {}  # the float twins, for per-layer SQNR

        with warnings.catch_warnings():
            if not trainer.is_global_zero:  # every rank quantizes, calibrates and compares; rank zero warns
                warnings.simplefilter("ignore")
            # AWQ / SmoothQuant choose channel scales inside quantize_, which then also calibrates and freezes
            scales = self.config.smoothquant is not None or method_of(self.config.weights).is_awq
            batches = Replay(lambda: take_batches(trainer, loaders, limits, self.calibration_batches))
            data = dict(calibration_data=batches, max_batches=None,
                        forward_fn=lambda module, batch: self._forward(trainer, module, batch)) if scales else {}
            warnings.simplefilter("ignore", mq.CalibrationPendingWarning)  # calibrated right below
            report = mq.quantize_(pl_module, self.config, progress=False, **data)
            if mq.needs_calibration(pl_module):
                self._calibrate(trainer, pl_module, loaders, limits, report)
            if not loaders:
                report.warnings.append("no end-to-end comparison: no validation data; pass calibration_dataloader=...")
            # record first: if the check below raises, the callback state still describes the quantized module
            self.report = report
            self.quantized_layers = {row.name: row.scheme for row in report.quantized}
            try:
                if compare:
                    layers = {r.name: (pl_module.get_submodule(r.name), floats[r.name]) for r in report.quantized}
                    self._compare(trainer, pl_module, compare, references, layers, report)
                    del floats, layers
                    mq.accuracy.check_end_to_end(report, self.thresholds, self.on_failure)
            finally:
                self._publish(trainer, report)
        return report

    def _compare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any],
                 references: list[Any], layers: dict[str, tuple[torch.nn.Module, torch.nn.Module]],
                 report: mq.QuantReport) -> None:
        """Fill ``report.end_to_end`` and the rows' ``output_sqnr_db`` (after calibration and the cross-rank sync)."""
        comparison = OutputComparison(layers, trainer.strategy.root_device)
        with evaluating(pl_module, *(twin for _, twin in layers.values())), comparison.watching_layers():
            for batch, ref in zip(batches, references):
                comparison.update(ref, self._forward(trainer, pl_module, batch), batch)
        end_to_end, per_layer = comparison.compute(lambda t: trainer.strategy.reduce(t, reduce_op="sum"))
        report.record_end_to_end(end_to_end)
        for name, value in per_layer.items():
            report.row(name).output_sqnr_db = value

    def _calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loaders: list[Iterable[Any]],
                   limits: list[float], report: mq.QuantReport) -> None:
        """Calibrate and freeze (sequential GPTQ stages read the batches once per stage)."""
        seen = 0

        def forward(module: pl.LightningModule, batch: Any) -> Any:
            nonlocal seen
            seen += 1
            return self._forward(trainer, module, batch)

        batches = Replay(lambda: take_batches(trainer, loaders, limits, self.calibration_batches))
        try:  # statistics are all-reduced over ranks inside (no-op without torch.distributed)
            frozen = mq.calibrate_and_freeze(pl_module, batches, max_batches=None, forward_fn=forward, progress=False)
        except CalibrationError as e:
            if seen:
                raise
            source = "the validation dataloaders" if self.calibration_dataloader is None else "calibration_dataloader"
            raise no_data_error(f"{source} gave no batch") from e
        report.record_frozen(frozen)

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.saved_path = write_artifact(pl_module, self.save_to)
            size = self.saved_path.stat().st_size
            self._info(trainer, f"PostTrainingQuantization: wrote {self.saved_path} ({_size(size)}); load it "
                                f"without Lightning: mq.load({type(pl_module).__name__}(...), path)")
            self._log(trainer, {"quant/file_bytes": float(size)})
        trainer.strategy.barrier("monoquant_lightning.save")

    # ---- reporting ----------------------------------------------------------------------------------
    def _publish(self, trainer: pl.Trainer, report: mq.QuantReport) -> None:
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # on every rank: log_dir is a broadcast
        if not trainer.is_global_zero:
            return
        if self.verbose:
            print(report)
        self.report_path = self._write_report(trainer, report, log_dir)
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
            if row.output_sqnr_db is not None:
                metrics[f"quant/output_sqnr_db/{row.name}"] = float(row.output_sqnr_db)
        self._log(trainer, metrics)

    @staticmethod
    def _write_report(trainer: pl.Trainer, report: mq.QuantReport, log_dir: Path) -> Path:
        """Write the report as Markdown into the trainer's log directory (where CSV / TensorBoard users look) and
        hand it to every logger that takes text (TensorBoard's ``add_text``); rank zero only."""
        markdown = report.to_markdown()
        path = log_dir / REPORT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(markdown + "\n", encoding="utf-8")
        for logger in trainer.loggers:
            add_text = getattr(getattr(logger, "experiment", None), "add_text", None)
            if callable(add_text):
                add_text("monoquant/report", markdown, global_step=trainer.global_step)
        return path

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
