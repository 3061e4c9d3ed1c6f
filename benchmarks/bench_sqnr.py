"""Weight and output SQNR of INT8, INT4 (g32, g64, g128), NF4-g64 and half precision on small models, next to the
default thresholds.

This is the measurement the defaults of ``mq.Thresholds`` were chosen from: each row is one model and one
scheme; columns give the lowest and median per-layer weight SQNR, the lowest and median per-layer output SQNR
(each quantized layer vs its float twin on the same real inputs), the model-output SQNR and the top-1
agreement with the float model. Every layer is quantized (``SkipRules.none()``) so the figures cover first
and last layers too; the first/last INT4 advice is switched off here.

Further tables give NF4-g64 minus INT4-g64 affine and minus INT4-g64 symmetric, column by column.

Run: python benchmarks/bench_sqnr.py [SCHEME ...]    (default: every scheme; e.g. ``INT4-g64 INT4-sym-g64 NF4-g64``)
"""

from __future__ import annotations

import copy
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

import monoquant as mq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from quantize_existing_model import build_model


def small_cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 128),
        nn.ReLU(), nn.Linear(128, 10),
    )


def mlp(width: int = 512) -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(128, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 10))


def trained_mlp(steps: int = 300) -> tuple[nn.Module, torch.Tensor]:
    """An MLP trained with Adam on a random teacher: weights leave their uniform init."""
    model = mlp()
    torch.manual_seed(3)
    teacher = nn.Sequential(nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(steps):
        x = torch.randn(128, 128)
        with torch.no_grad():
            y = teacher(x).argmax(-1)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def heavy_tailed_mlp() -> nn.Module:
    """Same MLP with Student-t (df=4) weights, like the heavy tails of large trained models."""
    model = mlp()
    torch.manual_seed(4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                t = torch.distributions.StudentT(4.0).sample(m.weight.shape)
                m.weight.copy_(t * m.weight.std() / t.std())
    return model


def normal_mlp() -> nn.Module:
    """Same MLP with normally distributed weights (what NF4's levels are placed for; large trained models' weights
    are close to normal), same standard deviation as the random init."""
    model = mlp()
    torch.manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape) * m.weight.std())
    return model


def damaged_mlp() -> nn.Module:
    """The random-init MLP with one damaged layer: a weight 1000x the others on an input that is always 0.

    The float function is unchanged, but every INT4 group / INT8 row holding the outlier rounds its other
    weights to ~0: the weight SQNR (dominated by the outlier) looks fine, the output SQNR does not."""
    model = mlp()
    with torch.no_grad():
        model[0].weight[0].zero_()
        model[0].bias[0] = -10.0  # unit 0 of the first layer never fires (GELU(-10) ~ 1e-22)
        model[2].weight[:, 0] = 1000.0 * model[2].weight.std()
    return model


SCHEMES = {"INT8": mq.Int8(), "INT4-g32": mq.Int4(group_size=32), "INT4-g64": mq.Int4(group_size=64),
           "INT4-sym-g64": mq.Int4(group_size=64, symmetric=True), "INT4-g128": mq.Int4(group_size=128),
           "NF4-g64": mq.NF4(group_size=64), "FP16": mq.Float16(), "BF16": mq.BFloat16()}
COMPARISONS = (("NF4-g64", "INT4-g64"), ("NF4-g64", "INT4-sym-g64"))
"""Pairs compared column by column: NF4 against INT4 affine and against symmetric INT4, which stores exactly as many
bytes as NF4 (INT4 affine adds a uint8 zero-point per group)."""


def measure(model: nn.Module, data: list[torch.Tensor], spec: mq.WeightSpec) -> tuple[float, ...]:
    quant = copy.deepcopy(model).eval()
    report = mq.quantize_(quant, mq.QuantConfig(spec, skip=mq.SkipRules.none()), calibration_data=data,
                          on_failure="ignore", thresholds={"int4_first_and_last": False}, progress=False)
    w = [r.weight_sqnr_db for r in report.quantized]
    o = [r.output_sqnr_db for r in report.quantized]
    e = report.end_to_end
    return (min(w), statistics.median(w), min(o), statistics.median(o), e["sqnr_db"],
            e.get("top1_agreement", float("nan")))


def main(names: list[str]) -> None:
    unknown = [n for n in names if n not in SCHEMES]
    if unknown:
        raise SystemExit(f"unknown scheme(s) {unknown}; choose from {list(SCHEMES)}")
    schemes = {n: SCHEMES[n] for n in names} if names else SCHEMES
    torch.manual_seed(0)
    vec = [torch.randn(32, 128) for _ in range(4)]
    models = {
        "example (MLP blocks)": (build_model().eval(), [torch.randn(32, 64) for _ in range(4)]),
        "small CNN": (small_cnn().eval(), [torch.randn(16, 3, 32, 32) for _ in range(4)]),
        "MLP random init": (mlp().eval(), vec),
        "MLP trained (Adam)": (trained_mlp().eval(), vec),
        "MLP normal weights": (normal_mlp().eval(), vec),
        "MLP Student-t weights": (heavy_tailed_mlp().eval(), vec),
        "MLP, one damaged layer": (damaged_mlp().eval(), vec),
    }
    head = ("model", "scheme", "W min", "W med", "out min", "out med", "e2e SQNR", "top-1")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    results = {}
    for mname, (model, data) in models.items():
        for sname, spec in schemes.items():
            vals = results[mname, sname] = measure(model, data, spec)
            print(" | ".join([mname, sname, *[f"{v:.1f}" for v in vals[:5]], f"{vals[5]:.3f}"]))
    for pair in COMPARISONS:
        if all(n in schemes for n in pair):
            print(f"\n{pair[0]} minus {pair[1]} (dB; positive: {pair[0]} is closer to float)")
            head = ("model", "W min", "W med", "out min", "out med", "e2e SQNR")
            print(" | ".join(head))
            print(" | ".join("---" for _ in head))
            for mname in models:
                a, b = (results[mname, n] for n in pair)
                print(" | ".join([mname, *[f"{x - y:+.1f}" for x, y in zip(a[:5], b[:5])]]))
    t = mq.Thresholds()
    print("\ndefault thresholds (dB): weight", t.weight_sqnr_db, "\n  layer output", t.output_sqnr_db,
          "\n  end-to-end", t.end_to_end_sqnr_db, "\n  top-1 agreement", t.top1_agreement,
          "| min calibration samples", t.min_calibration_samples)


if __name__ == "__main__":
    main(sys.argv[1:])
