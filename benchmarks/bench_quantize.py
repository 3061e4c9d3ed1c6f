"""Seconds and peak memory of ``mq.quantize_`` against model size, RTN and GPTQ, and one GPTQ layer's time.

1. Models of 4 to 64 ``Linear(width, width)`` layers (``--layers``, ``--widths``; default 4, 8, 16 layers of
   1024 and 2048; add 32 and 64 layers or 4096 wide with the flags), INT4 group 128 with RTN
   (``mq.Int4(group_size=128)``) and GPTQ with its defaults (``mq.Int4(group_size=128, method="gptq")``, 4
   calibration batches of 8x64 rows). Each measurement runs in a fresh subprocess: the float model and the
   calibration data are allocated first, then the peak RSS (VmHWM, reset just before ``quantize_``) is read,
   so "peak above float" is what quantizing costs on top of the model the user already holds. RTN also gets
   its throughput in GB/s of float weights. Per (method, width): the slope of peak memory per layer (least
   squares over the layer counts) next to the quantized bytes per layer, and the bound of issue 21 item 2:
   quantized bytes + the temporaries of the two largest layers (a layer's temporaries: the peak above float
   of a one-layer model minus its quantized bytes, measured in the same way, median of 3 processes).
2. RTN throughput: INT8 and INT4-g128 ``quantize_`` on 8 ``Linear(4096, 4096)`` (``--rtn-layers``,
   ``--rtn-width``) in GB/s of float weights (issue 21's target: >= 1 GB/s), with a clone of the same float
   weights timed in the same process for scale.
3. The default GPTQ config on one ``width x width`` layer (``--gptq-widths``, default 2048 and 4096):
   ``gptq_quantize`` alone (the target of issue 21: <= 4 s at 4096 on 2 threads) and the whole ``mq.quantize_``
   of the layer with its 4 calibration batches (what a user waits for: also the calibration passes, the
   Hessian, the output SQNR and the report's comparison), with the float PyTorch matmul of the same layer on the
   calibration rows timed in the same process for scale.

Run: ``python benchmarks/bench_quantize.py [--threads 2] [--layers 4 8 16 32 64] [--widths 1024 2048 4096]
[--gptq-widths 2048 4096] [--only models|rtn|gptq] [--small]``. Timings on a shared machine are noisy: compare within
one run. Name the CPU next to any figure (printed at the top).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import monoquant as mq
from monoquant.fused import cpu_identity

CALIBRATION_BATCHES, CALIBRATION_ROWS = 4, 8 * 64


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _reset_peak() -> int:
    """Make the peak RSS (VmHWM) equal to the current RSS (Linux), so that only what follows counts."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def spec_of(method: str) -> mq.Int4:
    return mq.Int4(group_size=128, method=method)


def child(layers: int, width: int, method: str, threads: int) -> dict:
    """One measurement, in this (fresh) process: float model and data first, then ``quantize_``."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)]).eval()
    data = ([torch.randn(CALIBRATION_ROWS, width) for _ in range(CALIBRATION_BATCHES)]
            if method == "gptq" else None)
    before = _reset_peak()
    t0 = time.perf_counter()
    report = mq.quantize_(model, spec_of(method), calibration_data=data, progress=False, on_failure="ignore")
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_above": _status("VmHWM") - before,
            "quantized": sum(r.bytes_after for r in report.quantized),
            "float": sum(r.bytes_before for r in report.quantized)}


def measure(layers: int, width: int, method: str, threads: int) -> dict:
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(layers), str(width), method,
                          str(threads)], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def _table(title: str, head: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    print(f"\n{title}")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def _slope(xs: list[int], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else float("nan")


def bench_models(layer_counts: list[int], widths: list[int], threads: int,
                 methods: tuple[str, ...] = ("rtn", "gptq")) -> None:
    rows, slopes = [], []
    for method in methods:
        for width in widths:
            ones = [measure(1, width, method, threads) for _ in range(3)]  # one layer's peak varies run to run
            temporaries = statistics.median(max(one["peak_above"] - one["quantized"], 0) for one in ones)
            peaks = []
            for n in layer_counts:
                r = measure(n, width, method, threads)
                bound = r["quantized"] + 2 * temporaries
                peaks.append(r["peak_above"])
                rate = f"{r['float'] / r['seconds'] / 1e9:.2f}" if method == "rtn" else "-"
                rows.append((method, str(width), str(n), f"{r['seconds']:.2f}", f"{r['seconds'] / n:.3f}", rate,
                             _mb(r["float"]), _mb(r["quantized"]), _mb(r["peak_above"]), _mb(bound),
                             "yes" if r["peak_above"] <= bound else "NO"))
                print("measured:", "  ".join(rows[-1]), flush=True)  # long runs: each row as soon as it is known
            q_per_layer = r["quantized"] / layer_counts[-1]
            slopes.append((method, str(width), _mb(_slope(layer_counts, peaks)), _mb(q_per_layer), _mb(temporaries)))
    _table(f"quantize_ time and peak RSS above the float model (INT4 g128; {threads} threads; MB = 2**20 bytes)",
           ("method", "width", "layers", "seconds", "s/layer", "RTN GB/s", "float MB", "quantized MB",
            "peak above MB", "bound MB", "within"), rows)
    _table("Per-layer slope of the peak (least squares over the layer counts) vs the quantized bytes per layer",
           ("method", "width", "peak MB/layer", "quantized MB/layer", "1-layer temporaries MB"), slopes)


def bench_rtn_rate(layers: int, width: int, threads: int, repeats: int) -> None:
    """RTN throughput (issue 21: >= 1 GB/s of float weights) of INT8 and INT4-g128 on ``layers`` x
    ``Linear(width, width)``, against a float PyTorch pass over the same weights (a clone) in the same process."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    weights = [torch.randn(width, width) * 0.02 for _ in range(layers)]
    gb = sum(w.numel() * w.element_size() for w in weights) / 1e9
    mq.quantize_(nn.Sequential(nn.Linear(256, 256)), mq.Int8(), progress=False)  # first-use costs (extension)
    rows = []
    for name, spec in (("int8 (per channel)", mq.Int8()), ("int4-g128", mq.Int4(group_size=128))):
        times, clones = [], []
        for _ in range(repeats):
            model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)]).eval()
            with torch.no_grad():
                for layer, w in zip(model, weights):
                    layer.weight.copy_(w)
            t0 = time.perf_counter()
            mq.quantize_(model, spec, progress=False)
            times.append(time.perf_counter() - t0)
            del model
            t0 = time.perf_counter()
            copies = [w.clone() for w in weights]
            clones.append(time.perf_counter() - t0)
            del copies
        sec, ref = statistics.median(times), statistics.median(clones)
        rows.append((name, f"{sec:.3f}", f"{gb / sec:.2f}", f"{ref * 1e3:.0f}", f"{sec / ref:.1f}",
                     "yes" if gb / sec >= 1.0 else "NO"))
    _table(f"RTN quantize_ of {layers} x Linear({width}, {width}) ({gb:.2f} GB float32); {threads} threads; "
           f"median of {repeats}", ("spec", "seconds", "GB/s", "float clone ms", "ratio to clone", ">= 1 GB/s"), rows)


