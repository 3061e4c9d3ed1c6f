"""Latency and resident-memory ratios of QuantLinear / QuantConv2d against float32 PyTorch.

Run: python benchmarks/bench_linear.py [--threads 2] [--reps 15] [--crossover] [--only-rows] [--only-bf16]
[--w8a8-profile]

Everything is measured in one process on ``--threads`` threads under ``torch.inference_mode()``; each
figure is the median of several runs after warm-up (the warm-up is also when the kernel is chosen by
measurement, see :mod:`monoquant.tuner`). Ratios are ``fp32 time / quantized time`` (higher is faster) and
``quantized bytes / fp32 bytes`` (lower is smaller). The first table is issue 23's: a bf16 ``nn.Linear`` (the
bf16 cast) against the same layer quantized, by rows, as ``quantized time / cast time``. The second is issue 13's
(4096x4096, rows 1 to 2048, three configurations, the kernel chosen per row); the third holds issue 2's targets.
A FAIL is printed as such, never hidden. The header names the CPU (model and the SIMD flags that matter).

``--w8a8-profile`` prints only the W8A8 profile of the encoder's three linear shapes (2048 rows: 384->384,
384->1536, 1536->384): each step of the integer path timed alone (the dynamic per-token quantize,
``torch._int_mm``, the rescale/bias epilogue), the whole layer through each eligible INT8-input kernel, and the
float32 and bf16 GEMMs they replace, all in the same alternating rounds, as ratios to the bf16 GEMM.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time
from collections.abc import Callable

import _simulate
import _timing

SIMULATE_AVX2 = _simulate.requested()  # before torch is imported

import torch  # noqa: E402
from torch import nn  # noqa: E402

import monoquant as mq  # noqa: E402

SIMULATION = _simulate.mask_capabilities(mq) if SIMULATE_AVX2 else None


def median_ms(fn: Callable[[], object], *, reps: int, budget_s: float = 2.0) -> float:
    """Median wall time of ``fn()`` in milliseconds (2 warm-up calls; stops early past ``budget_s``)."""
    fn()
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def module_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``module`` (what it keeps resident)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def quantized(module: nn.Module, spec: mq.WeightSpec) -> nn.Module:
    cls = mq.QuantLinear if isinstance(module, nn.Linear) else mq.QuantConv2d
    return cls.from_float(module, spec)


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, ...]] = []
        self.failures = 0

    def add(self, case: str, what: str, fp32_ms: float | None, q_ms: float | None, value: float, target: str,
            ok: bool, kernel: str = "") -> None:
        self.failures += not ok
        def fmt(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}"

        self.rows.append((case, what, fmt(fp32_ms), fmt(q_ms), f"{value:.3f}x", target, kernel,
                          "PASS" if ok else "FAIL"))

    def print(self) -> None:
        head = ("case", "metric", "fp32 ms", "quant ms", "value", "target", "kernel", "result")
        rows = [head, *self.rows]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        for i, r in enumerate(rows):
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
            if i == 0:
                print("  ".join("-" * w for w in widths))


ROW_TARGETS = {1: 6.0, 8: 4.0, 32: 1.5, 256: 1.2, 2048: 1.0}
"""Issue 13's weight-only speed-up targets by row count (AVX2 figures; 2048 rows: 3.0x where bf16 is native)."""


def w8a8_dynamic(lin: nn.Linear) -> nn.Module:
    """``lin`` with INT8 weights and dynamic per-token INT8 activations (no calibration needed)."""
    model = nn.Sequential(copy.deepcopy(lin))
    mq.quantize_(model, mq.QuantConfig(mq.Int8(), activations=mq.Int8(dynamic=True), skip=mq.SkipRules.none()))
    return model[0]


