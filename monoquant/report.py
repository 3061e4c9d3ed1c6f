"""``QuantReport``: what ``quantize_`` did to each layer, measured, never estimated."""

from __future__ import annotations

import math
import os
import warnings
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .plotting import plot_report, plot_sensitivity

if TYPE_CHECKING:
    from .calibration import FrozenLayer


__all__ = ["AccuracyWarning", "LayerReport", "NothingQuantizedWarning", "QuantReport", "plot_sensitivity"]


NOT_MEASURED_NOTE = ("accuracy was not measured (only weight SQNR): pass calibration_data=... (a few batches of "
                     "real inputs) to quantize_ to measure each layer's output SQNR and the model output's, or "
                     "compare afterwards with mq.compare(float_model, model, data)")
"""The note of a report whose model output was not compared with the float model."""


class AccuracyWarning(UserWarning):
    """Quantization hurt accuracy past a threshold (see the report for the numbers)."""


class NothingQuantizedWarning(UserWarning):
    """``quantize_`` found no layer to quantize."""


class CalibrationPendingWarning(UserWarning):
    """``quantize_`` left layers waiting for calibration data: they compute in float until ``mq.freeze``."""


@dataclass
class LayerReport:
    """One row of the report."""

    name: str
    module_type: str
    scheme: str = ""
    kernel: str = ""
    bytes_before: int = 0
    bytes_after: int = 0
    weight_sqnr_db: float | None = None
    output_sqnr_db: float | None = None
    skipped: bool = False
    reason: str = ""
    method: str = ""
    note: str = ""
    pending: bool = False
    """Quantized layer still waiting for calibration data (GPTQ, static activations): it computes in float
    until ``mq.calibrate_and_freeze`` (or ``mq.calibrate`` + ``mq.freeze``)."""
    kind: str = ""
    """The weight format's registered ``kind`` (``"int4"``, ``"nf4"``, ``"fp8-e4m3"``...): what thresholds are
    keyed by. Empty on rows built by hand, whose ``scheme`` prefix then stands for it."""

    def follow_kernel(self, module: Any) -> None:
        """Show ``module``'s kernel (:meth:`~monoquant.nn.QuantModule.kernel_summary`) in this row, now and, while
        the layer lives, each time the report is shown (:meth:`QuantReport.refresh_kernels`): what ran per row
        bucket once the model has run, else the static guess, marked."""
        self.kernel = module.kernel_summary()
        self._layer = weakref.ref(module)

    def refresh_kernel(self) -> None:
        """Bring :attr:`kernel` up to date with the layer it follows (if any, and if it still exists)."""
        ref = self.__dict__.get("_layer")
        module = ref() if ref is not None else None
        if module is not None and not self.skipped:
            self.kernel = module.kernel_summary()

    def __getstate__(self) -> dict[str, Any]:  # pickling and copying keep the text, not the link to the layer
        return {k: v for k, v in self.__dict__.items() if k != "_layer"}

    @property
    def format_kind(self) -> str:
        return self.kind or self.scheme.split("-", 1)[0]

    @property
    def quantized(self) -> bool:
        return not self.skipped

    @property
    def done(self) -> bool:
        """Quantized and frozen: the layer computes with its low-bit weights now."""
        return not self.skipped and not self.pending