def bench_gptq_layer(widths: list[int], threads: int, repeats: int) -> None:
    """The default GPTQ config on one ``width x width`` layer: ``gptq_quantize`` alone (the GPTQ pass: ranges,
    inverse Cholesky factor, column loop, refit; issue 21's target) and what a user waits for, ``mq.quantize_`` of
    the layer with its calibration batches (float reference outputs, the calibration pass that accumulates the
    Hessian, GPTQ, the output SQNR of the report, the measured comparison), next to the float matmul of the layer
    on the calibration rows, all timed alternately in this process (medians)."""
    from monoquant.gptq import DEFAULT_OPTIONS, HessianObserver, gptq_quantize

    torch.set_num_threads(threads)
    spec, o = spec_of("gptq"), DEFAULT_OPTIONS
    rows = []
    for width in widths:
        torch.manual_seed(0)
        w = torch.randn(width, width) * 0.02
        batches = [torch.randn(CALIBRATION_ROWS, width) for _ in range(CALIBRATION_BATCHES)]
        x = torch.cat(batches)
        h = HessianObserver(width)
        h(x)
        hessian = h.hessian()
        times, whole, matmul = [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            gptq_quantize(spec, w, hessian, 128, act_order=o.act_order, damping=spec.damping,
                          static_groups=o.static_groups, refit_scales=o.refit_scales)
            times.append(time.perf_counter() - t0)
            model = nn.Sequential(nn.Linear(width, width, bias=False)).eval()
            with torch.no_grad():
                model[0].weight.copy_(w)
            t0 = time.perf_counter()
            mq.quantize_(model, spec, calibration_data=batches, progress=False)
            whole.append(time.perf_counter() - t0)
            del model
            t0 = time.perf_counter()
            x @ w.T
            matmul.append(time.perf_counter() - t0)
        sec, user, mm = statistics.median(times), statistics.median(whole), statistics.median(matmul)
        rows.append((f"{width}x{width}", f"{sec:.2f}", f"{user:.2f}", f"{mm * 1e3:.1f}", f"{sec / mm:,.0f}",
                     "yes" if width != 4096 or sec <= 4.0 else "NO"))
    _table(f"GPTQ, default config (act_order, static groups, MSE ranges, refit), one layer; {threads} threads; "
           f"median of {repeats}; {CALIBRATION_BATCHES} batches of {CALIBRATION_ROWS} rows",
           ("layer", "gptq_quantize s", "quantize_ s", "float matmul ms (2048 rows)", "gptq / matmul",
            "gptq <= 4 s at 4096"), rows)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        layers, width, method, threads = sys.argv[2:6]
        print(json.dumps(child(int(layers), int(width), method, int(threads))))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--widths", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--gptq-widths", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", choices=("models", "rtn", "gptq"))
    p.add_argument("--methods", nargs="+", choices=("rtn", "gptq"), default=["rtn", "gptq"],
                   help="methods of the model-size table")
    p.add_argument("--rtn-layers", type=int, default=8)
    p.add_argument("--rtn-width", type=int, default=4096)
    p.add_argument("--small", action="store_true", help="tiny sizes: checks that the script runs")
    args = p.parse_args()
    if args.small:
        args.layers, args.widths, args.gptq_widths, args.repeats = [2, 4], [256], [256], 1
        args.rtn_layers, args.rtn_width = 2, 256
    print(f"CPU: {cpu_identity()}; torch {torch.__version__}")
    if args.only in (None, "models"):
        bench_models(args.layers, args.widths, args.threads, tuple(args.methods))
    if args.only in (None, "rtn"):
        bench_rtn_rate(args.rtn_layers, args.rtn_width, args.threads, args.repeats)
    if args.only in (None, "gptq"):
        bench_gptq_layer(args.gptq_widths, args.threads, args.repeats)


if __name__ == "__main__":
    main()
