"""Tuning on top of :func:`~monoquant.quantize_`: per-layer :func:`sensitivity` (each layer quantized alone) and
skip rules derived from it. These call ``quantize_`` and so sit above it in the layering.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from .compare import _check_data, measure, record_outputs
from .config import QuantConfig, WeightSpec, as_config
from .data import ForwardFn, tqdm_disable
from .errors import ConfigError
from .measure import MEASURE_BATCHES
from .quantize import candidate_class, quantize_, refuse_quantized
from .report import NothingQuantizedWarning
from .rules import SkipRules
from .swap import Swap


@dataclass
class LayerSensitivity:
    """End-to-end effect of quantizing one layer alone (every other layer float)."""

    name: str
    scheme: str
    sqnr_db: float
    top1_agreement: float | None


def sensitivity(
    model: nn.Module,
    config: QuantConfig | WeightSpec | str,
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
    cfg = as_config(config)
    refuse_quantized(model, "mq.sensitivity (each layer quantized alone against the float model)")
    _check_data(data)
    references = record_outputs(model, data, forward_fn, max_batches)
    if not references:
        raise ConfigError("data gave no batch to measure on")
    candidates = [(n, m) for n, m in model.named_modules() if candidate_class(m, cfg) is not None]
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
        quantized = model.get_submodule(name)
        try:
            result = measure(model, references, forward_fn)[0]  # type: ignore[arg-type]
        finally:
            restore = Swap(model)  # the float layer goes back everywhere, with its hooks
            restore.replace(quantized, module)
            restore.commit()
        results.append(LayerSensitivity(name, report.quantized[0].scheme, result.sqnr_db, result.top1_agreement))
    return sorted(results, key=lambda r: r.sqnr_db)


def _only(base: SkipRules | None, name: str) -> SkipRules:
    """``base`` (or the defaults) restricted to the one layer called ``name``."""
    base = base if base is not None else SkipRules.defaults()
    pred = base.predicate
    return dataclasses.replace(base, predicate=lambda n, m: n != name or bool(pred is not None and pred(n, m)))


def rules_from_sensitivity(
    results: Sequence[LayerSensitivity], *, min_sqnr_db: float | None = None, top: int | None = None,
    base: SkipRules | None = None,
) -> SkipRules:
    """Skip rules keeping float the ``top`` most damaging layers and/or those whose alone-SQNR is below
    ``min_sqnr_db``, on top of ``base`` (default ``SkipRules.defaults()``); see :meth:`SkipRules.from_sensitivity`."""
    return SkipRules.from_sensitivity(results, min_sqnr_db=min_sqnr_db, top=top, base=base)
