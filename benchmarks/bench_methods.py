"""Seconds to quantize one ``width x width`` Linear layer with each weight method: RTN, MSE, GPTQ, AWQ, AWQ+GPTQ.

Each method is ``mq.quantize_`` of a one-layer model at INT4-g128 (``mq.Int4(group_size=128, method=...)``) with the
calibration data of ``benchmarks/bench_quantize.py`` (4 batches of 8x64 rows; RTN and MSE ignore it), everything
included: AWQ's statistics pass, scale and clipping search, GPTQ's Hessian and solve, and ``quantize_``'s own
measurement of the layer. For scale, the float PyTorch matmul of the same layer on all calibration rows is timed
in the same process, and each method's time is given as a ratio to it and to RTN's. Default: width 4096 (the
issue 25 evidence), 2 threads, the median of ``--repeats`` runs.

Run: ``python benchmarks/bench_methods.py [--widths 4096] [--threads 2] [--repeats 1] [--methods rtn,awq]
[--small] [--output-aware]``; ``--output-aware`` adds GPTQ with its ``output_aware`` option off and on for a 16 -> 256
layer (a 4096x4096 layer is far too large for it: the option costs it nothing). Timings on a shared machine are
noisy: compare within one run. Name the CPU next to any figure (printed at the top).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn

import monoquant as mq
from monoquant.fused import cpu_identity

METHODS = ("rtn", "mse", "gptq", "awq", "awq+gptq")
CALIBRATION_BATCHES, CALIBRATION_ROWS = 4, 8 * 64


def quantize_seconds(width: int, method: str, data: list[torch.Tensor], out: int | None = None, **options) -> float:
    """Seconds of ``mq.quantize_`` on a fresh one-layer ``width -> out`` model (seeded, so every method sees the same
    weight; ``out`` defaults to ``width``), with the format's method ``options``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, out or width, bias=False)).eval()
    t0 = time.perf_counter()
    mq.quantize_(model, mq.Int4(group_size=128, method=method, **options), calibration_data=data, progress=False)
    return time.perf_counter() - t0


def output_aware_rows(repeats: int) -> list[tuple[str, ...]]:
    """``method="gptq"`` on a 16 -> 256 layer (4096 weights, the largest that output-aware rounding takes, like
    a model's narrow input projection) with ``output_aware`` off and on: what the option costs."""
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(CALIBRATION_ROWS, 16, generator=g) for _ in range(CALIBRATION_BATCHES)]
    rows = []
    for on in (False, True):
        seconds = statistics.median(quantize_seconds(16, "gptq", data, 256, output_aware=on) for _ in range(repeats))
        rows.append((f"gptq, output_aware={on}", "16->256", f"{seconds:.2f}", "-", "-"))
        print(f"  {rows[-1][0]:9} {rows[-1][1]} {rows[-1][2]} s", flush=True)
    return rows


def matmul_seconds(width: int, data: list[torch.Tensor], repeats: int = 5) -> float:
    """Median seconds of the float layer's matmul on all calibration rows."""
    w = torch.randn(width, width)
    x = torch.cat(data)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x @ w.T
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=[4096])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--small", action="store_true", help="tiny sizes: checks that the script runs")
    p.add_argument("--output-aware", action="store_true",
                   help="also time gptq's output_aware option off and on, on a 16 -> 256 layer (4096 weights)")
    args = p.parse_args()
    if args.small:
        args.widths, args.repeats = [256], 1
    methods = args.methods.split(",")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=mq.AccuracyWarning)
    print(f"CPU: {cpu_identity()}; torch {torch.__version__}; {args.threads} threads; median of {args.repeats}")
    rows = []
    for width in args.widths:
        g = torch.Generator().manual_seed(1)
        data = [torch.randn(CALIBRATION_ROWS, width, generator=g) for _ in range(CALIBRATION_BATCHES)]
        matmul = matmul_seconds(width, data)
        seconds: dict[str, float] = {}
        for method in methods:
            seconds[method] = statistics.median(quantize_seconds(width, method, data) for _ in range(args.repeats))
            rtn = seconds.get("rtn")
            rows.append((method, f"{width}x{width}", f"{seconds[method]:.2f}",
                         f"{seconds[method] / rtn:.1f}" if rtn else "-", f"{seconds[method] / matmul:,.0f}"))
            print(f"  {rows[-1][0]:9} {rows[-1][1]} {rows[-1][2]} s", flush=True)
    if args.output_aware:
        rows += output_aware_rows(args.repeats)
    head = ("method", "layer", "seconds", "x RTN", f"x float matmul ({CALIBRATION_BATCHES * CALIBRATION_ROWS} rows)")
    print(f"\nquantize_ seconds per layer, INT4-g128, {CALIBRATION_BATCHES}x{CALIBRATION_ROWS} calibration rows")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


if __name__ == "__main__":
    main()
