"""Measuring what quantization cost: end-to-end comparison, per-layer output SQNR on real inputs, threshold
checks (:class:`Thresholds`) and per-layer sensitivity.

Everything here is measured on the caller's data: model outputs are compared with the float model's outputs
on the same batches, and each quantized layer's output is compared with its float twin run on the *same*
inputs (captured with forward hooks during the same pass). Formulas live in :mod:`monoquant.functional`.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import functional as F
from . import kernels
from .config import Int4, Int8, QuantConfig, WeightSpec, as_config
from .data import ForwardFn, iter_batches, run_batch, tqdm_disable
from .errors import AccuracyError, ConfigError, ModelError
from .report import AccuracyWarning, NothingQuantizedWarning, QuantReport

if TYPE_CHECKING:
    from .nn import QuantModule
    from .rules import SkipRules

MEASURE_BATCHES = 8
"""Batches of ``calibration_data`` that ``quantize_`` uses to measure output SQNR (the first ones)."""

ON_FAILURE = ("warn", "raise", "ignore")


# ---- thresholds -------------------------------------------------------------------------------------------
@dataclass
class Thresholds:
    """When :func:`~monoquant.quantize_` raises :class:`~monoquant.AccuracyWarning` (or ``AccuracyError``).

    Floors are in dB and keyed by the weight kind (``"int8"``, ``"int4"``, ``"float16"``, ``"bfloat16"``); a
    dict overrides only the kinds it names, a single number sets every kind, ``None`` disables the check.

    Defaults were chosen from the measurements printed by
    ``benchmarks/bench_sqnr.py`` (random-init, Adam-trained and Student-t-weight MLPs, a small CNN and the
    example model): well-behaved layers sit 5-20 dB above them (INT8 weights 36-48 dB, INT4-g128 17-24 dB,
    layer outputs likewise, model outputs 34-49 dB at INT8 and 13-31 dB at INT4, top-1 agreement >= 0.82 even
    on random-init models whose logits are near ties), so only a damaged layer falls below. Output SQNR on
    real inputs is the check that catches most damage: a group with a huge outlier weight on an input that is
    (nearly) always zero wrecks the group's other weights while the weight SQNR, dominated by the outlier's
    energy, still looks fine.

    Args:
        weight_sqnr_db: minimum SQNR of each quantized layer's dequantized weight vs its float weight.
        output_sqnr_db: minimum SQNR of each quantized layer's output vs its float twin on the same inputs
            (measured only when calibration data are given).
        end_to_end_sqnr_db: minimum SQNR of the model output vs the float model (calibration data needed).
        top1_agreement: minimum fraction of arg-max predictions shared with the float model, for
            classification-like outputs (``[batch, classes]`` tensors or a ``logits`` entry).
        min_calibration_samples: warn when calibration data hold fewer samples than this.
        int4_first_and_last: warn when both the first and the last quantizable layer (in ``named_modules``
            order, models with at least three of them) are INT4.
    """

    weight_sqnr_db: dict[str, float | None] = field(
        default_factory=lambda: {"int8": 28.0, "int4": 12.0, "float16": 60.0, "bfloat16": 45.0})
    output_sqnr_db: dict[str, float | None] = field(
        default_factory=lambda: {"int8": 25.0, "int4": 10.0, "float16": 35.0, "bfloat16": 35.0})
    end_to_end_sqnr_db: dict[str, float | None] = field(
        default_factory=lambda: {"int8": 20.0, "int4": 8.0, "float16": 30.0, "bfloat16": 30.0})
    top1_agreement: float | None = 0.7
    min_calibration_samples: int | None = 32
    int4_first_and_last: bool = True

    def __post_init__(self) -> None:
        # a dict given for a floor field overrides only the kinds it names; a number sets every kind
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_sqnr_db"):
                default = f.default_factory()  # type: ignore[misc]
                if isinstance(value, Mapping):
                    value = {**default, **value}
                elif value is None or isinstance(value, (int, float)):
                    value = dict.fromkeys(default, None if value is None else float(value))
                else:
                    raise ConfigError(f"{f.name} must be a dict of dB floors per kind, a number or None, "
                                      f"got {value!r}")
                setattr(self, f.name, value)

    @classmethod
    def coerce(cls, value: Thresholds | Mapping[str, Any] | None) -> Thresholds:
        """``None`` -> defaults; a mapping overrides only the fields it names (dict fields are merged)."""
        if value is None:
            return cls()
        if isinstance(value, Thresholds):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"thresholds must be mq.Thresholds(...) or a dict of overrides, got {value!r}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ConfigError(f"unknown threshold(s) {unknown}; valid names: {sorted(names)}")
        return cls(**value)


# ---- comparing outputs --------------------------------------------------------------------------------------
def _output_tensors(out: Any, path: str = "") -> list[tuple[str, torch.Tensor]]:
    """Every floating-point tensor inside a model output, with a path (``""``, ``"logits"``, ``"0"``...)."""
    if isinstance(out, torch.Tensor):
        return [(path, out)] if out.is_floating_point() or out.is_complex() else []
    if isinstance(out, Mapping):
        items: Iterable[tuple[Any, Any]] = out.items()
    elif isinstance(out, (list, tuple)):
        items = enumerate(out)
    else:
        return []
    found: list[tuple[str, torch.Tensor]] = []
    for key, value in items:
        found.extend(_output_tensors(value, f"{path}.{key}" if path else str(key)))
    return found


def _logits(tensors: list[tuple[str, torch.Tensor]]) -> torch.Tensor | None:
    """The classification-like tensor of an output: a ``logits`` entry, or a lone ``[batch, classes]`` tensor."""
    for path, t in tensors:
        if path.rsplit(".", 1)[-1] == "logits" and t.dim() >= 2 and t.shape[-1] >= 2:
            return t
    if tensors and tensors[0][1].dim() == 2 and tensors[0][1].shape[-1] >= 2:
        return tensors[0][1]
    return None


def _first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    values = x.values() if isinstance(x, Mapping) else x if isinstance(x, (list, tuple)) else ()
    for v in values:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def batch_size(batch: Any) -> int:
    """Samples in a batch: the leading dim of its first tensor (1 when it holds none, or a 0-d one)."""
    t = _first_tensor(batch)
    return int(t.shape[0]) if t is not None and t.dim() else 1


@dataclass
class Comparison:
    """End-to-end comparison of a quantized model with its float reference on the same batches.

    ``sqnr_db`` pools every floating-point tensor of the outputs; ``top1_agreement`` is ``None`` when the
    output is not classification-like. ``comparison["sqnr_db"]`` works too.
    """

    sqnr_db: float
    top1_agreement: float | None
    batches: int
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


class OutputStats:
    """Accumulates signal/noise powers and top-1 matches over batches."""

    def __init__(self) -> None:
        self.signal = self.noise = 0.0
        self.agree = self.total = self.batches = self.samples = 0
        self.classify = True

    def add(self, reference: Any, approximation: Any, samples: int) -> None:
        ref, approx = _output_tensors(reference), _output_tensors(approximation)
        if [(p, t.shape) for p, t in ref] != [(p, t.shape) for p, t in approx] or not ref:
            raise ModelError("the float and quantized models returned outputs of different structure or shape "
                             "(or no floating-point tensor); pass forward_fn=lambda model, batch: ... returning "
                             "the output tensor to compare")
        for (_, r), (_, a) in zip(ref, approx):
            s, n = F.signal_noise_powers(r, a)
            self.signal += s
            self.noise += n
        lr, la = _logits(ref), _logits(approx)
        if lr is None or la is None:
            self.classify = False
        else:
            agree, total = F.top1_matches(lr, la)
            self.agree += agree
            self.total += total
        self.batches += 1
        self.samples += samples

    def result(self) -> Comparison:
        top1 = self.agree / self.total if self.classify and self.total else None
        return Comparison(F.sqnr_from_powers(self.signal, self.noise), top1, self.batches, self.samples)


@contextlib.contextmanager
def evaluating(*models: nn.Module) -> Iterator[None]:
    """Put models in eval mode (dropout off) under ``no_grad``, restoring every module's flag afterwards."""
    flags = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        with torch.no_grad():
            yield
    finally:
        for m, training in flags:
            m.training = training