def paired_ms(float_fn: Callable[[], object], quant_fn: Callable[[], object], *, reps: int,
              rounds: int = 5) -> tuple[float, float]:
    """``(fp32 ms, quantized ms)`` timed in ``rounds`` alternating blocks; each figure is the block median taken
    from the round with the median ratio, so a slow phase of a shared machine hits both sides of one ratio."""
    pairs = [(median_ms(float_fn, reps=max(3, reps // rounds), budget_s=1.0),
              median_ms(quant_fn, reps=max(3, reps // rounds), budget_s=1.0)) for _ in range(rounds)]
    pairs.sort(key=lambda p: p[0] / p[1])
    return pairs[len(pairs) // 2]


def bench_rows(table: Table, reps: int) -> None:
    """Issue 13's table: speed-up over float32 ``nn.Linear`` 4096x4096 by rows, with the kernel chosen.

    Each row count also gets an information line, the fp32 multiply-add ceiling: the speed-up that any kernel
    computing in float32 (``fused_cpu``, ``dequant``) could reach if it did the layer's ``rows * N * K``
    multiply-adds at the rate of the fastest 2048-row float32 GEMM timed in the run, with no memory cost at
    all (printed after the table).
    Where a target is above it, only a kernel with a faster arithmetic (bf16 or integer dot products) can meet it.
    """
    lin = nn.Linear(4096, 4096)
    qs = {"INT4-g128": quantized(lin, mq.Int4(group_size=128)), "INT8": quantized(lin, mq.Int8()),
          "INT8+dynA8": w8a8_dynamic(lin)}
    big = torch.randn(2048, 4096)
    best_2048 = min(median_ms(functools.partial(lin, big), reps=1) for _ in range(3))  # fastest float32 GEMM seen
    fp32_by_rows: dict[int, float] = {}
    for rows in ROW_TARGETS:
        x = torch.randn(rows, 4096)
        fp32_all = []
        for name, q in qs.items():
            fp32, ms = paired_ms(functools.partial(lin, x), functools.partial(q, x), reps=reps)
            fp32_all.append(fp32)
            if name == "INT8+dynA8":
                target = 1.0  # never slower than float
            elif rows == 2048 and mq.kernels.cpu_has_fast_bf16():
                target = 3.0
            else:
                target = ROW_TARGETS[rows]
            table.add(f"4096x4096 rows {rows}", f"{name} speedup", fp32, ms, fp32 / ms, f">= {target}x",
                      fp32 / ms >= target, q.last_kernel or "")
        fp32_by_rows[rows] = statistics.median(fp32_all)
        if rows == 2048:
            best_2048 = min(best_2048, *fp32_all)
        if rows == 2048 and mq.kernels.cpu_has_fast_bf16():
            # what any dequantize + bf16 path can reach here: a bf16 GEMM with the weight already in bf16
            xb, wb = x.bfloat16(), lin.weight.detach().bfloat16()
            ms = median_ms(functools.partial(torch.mm, xb, wb.t()), reps=reps)
            fp32 = fp32_by_rows[rows]
            table.rows.append((f"4096x4096 rows {rows}", "bf16 GEMM alone", f"{fp32:.3f}", f"{ms:.3f}",
                               f"{fp32 / ms:.3f}x", "(ceiling)", "torch.mm bf16", "info"))
    for rows, fp32 in fp32_by_rows.items():
        ceiling_ms = best_2048 * rows / 2048
        table.rows.append((f"4096x4096 rows {rows}", "fp32 FMA ceiling", f"{fp32:.3f}", f"{ceiling_ms:.3f}",
                           f"{fp32 / ceiling_ms:.3f}x", "(ceiling)", "float32 math", "info"))


BF16_ROWS = (1, 8, 32, 256, 2048)
"""Row counts of the bf16 table (issue 23: weight-only at or below the bf16 cast's time at every batch size)."""


def bench_bf16_rows(table: Table, reps: int) -> None:
    """Issue 23's comparison: ``nn.Linear(4096, 4096).to(torch.bfloat16)`` (the user's alternative) against the same
    bf16 layer quantized to INT4-g128 / INT8 weight-only, on bf16 input, by rows; time ratio quantized / cast,
    target <= 1.0x where the CPU has fast bf16 GEMMs (AMX / AVX512-BF16), else printed without a target. The
    kernel column is what the tuner chose and ran."""
    lin = nn.Linear(4096, 4096).to(torch.bfloat16)
    qs = {"INT4-g128": quantized(lin, mq.Int4(group_size=128)), "INT8": quantized(lin, mq.Int8())}
    fast = mq.kernels.cpu_has_fast_bf16()
    for rows in BF16_ROWS:
        x = torch.randn(rows, 4096, dtype=torch.bfloat16)
        for name, q in qs.items():
            cast, ms = paired_ms(functools.partial(lin, x), functools.partial(q, x), reps=reps)
            ratio = ms / cast
            table.add(f"bf16 4096x4096 rows {rows}", f"{name} time / bf16 cast", cast, ms, ratio,
                      "<= 1.0x" if fast else "(none)", not fast or ratio <= 1.0, q.last_kernel or "")


def cpu_line() -> str:
    """The CPU as the figures depend on it: model and SIMD flags, torch, threads, the compiled kernel's path."""
    k = mq.kernels
    return (f"CPU: {mq.fused.cpu_identity()}\ntorch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"fused kernel: {mq.fused.simd()}, integer dot products (VNNI/AMX): {k.cpu_has_int_dot()}, "
            f"fast bf16: {k.cpu_has_fast_bf16()}, tuning: {mq.tuner.tuning_enabled()}, "
            f"pinned: {mq.tuner.pinned()}")


def bench_linear(table: Table, reps: int) -> None:
    specs = {"INT8": mq.Int8(), "INT4-g128": mq.Int4(group_size=128)}
    speed_targets = {("INT4-g128", 1): 6.0, ("INT4-g128", 32): 2.5, ("INT8", 1): 6.0}
    byte_targets = {"INT4-g128": 0.14, "INT8": 0.26}
    for in_f, out_f in ((4096, 4096), (4096, 11008)):
        lin = nn.Linear(in_f, out_f)
        qs = {name: quantized(lin, spec) for name, spec in specs.items()}
        case = f"Linear {in_f}->{out_f}"
        for name, q in qs.items():
            ratio = module_bytes(q) / module_bytes(lin)
            target = byte_targets[name]
            table.add(case, f"{name} bytes", None, None, ratio, f"<= {target}x", ratio <= target)
        for batch in (1, 8, 32):
            x = torch.randn(batch, in_f)
            fp32 = median_ms(functools.partial(lin, x), reps=reps)
            for name, q in qs.items():
                ms = median_ms(functools.partial(q, x), reps=reps)
                speedup = fp32 / ms
                target = speed_targets.get((name, batch))
                table.add(f"{case} batch {batch}", f"{name} speedup", fp32, ms, speedup,
                          f">= {target}x" if target else "(none)", target is None or speedup >= target,
                          q.last_kernel or "")


def bench_large_batch(table: Table, reps: int) -> None:
    for in_f, out_f in ((384, 1536), (4096, 4096)):
        lin = nn.Linear(in_f, out_f)
        x = torch.randn(2048, in_f)
        fp32 = median_ms(functools.partial(lin, x), reps=reps)
        for name, spec in (("INT8", mq.Int8()), ("INT4-g128", mq.Int4(group_size=128))):
            q = quantized(lin, spec)
            ms = median_ms(functools.partial(q, x), reps=reps)
            table.add(f"Linear {in_f}->{out_f} 2048 rows", f"{name} speedup", fp32, ms, fp32 / ms, ">= 2.0x",
                      fp32 / ms >= 2.0, q.last_kernel or "")


def bench_conv(table: Table, reps: int) -> None:
    conv = nn.Conv2d(64, 64, 3, padding=1)
    x = torch.randn(8, 64, 56, 56)
    q = quantized(conv, mq.Int8())
    fp32 = median_ms(lambda: conv(x), reps=reps)
    ms = median_ms(lambda: q(x), reps=reps)
    case = "Conv2d 64->64 3x3 56x56 batch 8"
    table.add(case, "INT8 time ratio", fp32, ms, ms / fp32, "<= 1.3x", ms / fp32 <= 1.3, q.last_kernel or "")
    ratio = module_bytes(q) / module_bytes(conv)
    table.add(case, "INT8 bytes", None, None, ratio, "<= 0.26x", ratio <= 0.26)


def crossover(reps: int) -> None:
    """Packed kernel vs dequantize + GEMM vs fp32 by row count (4096x4096): where the packed candidates'
    ``max_rows`` (registered by the Int8 and Int4 formats) should be."""
    lin = nn.Linear(4096, 4096)
    qs = [quantized(lin, mq.Int8()), quantized(lin, mq.Int4(group_size=128))]
    packed = [next(c for c in q.spec.kernel_candidates() if c.name.endswith("pack_cpu")) for q in qs]
    limits = [c.max_rows for c in packed]
    print("\ncrossover, Linear 4096->4096 (current max_rows: "
          + ", ".join(f"{c.name}={c.max_rows}" for c in packed) + ")")
    print("rows  fp32 ms  " + "  ".join(f"{n} packed ms  {n} dequant ms" for n in ("INT8", "INT4")))
    try:
        for rows in (8, 16, 24, 32, 48, 64, 96):
            x = torch.randn(rows, 4096)
            cells = [f"{rows:<4}  {median_ms(functools.partial(lin, x), reps=reps):7.3f}"]
            for q, c in zip(qs, packed):
                for limit in (10**9, 0):
                    c.max_rows = limit
                    cells.append(f"{median_ms(functools.partial(q, x), reps=reps):14.3f}")
            print("  ".join(cells))
    finally:
        for c, limit in zip(packed, limits):
            c.max_rows = limit


def w8a8_profile(reps: int) -> None:
    """The W8A8 linear of the encoder, step by step and whole, against the bf16 and float32 GEMMs (bf16 input
    for the bf16 rows; float32 otherwise), medians of alternating rounds (:mod:`_timing`)."""
    print("\nW8A8 profile, 2048 rows, dynamic per-token INT8 activations x per-channel INT8 weights "
          "(ms, median; ratio to the bf16 GEMM)")
    for k, n in ((384, 384), (384, 1536), (1536, 384)):
        lin = nn.Linear(k, n)
        q = w8a8_dynamic(lin)
        w, act, bias = q.quant_weight, q.input_quantizer, q.bias
        x = torch.randn(2048, k)
        xb, wb, bb = x.bfloat16(), lin.weight.detach().bfloat16(), lin.bias.detach().bfloat16()
        codes, x_scale, _ = act.int8_codes(x)
        wq = w.stored.qweight
        acc = torch._int_mm(codes, wq.t())
        rowsum = wq.sum(1, dtype=torch.int32)
        zero = act.int8_codes(x)[2].reshape(-1).to(torch.int32) - 128
        calls: dict[str, Callable[[], object]] = {
            "bf16 GEMM (F.linear, bf16 weight)": functools.partial(torch.nn.functional.linear, xb, wb, bb),
            "fp32 GEMM (F.linear)": functools.partial(torch.nn.functional.linear, x, lin.weight, lin.bias),
            "  step: dynamic quantize (one pass)": functools.partial(act.int8_codes, x),
            "  step: torch._int_mm (int32 sums)": functools.partial(torch._int_mm, codes, wq.t()),
            "  step: rescale + zero-point + bias": functools.partial(
                mq.fused.rescale_rows, acc, x_scale.reshape(-1).contiguous(), w.stored.scale.float(),
                lin.bias.detach(), zero, rowsum),
        }
        for c in w.format.kernel_candidates():
            if c.int8_inputs and not c.fallback and c.eligible(w, mq.kernels._query(q, x.device, 2048, False)):
                calls[f"layer: {c.name}"] = functools.partial(c.run, w, x, act, bias)
                calls[f"layer: {c.name}, bf16 input"] = functools.partial(c.run, w, xb, act, bias)
        calls["layer: as tuned (QuantLinear)"] = functools.partial(q, x)
        times = [statistics.median(t) * 1e3 for t in _timing.alternating_seconds(*calls.values(), reps=reps)]
        bf16_ms = times[0]
        print(f"Linear {k}->{n} ({2048 * k * n / 1e9:.2f} G multiply-adds); the tuned layer ran {q.last_kernel}")
        for name, ms in zip(calls, times):
            print(f"  {name:<40} {ms:8.3f} ms  {ms / bf16_ms:6.3f}x bf16")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(_simulate.FLAG, action="store_true",
                        help="time as an AVX2-only CPU would (see benchmarks/_simulate.py)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=15, help="timed runs per figure (median reported)")
    parser.add_argument("--crossover", action="store_true",
                        help="also time packed kernels against dequantize + GEMM by row count")
    parser.add_argument("--only-rows", action="store_true", help="only issue 13's table by row count")
    parser.add_argument("--w8a8-profile", action="store_true", help="only the W8A8 profile of the encoder's shapes")
    parser.add_argument("--only-bf16", action="store_true",
                        help="only issue 23's table: weight-only against the bf16 cast, by row count")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(cpu_line())
    if SIMULATION:
        print(SIMULATION)
    if args.w8a8_profile:
        with torch.inference_mode():
            w8a8_profile(args.reps)
        return 0
    start = time.perf_counter()
    failures = 0
    with torch.inference_mode():
        if not args.only_rows:
            bf16 = Table()
            print("weight-only against the bf16 cast (fp32 ms column: the cast's time)")
            bench_bf16_rows(bf16, args.reps)
            bf16.print()
            failures += bf16.failures
        rows = Table()
        if not args.only_bf16:
            print()
            bench_rows(rows, args.reps)
            rows.print()
        failures += rows.failures
        if not (args.only_rows or args.only_bf16):
            print()
            table = Table()
            bench_linear(table, args.reps)
            bench_large_batch(table, max(3, args.reps // 3))
            bench_conv(table, args.reps)
            table.print()
            failures += table.failures
    print(f"{failures} target(s) missed; {time.perf_counter() - start:.0f} s")
    if args.crossover:
        with torch.inference_mode(), mq.kernels.tuning(False):  # max_rows is the static table's
            crossover(max(3, args.reps // 3))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