def _fmt_db(x: float | None) -> str:
    if x is None:
        return "-"
    return "inf" if math.isinf(x) and x > 0 else f"{x:.1f}"


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@dataclass
class QuantReport:
    """Per-layer rows, totals, unmatched skip patterns and any accuracy warnings raised."""

    layers: list[LayerReport] = field(default_factory=list)
    unmatched_rules: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Things to know that are not warnings (e.g. that accuracy was not measured, and how to measure it)."""
    end_to_end: dict[str, float] = field(default_factory=dict)
    calibration_samples: int | None = None

    @property
    def quantized(self) -> list[LayerReport]:
        return [row for row in self.layers if not row.skipped]

    @property
    def pending(self) -> list[LayerReport]:
        """Rows of layers that wait for calibration (they compute in float until ``mq.freeze``).

        ``mq.calibrate_and_freeze`` returns what :meth:`record_frozen` takes to bring the rows up to date."""
        return [row for row in self.layers if row.quantized and row.pending]

    @property
    def skipped(self) -> dict[str, str]:
        """``{layer name: reason}`` for every layer left in float."""
        return {row.name: row.reason for row in self.layers if row.skipped}

    @property
    def bytes_before(self) -> int:
        return sum(row.bytes_before for row in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(row.bytes_after if row.quantized else row.bytes_before for row in self.layers)

    @property
    def size_ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0

    def row(self, name: str) -> LayerReport:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(name)

    def record_end_to_end(self, values: Mapping[str, float]) -> None:
        """Record a model-output comparison measured after :func:`monoquant.quantize_` (``report.end_to_end``
        keys): the report no longer says that accuracy was not measured."""
        self.end_to_end.update(values)
        if NOT_MEASURED_NOTE in self.notes:
            self.notes.remove(NOT_MEASURED_NOTE)

    def record_frozen(self, frozen: Iterable[FrozenLayer]) -> None:
        """Update the rows of layers that :func:`monoquant.freeze` just finished (its return value): kernel and
        bytes as they are now, and the weight / output SQNR that freeze measured (GPTQ), where it measured one."""
        rows = {row.name: row for row in self.layers}
        for done in frozen:
            row = rows[done.name]
            row.pending = False
            row.follow_kernel(done.module)
            row.bytes_after = done.module.storage_bytes()
            if done.weight_sqnr_db is not None:
                row.weight_sqnr_db = done.weight_sqnr_db
            if done.output_sqnr_db is not None:
                row.output_sqnr_db = done.output_sqnr_db

    def warn(self, message: str, category: type[Warning] = AccuracyWarning, stacklevel: int = 3) -> None:
        self.warnings.append(message)
        warnings.warn(message, category, stacklevel=stacklevel)

    def refresh_kernels(self) -> None:
        """Update every row's kernel from its layer (done by :meth:`to_dict`, :meth:`to_markdown` and ``str``):
        the report shows what ran since it was made, not only what was known when ``quantize_`` returned."""
        for row in self.layers:
            row.refresh_kernel()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data for loggers: ``json.dumps(report.to_dict(), allow_nan=False)`` works.

        An infinite SQNR (exact reconstruction) becomes the string ``"inf"``; ``None`` means not measured.
        """
        self.refresh_kernels()
        return _jsonable({
            "layers": [asdict(r) for r in self.layers],
            "unmatched_rules": list(self.unmatched_rules),
            "warnings": list(self.warnings),
            "notes": list(self.notes),
            "end_to_end": dict(self.end_to_end),
            "calibration_samples": self.calibration_samples,
            "quantized": len(self.quantized),
            "kept_float": len(self.skipped),
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "size_ratio": self.size_ratio,
        })

    def to_markdown(self) -> str:
        """A Markdown table of the layers (name, type, scheme, kernel, weight / output SQNR, bytes, skip reason or
        method) followed by the totals and, when measured, the model output's SQNR; for notes, PRs and model cards.
        """
        self.refresh_kernels()
        head = ("layer", "type", "scheme", "kernel", "weight SQNR dB", "output SQNR dB", "bytes before",
                "bytes after", "skipped because / note")
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(("---", "---", "---", "---", "---:", "---:", "---:",
                                                                  "---:", "---")) + "|"]
        for r in self.layers:
            note = r.reason if r.skipped else "; ".join(x for x in (r.method, r.note) if x)
            cells = (f"`{r.name or '<root>'}`", r.module_type, r.scheme if r.quantized else "float", r.kernel or "-",
                     _fmt_db(r.weight_sqnr_db), _fmt_db(r.output_sqnr_db), str(r.bytes_before),
                     str(r.bytes_after if r.quantized else r.bytes_before), note or "-")
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
        waiting = f", {len(self.pending)} waiting for calibration" if self.pending else ""
        lines.append(f"{len(self.quantized) - len(self.pending)} quantized{waiting}, {len(self.skipped)} kept float; "
                     f"{_fmt_bytes(self.bytes_before)} -> {_fmt_bytes(self.bytes_after)} ({self.size_ratio:.3f}x)")
        if "sqnr_db" in self.end_to_end:
            lines.append(f"model output vs float: SQNR {_fmt_db(self.end_to_end['sqnr_db'])} dB")
        lines += [f"- WARNING: {w}" for w in self.warnings] + [f"- NOTE: {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def plot(self, path: str | os.PathLike, *, title: str | None = None) -> Path:
        """Draw each layer's weight and output SQNR (layers kept float greyed, with their reason) into ``path``
        (``.png``, ``.svg`` or ``.pdf``, by extension) with matplotlib; returns the path written.

        Raises:
            MissingExtraError: matplotlib is not installed (``pip install monoquant[plot]``).
            ConfigError: the extension names no supported format.
        """
        return plot_report(self, path, title=title)

    def __str__(self) -> str:
        self.refresh_kernels()
        head = ("layer", "type", "scheme", "kernel", "before", "after", "W SQNR dB", "out SQNR dB", "note")
        right = {4, 5, 6, 7}  # numbers are right-aligned
        rows = [head]
        for r in self.layers:
            pending = "waiting for calibration: runs in float until mq.calibrate_and_freeze" if r.pending else ""
            note = ("skipped: " + r.reason) if r.skipped else "; ".join(x for x in (r.method, pending, r.note) if x)
            rows.append((
                r.name or "<root>", r.module_type, r.scheme if r.quantized else "float", r.kernel or "-",
                _fmt_bytes(r.bytes_before), _fmt_bytes(r.bytes_after if r.quantized else r.bytes_before),
                _fmt_db(r.weight_sqnr_db), _fmt_db(r.output_sqnr_db), note,
            ))
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
        lines = ["  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                           for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        waiting = f", {len(self.pending)} waiting for calibration" if self.pending else ""
        lines.append(f"{len(self.quantized) - len(self.pending)} quantized{waiting}, {len(self.skipped)} kept float; "
                     f"{_fmt_bytes(self.bytes_before)} -> {_fmt_bytes(self.bytes_after)} ({self.size_ratio:.3f}x)")
        e2e = self.end_to_end
        if "sqnr_db" in e2e:
            line = f"model output vs float: SQNR {_fmt_db(e2e['sqnr_db'])} dB"
            if "top1_agreement" in e2e:
                line += f", top-1 agreement {e2e['top1_agreement']:.1%}"
            if "batches" in e2e:
                line += f" ({e2e['batches']:.0f} batches, {e2e['samples']:.0f} samples)"
            if "target_sqnr_db" in e2e:
                line += f"; target {e2e['target_sqnr_db']:g} dB"
            lines.append(line)
        for rule in self.unmatched_rules:
            lines.append(f"rule matched no layer (typo?): {rule}")
        for w in self.warnings:
            lines.append(f"WARNING: {w}")
        for note in self.notes:
            lines.append(f"NOTE: {note}")
        return "\n".join(lines)


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