def _check_data(data: Any) -> None:
    if data is None:
        raise ConfigError("no data to measure on: pass an iterable of batches (a DataLoader, a list of tensors...)")


def compare(
    float_model: nn.Module,
    quant_model: nn.Module,
    data: Iterable[Any],
    *,
    forward_fn: ForwardFn | None = None,
    max_batches: int | None = None,
    progress: bool | None = None,
) -> Comparison:
    """Run both models on the same batches (in eval mode, no grad) and compare their outputs.

    Args:
        float_model: the reference model (keep a ``copy.deepcopy`` before ``quantize_`` to have one).
        quant_model: the quantized model.
        data: iterable of batches, fed as described in :mod:`monoquant.data`.
        forward_fn: ``(model, batch) -> output`` for batches ``model(batch)`` cannot take.
        max_batches: compare on at most this many batches (``None``: all).
        progress: progress bar (``None``: only on a terminal).

    Returns:
        :class:`Comparison` with the output SQNR in dB, top-1 agreement (classification-like outputs) and the
        number of batches and samples used.
    """
    _check_data(data)
    stats = OutputStats()
    with evaluating(float_model, quant_model):
        for batch in iter_batches(data, max_batches, desc="comparing", progress=progress):
            stats.add(run_batch(float_model, batch, forward_fn), run_batch(quant_model, batch, forward_fn),
                      batch_size(batch))
    if not stats.batches:
        raise ConfigError("data gave no batch to compare on")
    return stats.result()


