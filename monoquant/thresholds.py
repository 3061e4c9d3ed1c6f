"""When quantization has hurt too much: :class:`Thresholds` (floors per weight format, from each format's
defaults) and the checks that turn a :class:`~monoquant.QuantReport`'s measurements into warnings or errors.

Warnings come from measurements only (weight SQNR, output SQNR on real inputs, end-to-end SQNR and top-1
agreement): a rule that fires on healthy models teaches users to ignore warnings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import AccuracyError, ConfigError
from .formats import FORMATS
from .report import AccuracyWarning, QuantReport

ON_FAILURE = ("warn", "raise", "ignore")


def _format_floors(name: str) -> dict[str, float | None]:
    """Each registered format's default floor for threshold ``name`` (``None`` where it has none)."""
    return {kind: cls.thresholds.get(name) for kind, cls in FORMATS.items()}


@dataclass
class Thresholds:
    """When :func:`~monoquant.quantize_` raises :class:`~monoquant.AccuracyWarning` (or ``AccuracyError``).

    Floors are in dB and keyed by the weight format's kind (``"int8"``, ``"int4"``, ``"nf4"``, ``"float16"``,
    ``"bfloat16"``...); the defaults are each registered format's ``thresholds``. A dict overrides only the kinds it
    names, a single number sets every kind, ``None`` disables the check.

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
        int4_first_and_last: opt-in rule of thumb, off by default: warn when both the first and the last
            quantizable layer (in ``named_modules`` order, models with at least three of them) are INT4. It is
            not a measurement and fired on every default INT4 config of healthy models; pass calibration data
            instead, and the output SQNR of those layers is measured and warned about when it is low.
    """

    weight_sqnr_db: dict[str, float | None] = field(default_factory=lambda: _format_floors("weight_sqnr_db"))
    output_sqnr_db: dict[str, float | None] = field(default_factory=lambda: _format_floors("output_sqnr_db"))
    end_to_end_sqnr_db: dict[str, float | None] = field(
        default_factory=lambda: _format_floors("end_to_end_sqnr_db"))
    top1_agreement: float | None = 0.7
    min_calibration_samples: int | None = 32
    int4_first_and_last: bool = False

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
    if thresholds.int4_first_and_last and len(order) >= 3 and all(_costly_at_ends(kinds.get(n)) for n in (order[0],
                                                                                                           order[-1])):
        problems.append(f"the first ({order[0]!r}) and last ({order[-1]!r}) layers are both INT4, which usually "
                        "costs most accuracy; keep one at INT8/float with "
                        f"SkipRules(exclude=[{order[-1]!r}])")
    _act(report, problems, on_failure, stacklevel + 1)


def _costly_at_ends(kind: str | None) -> bool:
    """Whether the registered format ``kind`` counts for ``Thresholds(int4_first_and_last=True)``."""
    return bool(getattr(FORMATS.get(kind or ""), "costly_at_model_ends", False))


def check_end_to_end(report: QuantReport, thresholds: Thresholds | Mapping[str, Any] | None = None,
                     on_failure: str = "warn") -> None:
    """Check only ``report.end_to_end`` (model-output SQNR, top-1 agreement) against ``thresholds``.

    For code that measures the comparison itself after :func:`monoquant.quantize_` (the Lightning callback);
    the floor is the one for the lowest-precision weight kind in the report. ``on_failure`` as in
    :func:`monoquant.quantize_`.
    """
    kinds = {row.name: row.format_kind for row in report.quantized}
    _act(report, _end_to_end_problems(report, Thresholds.coerce(thresholds), kinds), on_failure, 4)


def _end_to_end_problems(report: QuantReport, thresholds: Thresholds, kinds: Mapping[str, str]) -> list[str]:
    problems = []
    e2e = report.end_to_end
    main_kind = min((kinds[r.name] for r in report.quantized if r.name in kinds),
                    key=lambda k: FORMATS[k].bits if k in FORMATS else 99, default=None)
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
