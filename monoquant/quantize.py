"""``quantize_`` and ``dequantize_``: swap layers in place, and back."""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import accuracy, calibration, kernels
from . import functional as F
from .config import QuantConfig, WeightSpec, as_config
from .data import DEFAULT_MAX_BATCHES, ForwardFn, tqdm_disable
from .errors import ConfigError, ModelError, NonFiniteWeightError
from .nn import QuantModule, quant_class_for
from .report import LayerReport, NothingQuantizedWarning, QuantReport
from .rules import Decision, SkipRules

_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


MHA_OUT_PROJ_REASON = ("nn.MultiheadAttention reads out_proj.weight directly instead of calling it, "
                       "so no low-bit kernel could run")


_SAVED_FAST_PATH_FLAG = "_monoquant_activation_relu_or_gelu"


def route_encoder_layers_through_kernels(model: nn.Module) -> None:
    """Make ``nn.TransformerEncoderLayer``s with quantized ``linear1``/``linear2`` call those layers.

    In eval mode without grad, PyTorch's fused encoder fast path reads ``linear1.weight``/``linear2.weight``
    instead of calling the layers: a quantized layer would then run as a float weight rebuilt on every call,
    and its activation quantization would be skipped. The fast path is only taken while the layer's
    ``activation_relu_or_gelu`` flag is set, so it is cleared on such layers (the flag does nothing else; the
    activation function itself is unchanged) and its value saved; :func:`dequantize_` restores it.
    """
    for layer in model.modules():
        if (isinstance(layer, nn.TransformerEncoderLayer)
                and any(isinstance(c, QuantModule) for c in (layer.linear1, layer.linear2))
                and not hasattr(layer, _SAVED_FAST_PATH_FLAG)):
            setattr(layer, _SAVED_FAST_PATH_FLAG, layer.activation_relu_or_gelu)
            layer.activation_relu_or_gelu = 0


def _restore_encoder_fast_paths(model: nn.Module) -> None:
    for layer in model.modules():
        if isinstance(layer, nn.TransformerEncoderLayer) and hasattr(layer, _SAVED_FAST_PATH_FLAG):
            layer.activation_relu_or_gelu = getattr(layer, _SAVED_FAST_PATH_FLAG)
            delattr(layer, _SAVED_FAST_PATH_FLAG)


@dataclass
class _Planned:
    name: str
    module: nn.Module
    decision: Decision


def _check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ModelError(f"expected a torch.nn.Module, got {type(model).__name__}; pass the model itself "
                         "(for a Lightning module or a wrapper, pass the nn.Module that holds the layers)")
    return model