# ---- measuring inside quantize_ ---------------------------------------------------------------------------
@dataclass
class Swapped:
    """A layer ``quantize_`` replaced: the float original (kept only until measurement ends), its quantized
    twin, and every ``(parent, attribute)`` slot the layer is registered in."""

    float_module: nn.Module
    quant_module: nn.Module
    slots: list[tuple[nn.Module, str]]

    def put(self, module: nn.Module) -> None:
        for parent, attr in self.slots:
            setattr(parent, attr, module)


def materialize(data: Iterable[Any] | None, max_batches: int | None) -> Iterable[Any] | None:
    """``data`` itself if it can be iterated twice, else its first ``max_batches`` batches as a list (a
    generator would be exhausted by calibration before measurement could see it)."""
    if data is None:
        return None
    if isinstance(data, (torch.Tensor, Mapping)) or not isinstance(data, Iterable):
        next(iter_batches(data))  # raises the usual error message
    if iter(data) is data:  # a one-shot iterator
        return list(iter_batches(data, max_batches, progress=False))
    return data


def count_samples(data: Iterable[Any], max_batches: int | None) -> int | None:
    """Samples the first ``max_batches`` batches hold, when that is knowable without loading data."""
    if isinstance(data, Sequence):
        return sum(batch_size(b) for b in list(data)[:max_batches])
    dataset, size = getattr(data, "dataset", None), getattr(data, "batch_size", None)
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        return None
    return min(n, max_batches * size) if max_batches is not None and size else n


@dataclass
class Reference:
    """The batches a measurement uses and the float model's outputs on them.

    The batches themselves are kept (not re-read from the data), so a shuffling loader or random
    augmentation cannot make the float and quantized passes see different inputs."""

    batches: list[Any]
    outputs: list[Any]
    samples: list[int]

    def __len__(self) -> int:
        return len(self.batches)


def record_outputs(model: nn.Module, data: Iterable[Any], forward_fn: ForwardFn | None,
                   max_batches: int | None) -> Reference:
    """The first ``max_batches`` batches of ``data`` and the float model's outputs on them."""
    ref = Reference([], [], [])
    with evaluating(model):
        for batch in iter_batches(data, max_batches, desc="float reference", progress=False):
            ref.batches.append(batch)
            ref.outputs.append(run_batch(model, batch, forward_fn))
            ref.samples.append(batch_size(batch))
    return ref


