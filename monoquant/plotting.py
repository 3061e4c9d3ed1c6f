"""Charts of what quantization did, drawn with matplotlib (optional: ``pip install monoquant[plot]``).

:meth:`QuantReport.plot <monoquant.QuantReport.plot>` draws each layer's weight and output SQNR, with the layers
left in float marked; :func:`plot_sensitivity` draws a :func:`monoquant.sensitivity` ranking. Both write the file
format named by the path's extension (``.png``, ``.svg`` or ``.pdf``) and use matplotlib's object API (no
``pyplot``), so they neither need a display nor change the caller's matplotlib state.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, MissingExtraError

if TYPE_CHECKING:
    from .accuracy import LayerSensitivity
    from .report import QuantReport

FORMATS = (".png", ".svg", ".pdf")
"""File extensions the plots can be written as."""

WEIGHT_COLOR, OUTPUT_COLOR, SKIPPED_COLOR = "#4C72B0", "#DD8452", "#8C8C8C"
ROW_INCHES = 0.32
"""Height of one layer's row: the figure grows with the model so that names stay readable."""


def _figure(rows: int, width: float = 10.0) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise MissingExtraError("drawing a chart needs matplotlib, which is not installed: "
                                "pip install monoquant[plot]") from e
    return Figure(figsize=(width, 1.6 + ROW_INCHES * max(rows, 1)), layout="constrained")


def _target(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise ConfigError(f"cannot tell which image format to write for {str(path)!r}: end the file name in one of "
                          f"{', '.join(FORMATS)}")
    return path


def _finite_max(values: Sequence[float | None]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return max(finite, default=0.0)


def plot_report(report: QuantReport, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Draw ``report``'s per-layer weight and output SQNR as horizontal bars, one row per layer (model order),
    layers left in float greyed with their reason, and write it to ``path``; returns the path written.

    An exact reconstruction (infinite SQNR) is drawn at the chart's edge and labelled ``inf``; a value that was
    not measured (no calibration data: no output SQNR) has no bar.
    """
    path = _target(path)
    layers = report.layers
    fig = _figure(len(layers))
    ax = fig.add_subplot()
    values = [v for r in layers for v in (r.weight_sqnr_db, r.output_sqnr_db)]
    top = _finite_max(values) * 1.15 + 1.0
    height = 0.38
    for i, row in enumerate(layers):
        if row.skipped:
            ax.axhspan(i - 0.5, i + 0.5, color=SKIPPED_COLOR, alpha=0.15, linewidth=0)
            ax.text(top * 0.01, i, f"float: {row.reason}", va="center", fontsize=8, color="#444444")
            continue
        for offset, value, color in ((-height / 2, row.weight_sqnr_db, WEIGHT_COLOR),
                                     (height / 2, row.output_sqnr_db, OUTPUT_COLOR)):
            if value is None:
                continue
            shown = top if math.isinf(value) else value
            ax.barh(i + offset, shown, height=height, color=color)
            ax.text(shown, i + offset, f" {'inf' if math.isinf(value) else f'{value:.1f}'}", va="center", fontsize=7)
    ax.set_yticks(range(len(layers)), [f"{r.name or '<root>'}  ({r.scheme if r.quantized else 'float'})"
                                       for r in layers], fontsize=8)
    for label, row in zip(ax.get_yticklabels(), layers):
        if row.skipped:
            label.set_color(SKIPPED_COLOR)
    ax.invert_yaxis()  # first layer at the top, as in the text report
    ax.set_xlim(0, top * 1.08)
    ax.set_xlabel("SQNR (dB, higher is better)")
    ax.grid(axis="x", alpha=0.3)
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color=WEIGHT_COLOR, label="weight SQNR"),
                        Patch(color=OUTPUT_COLOR, label="output SQNR (real inputs)"),
                        Patch(color=SKIPPED_COLOR, alpha=0.3, label="kept float")],
               loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    e2e = report.end_to_end.get("sqnr_db")
    summary = (f"{len(report.quantized)} quantized, {len(report.skipped)} kept float, size "
               f"{report.size_ratio:.3f}x" + (f", model output SQNR {e2e:.1f} dB" if e2e is not None else ""))
    ax.set_title(f"{title}\n{summary}" if title else summary, fontsize=10)
    fig.savefig(path)
    return path


def plot_sensitivity(rows: Sequence[LayerSensitivity], path: str | os.PathLike, *,
                     title: str | None = None) -> Path:
    """Draw a :func:`monoquant.sensitivity` ranking (model output SQNR with each layer quantized alone; lowest =
    most damaging, at the top, as the ranking lists them) and write it to ``path``; returns the path written."""
    path = _target(path)
    if not rows:
        raise ConfigError("plot_sensitivity got no rows: pass the list mq.sensitivity(model, config, data) returns")
    fig = _figure(len(rows))
    ax = fig.add_subplot()
    top = _finite_max([r.sqnr_db for r in rows]) * 1.15 + 1.0
    for i, row in enumerate(rows):
        shown = top if math.isinf(row.sqnr_db) else row.sqnr_db
        ax.barh(i, shown, height=0.7, color=OUTPUT_COLOR)
        label = "inf" if math.isinf(row.sqnr_db) else f"{row.sqnr_db:.1f} dB"
        if row.top1_agreement is not None:
            label += f", top-1 {row.top1_agreement:.1%}"
        ax.text(shown, i, f" {label}", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [f"{r.name}  ({r.scheme})" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, top * 1.25)
    ax.set_xlabel("model output SQNR with only this layer quantized (dB; lower = more damaging)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title or "Layer sensitivity (most damaging first)", fontsize=10)
    fig.savefig(path)
    return path