def _parents(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """``id(child) -> [(parent, attribute name), ...]`` over every place a module is registered."""
    where: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
    for _, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if child is not None and (parent, attr) not in where[id(child)]:
                where[id(child)].append((parent, attr))
    return where


def _structural_skip(module: nn.Module, weight_owners: dict[int, list[tuple[str, nn.Module]]]) -> str | None:
    """Reasons a layer must stay float whatever the rules say."""
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return MHA_OUT_PROJ_REASON
    for owner_name, owner in weight_owners.get(id(module.weight), []):
        if quant_class_for(owner) is None:
            return f"weight is tied to {owner_name} ({type(owner).__name__}), which stays float"
    return None


def _move_hooks(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst`` the very hook dicts of ``src``, so existing handles' ``remove()`` keeps working."""
    for hooks in _HOOK_DICTS:
        if hasattr(src, hooks):
            setattr(dst, hooks, getattr(src, hooks))


def _float_bytes(module: nn.Module) -> int:
    tensors = (*module.parameters(recurse=False), *module.buffers(recurse=False))
    return sum(t.numel() * t.element_size() for t in tensors)


def _weight_sqnr(float_module: nn.Module, q: QuantModule) -> float:
    with torch.no_grad():
        return F.sqnr(type(q).float_weight(float_module), q.dequantize_weight(torch.float32))


def quantize_(
    model: nn.Module,
    config: QuantConfig | WeightSpec,
    *,
    calibration_data: Iterable[Any] | None = None,
    forward_fn: ForwardFn | None = None,
    max_batches: int | None = DEFAULT_MAX_BATCHES,
    target_sqnr: float | None = None,
    on_failure: str = "warn",
    thresholds: accuracy.Thresholds | Mapping[str, Any] | None = None,
    progress: bool | None = None,
) -> QuantReport:
    """Replace every eligible ``nn.Linear`` / ``nn.Conv1d/2d/3d`` in ``model`` by its quantized twin, in place.

    Args:
        model: any ``nn.Module``; nested containers, modules used twice and tied weights are handled.
        config: a :class:`QuantConfig`, or a bare weight spec such as ``mq.Int4()`` (weight-only).
        calibration_data: batches (see :mod:`monoquant.data`). When given, the float model's outputs on the
            first :data:`~monoquant.accuracy.MEASURE_BATCHES` batches are recorded, and after quantization the
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

    Layers that need data (static activation quantization, ``method="gptq"``) are calibrated on
    ``calibration_data`` (up to ``max_batches`` batches, see :func:`monoquant.calibrate_with`), their
    statistics all-reduced when ``torch.distributed`` is initialised (each rank may pass its own shard: every
    rank then freezes identical qparams), and frozen before any measurement. Without data they wait for
    ``mq.calibrate`` + ``mq.freeze`` (``mq.needs_calibration(model)`` tells).

    Returns:
        A :class:`QuantReport` with one row per candidate layer (quantized, or skipped with its reason).

    Raises:
        ModelError: ``model`` is not an ``nn.Module``.
        NonFiniteWeightError: a weight holds NaN/Inf (checked for every layer before anything is changed).
        AccuracyError: ``on_failure="raise"`` and a threshold was crossed (the model stays quantized).
    """
    model = _check_model(model)
    cfg = as_config(config)
    if on_failure not in accuracy.ON_FAILURE:
        raise ConfigError(f"on_failure must be one of {accuracy.ON_FAILURE}, got {on_failure!r}")
    limits = accuracy.Thresholds.coerce(thresholds)
    if target_sqnr is not None and calibration_data is None:
        raise ConfigError("target_sqnr needs calibration_data=... to measure the model output on")
    data = accuracy.materialize(calibration_data, max_batches)
    rules = cfg.skip if cfg.skip is not None else SkipRules.defaults()
    rules.start([(n, m) for n, m in model.named_modules()
                 if quant_class_for(m) is not None and not isinstance(m, QuantModule)])
    report = QuantReport()

    weight_owners: dict[int, list[tuple[str, nn.Module]]] = defaultdict(list)
    for name, module in model.named_modules():
        w = None if isinstance(module, QuantModule) else getattr(module, "weight", None)  # (would dequantize)
        if isinstance(w, torch.Tensor):
            weight_owners[id(w)].append((name, module))

    plan: list[_Planned] = []
    for name, module in model.named_modules():
        if isinstance(module, QuantModule):
            report.layers.append(LayerReport(name, type(module).__name__, module.scheme(), skipped=True,
                                             reason=f"already quantized ({module.scheme()})",
                                             bytes_before=module.storage_bytes(), bytes_after=module.storage_bytes()))
            continue
        if quant_class_for(module) is None:
            continue
        row = LayerReport(name, type(module).__name__, bytes_before=_float_bytes(module))
        reason = _structural_skip(module, weight_owners)
        decision = Decision(False, reason) if reason else rules.decide(name, module, cfg.weights)
        if not decision.quantize:
            row.skipped, row.reason = True, decision.reason
            report.layers.append(row)
            continue
        if module.weight.device.type == "meta":
            raise ConfigError(f"layer {name!r} is on the meta device (no weights); nothing was changed. Load real "
                              "weights before quantizing, or use mq.load(model, path) to load a quantized file")
        if not torch.isfinite(module.weight.detach()).all():
            raise NonFiniteWeightError(
                f"layer {name!r} has NaN or Inf in its weight; nothing was changed. Fix the weights, or keep the "
                f"layer float with SkipRules(exclude=[{name!r}])"
            )
        report.layers.append(row)
        plan.append(_Planned(name, module, decision))

    # the float model's outputs on the first few batches, recorded before anything changes
    references = accuracy.record_reference(model, report, data, forward_fn, max_batches)

    order = [r.name for r in report.layers if not r.reason.startswith("already quantized")]
    swapped: dict[str, accuracy.Swapped] = {}  # float originals, kept only while measuring
    parents = _parents(model)
    done: dict[int, QuantModule] = {}  # id(float weight) -> quantized module, to keep tied Linears tied
    rows = {r.name: r for r in report.layers}
    for item in tqdm(plan, desc="quantizing", unit="layer", disable=tqdm_disable(progress)):
        module, qcls = item.module, quant_class_for(item.module)
        q = qcls.from_float(module, cfg, name=item.name, group_size=item.decision.group_size)
        twin = done.get(id(module.weight))
        if twin is not None and type(twin) is qcls and twin.weight_shape == q.weight_shape:
            for buf in ("qweight", "scale", "zero_point"):
                q._buffers[buf] = twin._buffers[buf]
        done.setdefault(id(module.weight), q)
        _move_hooks(module, q)
        for parent, attr in parents[id(module)]:
            setattr(parent, attr, q)
        if references is not None:
            swapped[item.name] = accuracy.Swapped(module, q, parents[id(module)])
        row = rows[item.name]
        row.method = calibration.prepare(q, qcls.float_weight(module), cfg, item.name)
        row.scheme, row.kernel, row.bytes_after = q.scheme(), kernels.kernel_summary(q), q.storage_bytes()
        row.weight_sqnr_db = _weight_sqnr(module, q)
    del plan
    route_encoder_layers_through_kernels(model)

    if data is not None and calibration.needs_calibration(model):  # static activations, GPTQ
        calibration.calibrate_with(model, data, max_batches=max_batches, forward_fn=forward_fn, progress=progress)
        calibration.sync_observers(model)  # no-op unless torch.distributed is initialised
        report.record_frozen(calibration.freeze(model))  # GPTQ output SQNR from the Hessian; measuring may refine

    if references is not None:  # after swapping (and calibrating): measure, and meet target_sqnr if asked
        accuracy.measure_into(report, model, swapped, cfg, references, forward_fn, target_sqnr, progress)
        swapped.clear()  # the float layers can go now

    report.unmatched_rules = rules.unmatched()
    if not report.quantized and not any(r.reason.startswith("already quantized") for r in report.layers):
        warnings.warn(f"quantize_ found no layer to quantize in {type(model).__name__} "
                      f"({len(report.layers)} candidates, all skipped); see the report for reasons",
                      NothingQuantizedWarning, stacklevel=2)
    kinds = {r.name: _kind_of(r.scheme) for r in report.quantized}
    accuracy.check(report, limits, kinds, order, on_failure, stacklevel=4)
    return report


def _kind_of(scheme: str) -> str:
    return scheme.split("-", 1)[0]


def dequantize_(model: nn.Module) -> nn.Module:
    """Replace every quantized module in ``model`` by a plain float ``nn.Linear``/``nn.Conv*``, in place.

    Hooks, train/eval flags, device and dtype carry over; layers that shared quantized weights (tied
    Linears) share one float weight ``Parameter`` again. Returns ``model``.
    """
    model = _check_model(model)
    parents = _parents(model)
    floats: dict[int, nn.Module] = {}
    tied: dict[int, nn.Parameter] = {}  # id(qweight) -> float weight already made from it
    for _, module in list(model.named_modules()):
        if isinstance(module, QuantModule) and id(module) not in floats:
            floats[id(module)] = f = module.to_float()
            twin = tied.setdefault(id(module.qweight), f.weight)
            if twin is not f.weight and twin.shape == f.weight.shape:
                f.weight = twin
            _move_hooks(module, f)
            for parent, attr in parents[id(module)]:
                setattr(parent, attr, f)
    _restore_encoder_fast_paths(model)
    return model