def record_reference(model: nn.Module, report: QuantReport, data: Iterable[Any] | None,
                     forward_fn: ForwardFn | None, max_batches: int | None) -> Reference | None:
    """Record the float model's outputs on the first (up to :data:`MEASURE_BATCHES`) batches of ``data`` and
    set ``report.calibration_samples``; ``None`` when there are no data."""
    if data is None:
        return None
    measure_batches = min(max_batches or MEASURE_BATCHES, MEASURE_BATCHES)
    references = record_outputs(model, data, forward_fn, measure_batches)
    if not references:
        raise ConfigError("calibration_data gave no batch; pass a non-empty iterable of batches")
    report.calibration_samples = count_samples(data, max_batches)
    if report.calibration_samples is None and len(references) < measure_batches:
        report.calibration_samples = sum(references.samples)  # data ran out: this is all of it
    return references


def measure_into(
    report: QuantReport,
    model: nn.Module,
    swapped: dict[str, Swapped],
    cfg: QuantConfig,
    references: Reference,
    forward_fn: ForwardFn | None,
    target_sqnr: float | None = None,
    progress: bool | None = None,
) -> None:
    """Fill ``report`` with each swapped layer's output SQNR and the end-to-end comparison, first keeping
    layers at higher precision until ``target_sqnr`` is met when one is given (see :func:`meet_target`)."""
    if target_sqnr is not None:
        report.end_to_end["target_sqnr_db"] = float(target_sqnr)
        result, _ = measure(model, references, forward_fn)
        meet_target(model, report, swapped, cfg, target_sqnr, result, references, forward_fn, progress)
    result, layer_sqnr = measure(model, references, forward_fn, swapped)
    for name, value in layer_sqnr.items():
        report.row(name).output_sqnr_db = value
    report.end_to_end["sqnr_db"] = result.sqnr_db
    if result.top1_agreement is not None:
        report.end_to_end["top1_agreement"] = result.top1_agreement
    report.end_to_end["batches"] = result.batches
    report.end_to_end["samples"] = result.samples


def measure(
    model: nn.Module,
    references: Reference,
    forward_fn: ForwardFn | None,
    layers: Mapping[str, Swapped] | None = None,
) -> tuple[Comparison, dict[str, float]]:
    """End-to-end comparison against ``references`` and, for each of ``layers``, its output SQNR: the
    quantized layer's output vs its float twin run on the very inputs the quantized model fed it."""
    powers = {name: [0.0, 0.0] for name in layers or {}}
    handles = []

    def hook_for(name: str, float_module: nn.Module):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            expected = float_module.forward(*args, **kwargs)  # .forward: the user's hooks run once, on the twin
            s, n = F.signal_noise_powers(expected, output)
            powers[name][0] += s
            powers[name][1] += n
        return hook

    for name, sw in (layers or {}).items():
        handles.append(sw.quant_module.register_forward_hook(hook_for(name, sw.float_module), with_kwargs=True,
                                                             prepend=True))
    stats = OutputStats()
    try:
        with evaluating(model):
            for batch, ref, samples in zip(references.batches, references.outputs, references.samples):
                stats.add(ref, run_batch(model, batch, forward_fn), samples)
    finally:
        for h in handles:
            h.remove()
    return stats.result(), {n: F.sqnr_from_powers(*p) for n, p in powers.items() if p != [0.0, 0.0]}


def _fill_row(report: QuantReport, name: str, q: QuantModule | None, note: str) -> None:

    row = report.row(name)
    if q is None:
        row.skipped, row.reason = True, note
        row.scheme = row.kernel = ""
        row.weight_sqnr_db = row.output_sqnr_db = None
        row.bytes_after = row.bytes_before
        return
    row.scheme, row.kernel, row.bytes_after = q.scheme(), kernels.kernel_summary(q), q.storage_bytes()
    row.note = note


