"""``quantize_`` and ``dequantize_``: swap layers in place, and back.

``quantize_`` runs plan -> build -> swap (one transaction) -> calibrate -> freeze -> measure; if anything fails
after the swap, every original module is put back and the error re-raised, so the model is exactly as before.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import awq, calibration, measure, output_aware
from . import functional as F
from .config import QuantConfig, WeightSpec, as_config
from .data import DEFAULT_MAX_BATCHES, ForwardFn, reiterable, tqdm_disable
from .errors import AlreadyQuantizedError, ConfigError, ModelError
from .formats import method_of
from .gptq import GPTQOptions
from .memory import release_freed_memory
from .nn import QuantModule, quant_class_for
from .report import (
    NOT_MEASURED_NOTE,
    CalibrationPendingWarning,
    LayerReport,
    NothingQuantizedWarning,
    QuantReport,
)
from .rules import Decision, SkipRules
from .swap import Swap, restore_encoder_fast_paths
from .thresholds import ON_FAILURE, Thresholds, check

MHA_OUT_PROJ_REASON = ("nn.MultiheadAttention reads out_proj.weight directly instead of calling it, "
                       "so no low-bit kernel could run")


@dataclass
class _Planned:
    """A candidate layer and what was decided for it."""

    name: str
    module: nn.Module
    qcls: type[QuantModule]
    decision: Decision
    config: QuantConfig
    """The config this layer is built with (its ``weights`` is the layer's format: a tied group shares one)."""


def _check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ModelError(f"expected a torch.nn.Module, got {type(model).__name__}; pass the model itself "
                         "(for a Lightning module or a wrapper, pass the nn.Module that holds the layers)")
    return model


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantModule]]:
    """``(name, layer)`` of every monoquant quantized layer in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantModule)]


def refuse_quantized(model: nn.Module, what: str) -> None:
    """Raise :class:`AlreadyQuantizedError` if ``model`` holds quantized layers where ``what`` needs a float model."""
    done = quantized_layers(model)
    if done:
        name, layer = done[0]
        raise AlreadyQuantizedError(
            f"{what} needs the float model, but {type(model).__name__} already holds {len(done)} quantized layer(s) "
            f"(e.g. {name or '<root>'}: {layer.scheme()}); nothing was changed. Run it on the float model before "
            "quantizing, or turn the model back to float first with mq.dequantize_(model) (float weights "
            "rebuilt from the stored low-bit ones, so their rounding error stays)")


def candidate_class(module: nn.Module, cfg: QuantConfig) -> type[QuantModule] | None:
    """The layer class that would replace float ``module`` under ``cfg`` (``None``: not a candidate, e.g. an
    embedding when ``cfg.embeddings`` is not set, or a layer that is already quantized)."""
    if isinstance(module, QuantModule):
        return None
    qcls = quant_class_for(module)
    return qcls if qcls is not None and getattr(cfg, qcls.config_field, None) is not None else None


def _structural_skip(module: nn.Module, qcls: type[QuantModule], spec: WeightSpec) -> str | None:
    """Reasons a layer must stay float whatever the rules say."""
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return MHA_OUT_PROJ_REASON
    method = method_of(spec)
    if method.is_gptq and not qcls.supports_gptq:
        return (f"{qcls.__name__} cannot be calibrated by GPTQ (method={method.name!r}); give it another method "
                "with a per-layer config to quantize it")
    weight = qcls.float_weight(module)
    if weight.numel() == 0:
        return f"empty weight {list(weight.shape)}: nothing to quantize"
    return qcls.unsupported_reason(module)


def _float_bytes(module: nn.Module) -> int:
    tensors = (*module.parameters(recurse=False), *module.buffers(recurse=False))
    return sum(t.numel() * t.element_size() for t in tensors)


def quantize_(
    model: nn.Module,
    config: QuantConfig | WeightSpec | str,
    *,
    calibration_data: Iterable[Any] | None = None,
    forward_fn: ForwardFn | None = None,
    max_batches: int | None = DEFAULT_MAX_BATCHES,
    target_sqnr: float | None = None,
    on_failure: str = "warn",
    thresholds: Thresholds | Mapping[str, Any] | None = None,
    progress: bool | None = None,
) -> QuantReport:
    """Replace every eligible ``nn.Linear`` / ``nn.Conv1d/2d/3d`` in ``model`` by its quantized twin, in place.

    Args:
        model: any ``nn.Module``; nested containers, modules used twice and tied weights are handled.
        config: a :class:`QuantConfig`, a bare weight format such as ``mq.Int4()`` (weight-only), or a format name
            such as ``"int4"`` (that format with its defaults, weight-only).
        calibration_data: batches (see :mod:`monoquant.data`). When given, the float model's outputs on the
            first :data:`~monoquant.measure.MEASURE_BATCHES` batches are recorded, and after quantization the
            report gets each layer's output SQNR on the same real inputs and the end-to-end output SQNR and
            top-1 agreement. The float layers are kept alive only until that measurement ends.
        forward_fn: ``(model, batch) -> output`` for batches ``model(batch)`` cannot take.
        max_batches: use at most this many batches of ``calibration_data`` (``None``: all).
        target_sqnr: end-to-end output SQNR (dB) to reach (needs ``calibration_data``): the layers whose
            quantization costs most are kept at INT8, then float, until it is met; the report says which.
        on_failure: what to do when a measurement falls below ``thresholds``: ``"warn"`` (an
            :class:`AccuracyWarning` each), ``"raise"`` (:class:`AccuracyError` with the report attached) or
            ``"ignore"`` (only listed in ``report.warnings``).
        thresholds: :class:`~monoquant.Thresholds` or a dict overriding some of its fields.
        progress: show a progress bar; ``None`` shows one only when stderr is a terminal.

    ``method="awq"``/``"awq+gptq"`` and ``QuantConfig(smoothquant=...)`` need ``calibration_data``: the channel
    scales are chosen on it before any layer is built, and folded into the float model's norms where exact (see
    :mod:`monoquant.awq`; a failure later undoes the folds too).

    Layers that need data (static activation quantization, ``method="gptq"``) are calibrated on
    ``calibration_data`` (up to ``max_batches`` batches, see :func:`monoquant.calibrate_with`), their
    statistics all-reduced when ``torch.distributed`` is initialised (each rank may pass its own shard: every
    rank then freezes identical qparams), and frozen before any measurement. Without data they wait for
    ``mq.calibrate`` + ``mq.freeze`` (``mq.needs_calibration(model)`` tells).

    All or nothing: every quantized layer is built and validated off the model first; the layers are then
    swapped in one transaction, and if anything fails afterwards (calibration data that raise or hold NaN, a
    layer that saw no data, GPTQ, measurement, an interrupt) every original module is put back and the error is
    re-raised: the model is exactly as before (same module objects, tensors, hooks and flags). The price is
    memory: the float layers stay alive until the call succeeds, so a model briefly holds its float and its
    quantized weights (about 1.25x the float size at INT8 and 1.14x at INT4-g128), plus the temporaries of the
    layer in work (each layer's are returned to the operating system before the next layer's are made). With
    GPTQ, the Hessians (``in x in`` float32) of at most :func:`~monoquant.calibration.hessian_budget`'s worth of
    layers are held at a time (more layers: one pass over the data per group of them, same results, see
    :func:`~monoquant.calibrate_and_freeze`), and the computed weights (their quantized size) until all are
    applied.

    Returns:
        A :class:`QuantReport` with one row per candidate layer (quantized, or skipped with its reason).

    Raises:
        ModelError: ``model`` is not an ``nn.Module``.
        ConfigError: a bad argument, or a layer that cannot be built (the model is untouched).
        NonFiniteWeightError: a weight holds NaN/Inf (checked for every layer before anything is changed).
        CalibrationError: calibration failed (the model is restored).
        AccuracyError: ``on_failure="raise"`` and a threshold was crossed (the model stays quantized; the
            report is attached).
    """
    model = _check_model(model)
    cfg = as_config(config)
    if on_failure not in ON_FAILURE:
        raise ConfigError(f"on_failure must be one of {ON_FAILURE}, got {on_failure!r}")
    limits = Thresholds.coerce(thresholds)
    if target_sqnr is not None and calibration_data is None:
        raise ConfigError("target_sqnr needs calibration_data=... to measure the model output on")
    data = reiterable(calibration_data, max_batches)
    rules = cfg.skip if cfg.skip is not None else SkipRules.defaults()
    finite_checks: dict = {}  # each weight is scanned for NaN/Inf once, while planning, not again while building
    with F.remembering_finite_checks(finite_checks):
        report, plan = _plan(model, cfg, rules)
    already = [r for r in report.layers if r.reason.startswith("already quantized")]
    if already and len(already) == len(report.layers):
        refuse_quantized(model, "quantize_")

    # output-aware GPTQ: small layers' output-gradient Grams, on the float model (folds leave them the same)
    grams = _output_grams(model, plan, data, forward_fn, max_batches, report)
    # AWQ / SmoothQuant: channel scales chosen on the float model and folded where exact (undone on failure)
    scaling = _scale_channels(model, plan, cfg, data, forward_fn, max_batches, report)
    try:
        # every layer is built (and calibration state attached) before the model is touched
        built: list[tuple[_Planned, QuantModule]] = []
        done: dict[int, QuantModule] = {}  # id(float weight) -> quantized module, to keep tied Linears tied
        with F.remembering_finite_checks(finite_checks):
            for item in tqdm(plan, desc="quantizing", unit="layer", disable=tqdm_disable(progress)):
                qcls = item.qcls
                source = scaling.source(item.name, item.module)  # W s for AWQ / SmoothQuant layers
                try:
                    q = qcls.from_float(source, item.config, name=item.name, group_size=item.decision.group_size)
                except (ConfigError, RuntimeError, ValueError, IndexError) as e:
                    raise ConfigError(f"layer {item.name!r} cannot be quantized ({e}); nothing was changed. Keep it "
                                      f"float with SkipRules(exclude=[{item.name!r}])") from e
                if scaling.input_scale(item.name) is not None:
                    q.set_input_scale(scaling.input_scale(item.name))
                weight = qcls.float_weight(source)
                twin = done.get(id(item.module.weight))
                if (twin is not None and twin.spec == q.spec and twin.group_size == q.group_size
                        and twin.weight_shape == q.weight_shape):
                    for buf in q.spec.buffer_names():
                        q._buffers[buf] = twin._buffers[buf]
                done.setdefault(id(item.module.weight), q)
                row = report.row(item.name)
                row.method = calibration.prepare(q, weight, item.config, item.name)
                if q.gptq is not None:  # output-aware GPTQ, small layer: against the model output's error
                    q.gptq.output_gram = grams.get(item.name)
                row.scheme, row.kind = q.scheme(), q.spec.kind
                row.follow_kernel(q)
                row.bytes_after = q.storage_bytes()
                row.weight_sqnr_db = measure.weight_sqnr(item.module, q)
                built.append((item, q))
                release_freed_memory()  # this layer's temporaries: else the process keeps them, layer after layer
        del done

        # the float model's outputs on the first few batches, recorded before any layer is swapped (AWQ folds
        # leave them unchanged)
        references = measure.record_reference(model, report, data, forward_fn, max_batches)

        with Swap(model) as swap:  # any exception below puts every original module back
            for item, q in built:
                swap.replace(item.module, q)
            swap.route_encoder_layers()
            if data is not None and calibration.needs_calibration(model):  # static activations, GPTQ
                report.record_frozen(calibration.calibrate_and_freeze(  # GPTQ output SQNR from the Hessian
                    model, data, max_batches=max_batches, forward_fn=forward_fn, progress=progress))
            if references is not None:  # measure, and meet target_sqnr if asked
                swapped = {item.name: measure.Swapped(item.module, q) for item, q in built}
                measure.measure_into(report, model, swapped, swap, cfg, references, forward_fn, target_sqnr, progress)
            swap.commit()
    except BaseException:
        scaling.undo()
        raise
    del built  # the float layers can go now

    report.unmatched_rules = rules.unmatched()
    _report_pending(report, model)
    if already:
        report.warn(f"{len(already)} layer(s) were already quantized and were left as they are (e.g. "
                    f"{already[0].name}: {already[0].scheme}); to quantize them with this config, run "
                    "mq.dequantize_(model) first", UserWarning, stacklevel=4)
    if references is None and report.quantized:
        report.notes.append(NOT_MEASURED_NOTE)
    if not report.quantized and not any(r.reason.startswith("already quantized") for r in report.layers):
        warnings.warn(f"quantize_ found no layer to quantize in {type(model).__name__} "
                      f"({len(report.layers)} candidates, all skipped); see the report for reasons",
                      NothingQuantizedWarning, stacklevel=2)
    kinds = {r.name: r.format_kind for r in report.quantized}
    order = [r.name for r in report.layers if not r.reason.startswith("already quantized")]
    check(report, limits, kinds, order, on_failure, stacklevel=4)
    if report.quantized:
        _tell_transformers(model, "attach")
    return report


def _report_pending(report: QuantReport, model: nn.Module) -> None:
    """Mark the rows of layers still waiting for calibration, and say so: they are not quantized yet."""
    pending = {name for name, _ in calibration.pending_layers(model)}
    for row in report.layers:
        row.pending = row.quantized and row.name in pending
    if report.pending:
        names = ", ".join(row.name for row in report.pending[:5]) + (", ..." if len(report.pending) > 5 else "")
        why = "GPTQ / static activations need calibration data"
        warnings.warn(f"{len(report.pending)} layer(s) wait for calibration and compute in float until then ({names}: "
                      f"{why}); pass calibration_data=... to quantize_, or run mq.calibrate_and_freeze(model, data) "
                      "afterwards", CalibrationPendingWarning, stacklevel=3)


def _output_grams(model: nn.Module, plan: list[_Planned], data: Iterable[Any] | None, forward_fn: ForwardFn | None,
                  max_batches: int | None, report: QuantReport) -> dict[str, torch.Tensor]:
    """The output-gradient Grams of the planned GPTQ layers whose options ask for output-aware rounding and that
    are small enough (:mod:`monoquant.output_aware`); none without calibration data (the report says so)."""
    untied = awq.scalable(model)
    layers = {}
    for item in plan:
        spec = item.config.weights
        if not (isinstance(item.module, nn.Linear) and method_of(spec).is_gptq and GPTQOptions.of(spec).output_aware
                and id(item.module) in untied):
            continue
        group = item.qcls._resolve_group_size(spec, item.module.in_features, item.decision.group_size)
        if output_aware.small_enough(item.module, group):
            layers[item.name] = item.module
    if data is None:
        if layers:
            report.notes.append(f"output-aware GPTQ: {len(layers)} layers with at most "
                                f"{output_aware.OUTPUT_AWARE_WEIGHTS} weights will be rounded against their own "
                                "output's error; pass calibration_data=... to quantize_ to round them against the "
                                "model output's")
        return {}
    grams, note = output_aware.collect(model, layers, data, forward_fn, max_batches)
    if note:
        report.notes.append(note)
    return grams


def _scale_channels(model: nn.Module, plan: list[_Planned], cfg: QuantConfig, data: Iterable[Any] | None,
                    forward_fn: ForwardFn | None, max_batches: int | None, report: QuantReport) -> awq.Scaling:
    """Run AWQ (``method="awq"``/``"awq+gptq"`` layers) or SmoothQuant (``cfg.smoothquant``) on the planned layers."""
    alpha = cfg.smoothquant_alpha
    untied = awq.scalable(model)
    layers = []
    for item in plan:
        spec = item.config.weights
        uses_awq = method_of(spec).is_awq
        smooth = alpha is not None and item.config.activations is not None and item.qcls.quantizes_inputs
        if not (uses_awq or smooth):
            continue
        if data is None:
            raise ConfigError(f"{'SmoothQuant' if smooth else f'method={method_of(spec).name!r}'} searches per-channel "
                              "scales on calibration activations: pass calibration_data=... (a few batches of real "
                              "inputs) to quantize_; nothing was changed")
        if id(item.module) in untied:
            group = item.qcls._resolve_group_size(spec, item.module.in_features, item.decision.group_size)
            layers.append(awq.ScaledLayer(item.name, item.module, spec, group, alpha if smooth else None))
    scaling = awq.scale_layers(model, layers, data, forward_fn, max_batches) if layers else awq.Scaling()
    if scaling.groups:
        report.notes.append(scaling.summary("SmoothQuant" if alpha is not None else "AWQ"))
    return scaling


def _plan(model: nn.Module, cfg: QuantConfig, rules: SkipRules) -> tuple[QuantReport, list[_Planned]]:
    """Decide, without changing anything, which layers to quantize; every skip gets a row with its reason.

    Layers sharing one weight tensor (a head tied to an embedding, tied Linears) are decided together: all are
    quantized, with one format (an embedding's, if one is among them) and one shared set of buffers, or all stay
    float, each saying which tied layer keeps it float."""
    rules.start([(n, m) for n, m in model.named_modules() if candidate_class(m, cfg) is not None])
    report = QuantReport()
    decided: dict[str, _Planned] = {}
    owners: dict[int, list[str]] = defaultdict(list)  # id(float weight) -> names of the layers sharing it
    for name, module in model.named_modules():
        if isinstance(module, QuantModule):
            report.layers.append(LayerReport(name, type(module).__name__, module.scheme(), kind=module.spec.kind,
                                             skipped=True,
                                             reason=f"already quantized ({module.scheme()})",
                                             bytes_before=module.storage_bytes(), bytes_after=module.storage_bytes()))
            continue
        w = getattr(module, "weight", None)  # ties are shared Parameter objects (never a view made here)
        qcls = candidate_class(module, cfg)
        if isinstance(w, torch.Tensor):
            owners[id(w)].append(name)
        if qcls is None:
            continue
        own = cfg if qcls.config_field == "weights" else dataclasses.replace(
            cfg, weights=getattr(cfg, qcls.config_field))
        reason = _structural_skip(module, qcls, own.weights)
        decision = Decision(False, reason) if reason else rules.decide(name, module, own.weights)
        decided[name] = _Planned(name, module, qcls, decision, own)
        report.layers.append(LayerReport(name, type(module).__name__, bytes_before=_float_bytes(module)))

    modules = dict(model.named_modules())
    for names in owners.values():
        if len(names) > 1:
            _decide_tied(names, decided, modules)

    plan: list[_Planned] = []
    for row in report.layers:
        if row.name not in decided:
            continue
        item = decided[row.name]
        if not item.decision.quantize:
            row.skipped, row.reason = True, item.decision.reason
            continue
        weight = item.qcls.float_weight(item.module)
        if weight.device.type == "meta":
            raise ConfigError(f"layer {row.name!r} is on the meta device (no weights); nothing was changed. Load "
                              "real weights before quantizing, or use mq.load(model, path) to load a quantized file")
        F.check_finite_weight(weight, row.name, "nothing was changed. Fix the weights, or keep the layer float "
                              f"with SkipRules(exclude=[{row.name!r}])")
        plan.append(item)
    return report, plan


def _decide_tied(names: list[str], decided: dict[str, _Planned], modules: dict[str, nn.Module]) -> None:
    """Make the layers ``names`` (sharing one weight) all quantized with one format, or all float."""
    floats = [n for n in names if n not in decided or not decided[n].decision.quantize]
    if floats:
        why = f"weight is tied to {floats[0]} ({type(modules[floats[0]]).__name__}), which stays float"
        for name in names:
            if name in decided and decided[name].decision.quantize:
                decided[name].decision = Decision(False, why)
        return
    # one format for the group: the one of a layer with its own config field (an embedding), else the first's
    lead = next((n for n in names if decided[n].qcls.config_field != "weights"), names[0])
    spec = decided[lead].config.weights
    for name in names:
        item = decided[name]
        if item.config.weights != spec:
            cols = item.qcls.float_weight(item.module)[0].numel()
            item.decision = Decision(True, group_size=spec.resolve_group_size(cols))
            item.config = dataclasses.replace(item.config, weights=spec)


def dequantize_(model: nn.Module) -> nn.Module:
    """Replace every quantized module in ``model`` by a plain float twin (``nn.Linear``/``nn.Conv*``...), in place.

    Hooks, train/eval flags, device and dtype carry over; layers that shared quantized weights (tied
    Linears) share one float weight ``Parameter`` again. All or nothing, like :func:`quantize_`. Returns ``model``.
    """
    model = _check_model(model)
    tied: dict[int, nn.Parameter] = {}  # id(qweight) -> float weight already made from it
    with Swap(model) as swap:
        for _, module in list(model.named_modules()):
            if isinstance(module, QuantModule) and id(module) not in swap.replaced:
                f = module.to_float()
                twin = tied.setdefault(id(module.qweight), f.weight)
                if twin is not f.weight and twin.shape == f.weight.shape:
                    f.weight = twin
                swap.replace(module, f)
        swap.commit()
    restore_encoder_fast_paths(model)
    _tell_transformers(model, "detach")
    return model


def _tell_transformers(model: nn.Module, action: str) -> None:
    """Run ``monoquant.hf.<action>(model)`` (attach/detach the ``save_pretrained`` quantizer) on a transformers model.

    The integration sits above this layer and needs transformers, so it is looked up by name, and only when the
    model is a transformers ``PreTrainedModel`` (transformers is then already imported): the core never imports it.
    """
    transformers = sys.modules.get("transformers")
    pretrained = getattr(transformers, "PreTrainedModel", None) if transformers is not None else None
    if pretrained is not None and isinstance(model, pretrained):
        getattr(importlib.import_module("monoquant.hf"), action)(model)
