"""Calibration overhead and the W8A8 ``_int_mm`` path, as ratio tables against float PyTorch.

1. Calibration cost per batch on a small CNN: forward under ``mq.calibrate`` (observers running) relative to
   a plain forward of the same weight-quantized model, for MinMax and Histogram activation observers
   (targets: <= 1.15x and <= 1.5x).
2. ``QuantLinear`` with INT8 weights and static INT8 activations (``torch._int_mm``) vs ``nn.Linear`` in
   float32, 4096x4096, batch 32 and 256 (target: >= 2x faster).

Run: ``python benchmarks/bench_calibration.py [--repeats N] [--threads T]``. Medians; float measured in the same
process. Numbers from a busy machine are noisy: compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import monoquant as mq


def median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 8 * 8, 256),
        nn.ReLU(), nn.Linear(256, 10),
    ).eval()


def bench_calibration(repeats: int) -> list[tuple[str, float, float]]:
    """Per observer: (name, median ms per calibrating batch, median of per-pair ratios).

    Plain and calibrating forwards alternate batch by batch, so load changes on a shared machine hit both alike.
    """
    torch.manual_seed(0)
    base = small_cnn()
    x = torch.randn(32, 3, 32, 32)
    weight_only = copy.deepcopy(base)
    mq.quantize_(weight_only, mq.QuantConfig(mq.Int8(), skip=mq.SkipRules.none()))
    rows, plain_all = [], []
    for name, make in (("MinMaxObserver", mq.MinMaxObserver), ("HistogramObserver", mq.HistogramObserver)):
        model = copy.deepcopy(base)
        mq.quantize_(model, mq.QuantConfig(mq.Int8(), activations=mq.Int8(observer=make()),
                                           skip=mq.SkipRules.none()))
        plain, cal = [], []
        with mq.calibrate(model):
            for i in range(repeats + 3):
                with torch.no_grad():
                    t0 = time.perf_counter()
                    weight_only(x)
                    t1 = time.perf_counter()
                model(x)
                t2 = time.perf_counter()
                if i >= 3:  # warm-up
                    plain.append(t1 - t0)
                    cal.append(t2 - t1)
        plain_all += plain
        rows.append((name, statistics.median(cal) * 1e3, statistics.median(c / p for c, p in zip(cal, plain))))
    rows.insert(0, ("no observers (weight-only INT8)", statistics.median(plain_all) * 1e3, 1.0))
    return rows


def bench_w8a8(repeats: int) -> list[tuple[int, float, float, float, str]]:
    torch.manual_seed(0)
    lin = nn.Linear(4096, 4096).eval()
    rows = []
    for batch in (32, 256):
        x = torch.randn(batch, 4096)
        q = nn.Sequential(copy.deepcopy(lin))
        mq.quantize_(q, mq.QuantConfig(mq.Int8(), activations=mq.Int8(), skip=mq.SkipRules.none()),
                     calibration_data=[x], progress=False)
        with torch.no_grad():
            t_float = median_ms(lambda x=x: lin(x), repeats)
            t_q = median_ms(lambda q=q, x=x: q(x), repeats)
        rows.append((batch, t_float, t_q, t_float / t_q, q[0].last_kernel))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, medians of {args.repeats}\n")
    print("Calibration cost per batch, small CNN, batch 32 (ratio vs forward without observers)")
    print(f"{'observer':34} {'ms/batch':>9} {'ratio':>7}")
    for name, ms, ratio in bench_calibration(args.repeats):
        print(f"{name:34} {ms:9.2f} {ratio:6.2f}x")
    print("\nW8A8 QuantLinear vs float32 nn.Linear, 4096x4096 (speed-up = float time / quantized time)")
    print(f"{'batch':>5} {'float32 ms':>11} {'w8a8 ms':>9} {'speed-up':>9}  kernel")
    for batch, tf, tq, speedup, kernel in bench_w8a8(args.repeats):
        print(f"{batch:5d} {tf:11.2f} {tq:9.2f} {speedup:8.2f}x  {kernel}")


if __name__ == "__main__":
    main()