INT8_TOLERANCE_DB = 1.0
"""Target mode keeps a layer at INT8 rather than float when INT8 gets the model output within this many dB
of what float gets (or reaches the target outright)."""


def _int8_twin(name: str, sw: Swapped, cfg: QuantConfig) -> nn.Module:
    """The float layer quantized to INT8 weights (weight-only), sharing the hooks of the layer it replaces."""
    from .nn import quant_class_for
    from .quantize import _move_hooks

    q8 = quant_class_for(sw.float_module).from_float(
        sw.float_module, QuantConfig(Int8(), compute_dtype=cfg.compute_dtype), name=name)
    _move_hooks(sw.quant_module, q8)
    q8.train(sw.quant_module.training)
    return q8


def meet_target(
    model: nn.Module,
    report: QuantReport,
    swapped: dict[str, Swapped],
    cfg: QuantConfig,
    target_sqnr: float,
    current: Comparison,
    references: Reference,
    forward_fn: ForwardFn | None,
    progress: bool | None = None,
) -> Comparison:
    """Keep the most damaging layers at higher precision until the model output's SQNR reaches ``target_sqnr``.

    Damage is measured leave-one-out: the end-to-end SQNR gained by putting each layer back in float, all others
    staying quantized. Layers are then taken most damaging first: an INT4 layer goes to INT8 weights when that
    reaches the target or comes within :data:`INT8_TOLERANCE_DB` of what float gives, else to float. Updates
    ``report`` rows (``note`` / skip ``reason`` say why) and returns the final comparison."""
    from .quantize import _weight_sqnr

    if current.sqnr_db >= target_sqnr:
        return current
    gains: dict[str, float] = {}
    for name, sw in tqdm(swapped.items(), desc="ranking layers", unit="layer",
                         disable=tqdm_disable(progress)):
        sw.put(sw.float_module)
        gains[name] = measure(model, references, forward_fn)[0].sqnr_db - current.sqnr_db
        sw.put(sw.quant_module)
    for name in sorted(gains, key=lambda n: -gains[n]):
        if current.sqnr_db >= target_sqnr:
            break
        sw = swapped[name]
        why = f"to meet target_sqnr={target_sqnr:g} dB: model output SQNR {current.sqnr_db:.1f} -> "
        sw.put(sw.float_module)
        as_float = measure(model, references, forward_fn)[0]
        if isinstance(cfg.weights, Int4):
            q8 = _int8_twin(name, sw, cfg)
            sw.put(q8)
            as_int8 = measure(model, references, forward_fn)[0]
            if as_int8.sqnr_db >= min(target_sqnr, as_float.sqnr_db - INT8_TOLERANCE_DB):
                sw.quant_module = q8
                _fill_row(report, name, q8, f"kept at int8 {why}{as_int8.sqnr_db:.1f} dB")
                report.row(name).weight_sqnr_db = _weight_sqnr(sw.float_module, q8)
                current = as_int8
                continue
            sw.put(sw.float_module)
        _fill_row(report, name, None, f"kept float {why}{as_float.sqnr_db:.1f} dB")
        current = as_float
    for name in [n for n, sw in swapped.items() if report.row(n).skipped]:
        del swapped[name]
    return current


