"""Measuring inside :func:`~monoquant.quantize_`: the float reference recorded before the swap, each quantized
layer's output SQNR and the end-to-end comparison after it, and the ``target_sqnr`` search that keeps the most
damaging layers at higher precision. Everything here works through the caller's :class:`~monoquant.swap.Swap`, so
a failure rolls back with the rest of ``quantize_``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import functional as F
from . import fused
from .compare import Comparison, Reference, batch_size, measure, record_outputs
from .config import QuantConfig
from .data import ForwardFn, tqdm_disable
from .errors import ConfigError
from .formats import WeightSpec
from .nn import QuantModule, quant_class_for
from .report import QuantReport
from .swap import Swap

MEASURE_BATCHES = 8
"""Batches of ``calibration_data`` that ``quantize_`` uses to measure output SQNR (the first ones)."""


@dataclass
class Swapped:
    """A layer ``quantize_`` replaced: the float original (kept only until measurement ends) and the module now in
    its place (its quantized twin, or another one the target search chose)."""

    float_module: nn.Module
    quant_module: nn.Module

    def put(self, swap: Swap, module: nn.Module) -> None:
        """Register ``module`` wherever the layer currently in the model is (journaled in ``swap``)."""
        current = swap.replaced.get(id(self.float_module), self.float_module)
        if module is not current:
            swap.replace(current, module)
            swap.replaced[id(self.float_module)] = module


def weight_sqnr(float_module: nn.Module, q: QuantModule) -> float:
    """SQNR (dB) of ``q``'s dequantized weight against its float twin's.

    Row chunks of at most :data:`WEIGHT_SQNR_CHUNK` values, each dequantized into one reused float32 buffer; each
    chunk's two sums come from one pass of :func:`monoquant.fused.signal_noise_sums` (float64) while the chunk is
    in cache, or without the extension from float32 differences and sums (cascade-summed by PyTorch: relative
    error ~1e-8), added up in float64: the temporaries stay a few hundred KB whatever the layer's size (a whole
    dequantized weight, freshly allocated, cost more in page faults than the arithmetic; float64 copies of whole
    weights cost 4x the layer)."""
    with torch.no_grad():
        w = type(q).float_weight(float_module).detach()
        w = w.reshape(w.shape[0], -1)
        rows = max(1, WEIGHT_SQNR_CHUNK // max(w.shape[1], 1))
        buf = torch.empty(min(rows, w.shape[0]), w.shape[1], dtype=torch.float32, device=w.device)
        scale = None if q.input_scale is None else q.input_scale.reshape(1, -1).float()
        signal = noise = 0.0
        compiled = w.device.type == "cpu" and fused.available()  # one pass per chunk instead of five
        for r0 in range(0, w.shape[0], rows):
            ref = w[r0:r0 + rows].float()  # a view of the weight when it is float32: never written to
            deq = q.dequantize_into(buf[:ref.shape[0]], r0)
            if scale is not None:  # AWQ / SmoothQuant: the layer stores W s and multiplies its input by 1 / s
                deq.mul_(scale)
            if compiled and ref.is_contiguous():
                sums = fused.signal_noise_sums(ref, deq)
            else:
                sums = float(ref.square().sum()), float(deq.sub_(ref).square_().sum())
            signal, noise = signal + sums[0], noise + sums[1]
        return F.sqnr_from_powers(signal, noise)


WEIGHT_SQNR_CHUNK = 1 << 18
"""Most weight values :func:`weight_sqnr` holds in a temporary at once."""


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
    swap: Swap,
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
        meet_target(model, report, swapped, swap, cfg, target_sqnr, result, references, forward_fn, progress)
    pairs = {name: (sw.float_module, sw.quant_module) for name, sw in swapped.items()}
    result, layer_sqnr = measure(model, references, forward_fn, pairs)
    for name, value in layer_sqnr.items():
        report.row(name).output_sqnr_db = value
    report.end_to_end["sqnr_db"] = result.sqnr_db
    if result.top1_agreement is not None:
        report.end_to_end["top1_agreement"] = result.top1_agreement
    report.end_to_end["batches"] = result.batches
    report.end_to_end["samples"] = result.samples


def _fill_row(report: QuantReport, name: str, q: QuantModule | None, note: str) -> None:

    row = report.row(name)
    if q is None:
        row.skipped, row.reason = True, note
        row.scheme = row.kind = row.kernel = ""
        row.weight_sqnr_db = row.output_sqnr_db = None
        row.bytes_after = row.bytes_before
        return
    row.scheme, row.kind = q.scheme(), q.spec.kind
    row.follow_kernel(q)
    row.bytes_after = q.storage_bytes()
    row.note = note


PROMOTION_TOLERANCE_DB = 1.0
"""Target mode keeps a layer at a promoted format (:meth:`WeightSpec.promotion`, INT8 for INT4 and NF4) rather
than float when it gets the model output within this many dB of what float gets (or reaches the target
outright)."""


def _promoted_twin(name: str, sw: Swapped, spec: WeightSpec, cfg: QuantConfig) -> nn.Module:
    """The float layer quantized with ``spec`` (weight-only, RTN)."""
    q = quant_class_for(sw.float_module).from_float(
        sw.float_module, QuantConfig(spec, compute_dtype=cfg.compute_dtype), name=name)
    q.train(sw.quant_module.training)
    return q


def _promotions(spec: WeightSpec) -> list[WeightSpec]:
    """The formats ``spec`` promotes to, in order (each one's :meth:`WeightSpec.promotion`), ending before float."""
    chain: list[WeightSpec] = []
    nxt = spec.promotion()
    while nxt is not None and nxt not in chain and len(chain) < 8:
        chain.append(nxt)
        nxt = nxt.promotion()
    return chain


def meet_target(
    model: nn.Module,
    report: QuantReport,
    swapped: dict[str, Swapped],
    swap: Swap,
    cfg: QuantConfig,
    target_sqnr: float,
    current: Comparison,
    references: Reference,
    forward_fn: ForwardFn | None,
    progress: bool | None = None,
) -> Comparison:
    """Keep the most damaging layers at higher precision until the model output's SQNR reaches ``target_sqnr``.

    Damage is measured leave-one-out: the end-to-end SQNR gained by putting each layer back in float, all others
    staying quantized. Layers are then taken most damaging first: a layer goes to the formats its format promotes
    to (:meth:`WeightSpec.promotion`: INT4 and NF4 -> INT8) when one reaches the target or comes within
    :data:`PROMOTION_TOLERANCE_DB` of what float gives, else to float. Updates
    ``report`` rows (``note`` / skip ``reason`` say why) and returns the final comparison."""
    if current.sqnr_db >= target_sqnr:
        return current
    gains: dict[str, float] = {}
    for name, sw in tqdm(swapped.items(), desc="ranking layers", unit="layer",
                         disable=tqdm_disable(progress)):
        sw.put(swap, sw.float_module)
        gains[name] = measure(model, references, forward_fn)[0].sqnr_db - current.sqnr_db
        sw.put(swap, sw.quant_module)
    for name in sorted(gains, key=lambda n: -gains[n]):
        if current.sqnr_db >= target_sqnr:
            break
        sw = swapped[name]
        why = f"to meet target_sqnr={target_sqnr:g} dB: model output SQNR {current.sqnr_db:.1f} -> "
        sw.put(swap, sw.float_module)
        as_float = measure(model, references, forward_fn)[0]
        kept = False
        for higher in _promotions(cfg.weights):
            twin = _promoted_twin(name, sw, higher, cfg)
            sw.put(swap, twin)
            promoted = measure(model, references, forward_fn)[0]
            if promoted.sqnr_db >= min(target_sqnr, as_float.sqnr_db - PROMOTION_TOLERANCE_DB):
                sw.quant_module = twin
                _fill_row(report, name, twin, f"kept at {higher.kind} {why}{promoted.sqnr_db:.1f} dB")
                report.row(name).weight_sqnr_db = weight_sqnr(sw.float_module, twin)
                current, kept = promoted, True
                break
            sw.put(swap, sw.float_module)
        if kept:
            continue
        _fill_row(report, name, None, f"kept float {why}{as_float.sqnr_db:.1f} dB")
        current = as_float
    for name in [n for n, sw in swapped.items() if report.row(n).skipped]:
        del swapped[name]
    return current