def check(report: QuantReport, thresholds: Thresholds, kinds: Mapping[str, str], order: Sequence[str],
          on_failure: str, stacklevel: int = 4) -> None:
    """Compare the report's measurements with ``thresholds``; warn, raise or ignore per ``on_failure``.

    ``kinds`` maps each quantized layer to its weight kind; ``order`` lists every quantizable layer in
    model order (for the first/last INT4 check)."""
    problems: list[str] = []
    for row in report.quantized:
        kind = kinds.get(row.name, "")
        floor = thresholds.weight_sqnr_db.get(kind)
        if floor is not None and row.weight_sqnr_db is not None and row.weight_sqnr_db < floor:
            problems.append(f"layer {row.name!r} ({row.scheme}): weight SQNR {row.weight_sqnr_db:.1f} dB is below "
                            f"{floor:g} dB (outlier weights?); keep it at higher precision with "
                            f"SkipRules(exclude=[{row.name!r}]) or use a smaller group size")
        floor = thresholds.output_sqnr_db.get(kind)
        if floor is not None and row.output_sqnr_db is not None and row.output_sqnr_db < floor:
            problems.append(f"layer {row.name!r} ({row.scheme}): output SQNR {row.output_sqnr_db:.1f} dB on "
                            f"calibration data is below {floor:g} dB; keep it at higher precision with "
                            f"SkipRules(exclude=[{row.name!r}])")
    problems += _end_to_end_problems(report, thresholds, kinds)
    n = report.calibration_samples
    if thresholds.min_calibration_samples is not None and n is not None and n < thresholds.min_calibration_samples:
        problems.append(f"calibration data hold only {n} samples (< {thresholds.min_calibration_samples}); "
                        "measurements and activation ranges are unreliable: pass more batches")
    if thresholds.int4_first_and_last and len(order) >= 3 and all(kinds.get(n) == "int4" for n in (order[0],
                                                                                                     order[-1])):
        problems.append(f"the first ({order[0]!r}) and last ({order[-1]!r}) layers are both INT4, which usually "
                        "costs most accuracy; keep one at INT8/float with "
                        f"SkipRules(exclude=[{order[-1]!r}])")
    _act(report, problems, on_failure, stacklevel + 1)


def check_end_to_end(report: QuantReport, thresholds: Thresholds | Mapping[str, Any] | None = None,
                     on_failure: str = "warn") -> None:
    """Check only ``report.end_to_end`` (model-output SQNR, top-1 agreement) against ``thresholds``.

    For code that measures the comparison itself after :func:`monoquant.quantize_` (the Lightning callback);
    the floor is the one for the lowest-precision weight kind in the report. ``on_failure`` as in
    :func:`monoquant.quantize_`.
    """
    kinds = {row.name: row.scheme.split("-", 1)[0] for row in report.quantized}
    _act(report, _end_to_end_problems(report, Thresholds.coerce(thresholds), kinds), on_failure, 4)


def _end_to_end_problems(report: QuantReport, thresholds: Thresholds, kinds: Mapping[str, str]) -> list[str]:
    problems = []
    e2e = report.end_to_end
    main_kind = min((kinds[r.name] for r in report.quantized if r.name in kinds),
                    key=lambda k: {"int4": 0, "int8": 1}.get(k, 2), default=None)
    floor = thresholds.end_to_end_sqnr_db.get(main_kind) if main_kind else None
    if floor is not None and "sqnr_db" in e2e and e2e["sqnr_db"] < floor:
        problems.append(f"model output SQNR {e2e['sqnr_db']:.1f} dB is below {floor:g} dB; see "
                        "mq.sensitivity(...) for the layers that cost most, or pass target_sqnr=...")
    if "target_sqnr_db" in e2e and e2e.get("sqnr_db", float("inf")) < e2e["target_sqnr_db"]:
        problems.append(f"target_sqnr={e2e['target_sqnr_db']:g} dB not met: {e2e['sqnr_db']:.1f} dB")
    top1 = e2e.get("top1_agreement")
    if thresholds.top1_agreement is not None and top1 is not None and top1 < thresholds.top1_agreement:
        problems.append(f"top-1 agreement with the float model is {top1:.1%}, below "
                        f"{thresholds.top1_agreement:.0%}")
    return problems


def _act(report: QuantReport, problems: list[str], on_failure: str, stacklevel: int) -> None:
    """Record ``problems`` in the report and warn, raise or stay quiet per ``on_failure``."""
    if on_failure == "ignore":
        report.warnings.extend(problems)
        return
    if on_failure == "raise" and problems:
        report.warnings.extend(problems)
        raise AccuracyError("quantization failed accuracy checks:\n- " + "\n- ".join(problems) +
                            "\n(the report is attached as .report; pass on_failure='warn' to continue anyway)",
                            report=report)
    for p in problems:
        report.warn(p, AccuracyWarning, stacklevel=stacklevel)


# ---- sensitivity ------------------------------------------------------------------------------------------
@dataclass
class LayerSensitivity:
    """End-to-end effect of quantizing one layer alone (every other layer float)."""

    name: str
    scheme: str
    sqnr_db: float
    top1_agreement: float | None


def sensitivity(
    model: nn.Module,
    config: QuantConfig | WeightSpec,
    data: Iterable[Any],
    *,
    forward_fn: ForwardFn | None = None,
    max_batches: int | None = MEASURE_BATCHES,
    progress: bool | None = None,
) -> list[LayerSensitivity]:
    """Quantize one layer at a time and rank layers by the end-to-end error each one causes alone.

    The model is left exactly as it was (each layer is swapped in, measured and swapped back; no copy of the
    model is made). Layers the config's skip rules keep float are not measured.

    Returns:
        One :class:`LayerSensitivity` per quantizable layer, most damaging (lowest output SQNR) first.
    """
    from .nn import QuantModule, quant_class_for
    from .quantize import _parents, quantize_

    cfg = as_config(config)
    _check_data(data)
    references = record_outputs(model, data, forward_fn, max_batches)
    if not references:
        raise ConfigError("data gave no batch to measure on")
    parents = _parents(model)
    candidates = [(n, m) for n, m in model.named_modules()
                  if quant_class_for(m) is not None and not isinstance(m, QuantModule)]
    base = cfg.skip
    results: list[LayerSensitivity] = []
    for name, module in tqdm(candidates, desc="sensitivity", unit="layer",
                             disable=tqdm_disable(progress)):
        rules = _only(base, name)
        # static activations and GPTQ need calibration: give them the measurement batches
        calib = {"calibration_data": references.batches} if cfg.needs_calibration else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NothingQuantizedWarning)
            report = quantize_(model, QuantConfig(cfg.weights, cfg.activations, rules, cfg.compute_dtype),
                               progress=False, on_failure="ignore", forward_fn=forward_fn, **calib)
        if not report.quantized:
            continue
        try:
            result = measure(model, references, forward_fn)[0]  # type: ignore[arg-type]
        finally:
            for parent, attr in parents[id(module)]:
                setattr(parent, attr, module)
        results.append(LayerSensitivity(name, report.quantized[0].scheme, result.sqnr_db, result.top1_agreement))
    return sorted(results, key=lambda r: r.sqnr_db)


def _only(base: SkipRules | None, name: str) -> SkipRules:
    """``base`` (or the defaults) restricted to the one layer called ``name``."""
    import dataclasses

    from .rules import SkipRules

    base = base if base is not None else SkipRules.defaults()
    pred = base.predicate
    return dataclasses.replace(base, predicate=lambda n, m: n != name or bool(pred is not None and pred(n, m)))


def exact_pattern(name: str) -> str | re.Pattern:
    """A skip pattern matching exactly the layer ``name``."""
    return re.compile("^" + re.escape(name) + "$") if any(c in name for c in "*?[") else name


def rules_from_sensitivity(
    results: Sequence[LayerSensitivity], *, min_sqnr_db: float | None = None, top: int | None = None,
    base: SkipRules | None = None,
) -> SkipRules:
    """Skip rules keeping float the ``top`` most damaging layers and/or those whose alone-SQNR is below
    ``min_sqnr_db``, on top of ``base`` (default ``SkipRules.defaults()``)."""
    import dataclasses

    from .rules import SkipRules

    if min_sqnr_db is None and top is None:
        raise ConfigError("pass min_sqnr_db=... and/or top=... to say which layers to keep float")
    ranked = sorted(results, key=lambda r: r.sqnr_db)
    keep = {r.name for r in ranked[: top or 0]}
    if min_sqnr_db is not None:
        keep |= {r.name for r in ranked if r.sqnr_db < min_sqnr_db}
    base = base if base is not None else SkipRules.defaults()
    names = [exact_pattern(r.name) for r in ranked if r.name in keep]
    return dataclasses.replace(base, exclude=[*base.exclude, *names])
