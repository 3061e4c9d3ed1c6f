"""How often the tuner's choice changes between processes, against a long alternating measurement of its candidates.

Run (quiet machine; the first form starts ``--processes`` fresh Python processes, one after the other):

    python benchmarks/tuner_noise.py picks --case encoder [--processes 10]
    python benchmarks/tuner_noise.py truth --case encoder [--reps 60]
    python benchmarks/tuner_noise.py picks --case rows32 --simulate-avx2
    python benchmarks/tuner_noise.py truth --case rows32 --simulate-avx2

Cases:

- ``encoder``: ``bench_models.py``'s encoder cast to bf16 (6 blocks, d=384, FFN 1536, 32 x 64 tokens: 2048 rows
  per linear, bf16 activations), quantized INT4-g128, INT8 and INT8 + dynamic INT8 activations; ``picks`` runs one
  forward per quantized model in each fresh process (the first forward times the candidates once per layer shape,
  as in the benchmark) and tabulates what the tuner chose per situation and what it measured;
- ``rows32``: ``bench_linear.py``'s ``nn.Linear(4096, 4096)`` at 32 input rows (float32), INT4-g128 and INT8.

``truth`` times the same candidates pinned (``mq.kernels.pin``) on the same layer shapes and inputs, alternating
(:func:`_timing.alternating_seconds`, one call of each per round), and prints medians, minima and each candidate's
median relative to the fastest: the ground truth a choice should agree with.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _simulate
import _timing

SIMULATE_AVX2 = _simulate.requested()  # before torch is imported

import torch  # noqa: E402
from torch import nn  # noqa: E402

import monoquant as mq  # noqa: E402
from monoquant import kernels, tuner  # noqa: E402

SIMULATION = _simulate.mask_capabilities(mq) if SIMULATE_AVX2 else None

FORMATS = {"INT4-g128": (mq.Int4(group_size=128), None), "INT8": (mq.Int8(), None),
           "W8A8": (mq.Int8(), mq.Int8(dynamic=True))}
ENCODER_SHAPES = ((384, 384), (1536, 384), (384, 1536))  # (out, in): q/k/v/o, fc1, fc2


def _quantized(model: nn.Module, weights, activations) -> nn.Module:
    q = copy.deepcopy(model)
    mq.quantize_(q, mq.QuantConfig(weights, activations=activations, skip=mq.SkipRules.none()))
    return q


def _layers(case: str) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """``(label, quantized layer, input)`` for every situation of ``case`` (the ``truth`` form)."""
    torch.manual_seed(0)
    out = []
    if case == "encoder":
        for n, k in ENCODER_SHAPES:
            lin = nn.Linear(k, n).to(torch.bfloat16)
            x = torch.randn(2048, k, dtype=torch.bfloat16)
            for name, (w, a) in FORMATS.items():
                out.append((f"{name} {n}x{k} r2048 bf16", _quantized(nn.Sequential(lin), w, a)[0], x))
    else:
        lin = nn.Linear(4096, 4096)
        x = torch.randn(32, 4096)
        for name in ("INT4-g128", "INT8"):
            w, a = FORMATS[name]
            out.append((f"{name} 4096x4096 r32 fp32", _quantized(nn.Sequential(lin), w, a)[0], x))
    return out


def _first_call_cost(q: nn.Module, x: torch.Tensor) -> float:
    """Seconds the first call of ``q`` on ``x`` (which times the kernels) took beyond the median of three later
    calls."""
    with torch.no_grad():
        t0 = time.perf_counter()
        q(x)
        first = time.perf_counter() - t0
        later = []
        for _ in range(3):
            t0 = time.perf_counter()
            q(x)
            later.append(time.perf_counter() - t0)
    return first - statistics.median(later)


def one_process(case: str) -> None:
    """Make the choices of ``case`` once, print them as one JSON line: ``[[label, key, choice, {name: s}], ...]``."""
    torch.set_num_threads(2)
    rows = []
    first = 0.0
    if case == "encoder":
        sys.path.insert(0, "benchmarks")
        from bench_models import Stack

        torch.manual_seed(0)
        model = Stack(6, 384, 6, 1536).eval().to(torch.bfloat16)
        x = torch.randn(32, 64, 384, dtype=torch.bfloat16)
        for name, (w, a) in FORMATS.items():
            q = _quantized(model, w, a)
            before = set(tuner.measurements())
            first += _first_call_cost(q, x)
            rows.extend([name, key, tuner.choices()[key], m.first, m.retimed]
                        for key, m in tuner.measurements().items() if key not in before)
    else:
        for label, q, x in _layers(case):
            before = set(tuner.measurements())
            first += _first_call_cost(q, x)
            rows.extend([label, key, tuner.choices()[key], m.first, m.retimed]
                        for key, m in tuner.measurements().items() if key not in before)
    print(json.dumps({"rows": rows, "seconds": first}))


def picks(case: str, processes: int, save: str | None) -> None:
    """Run ``one_process`` in ``processes`` fresh processes and tabulate the choices and the measured times (the
    first pass's fastest call, and the second pass's median call where the candidate was timed again)."""
    argv = [sys.executable, __file__, "one", "--case", case, *([_simulate.FLAG] if SIMULATE_AVX2 else [])]
    by_key: dict[tuple[str, str], list[tuple[str, dict[str, float], dict[str, float]]]] = collections.defaultdict(list)
    seconds = []
    for _ in range(processes):
        out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        seconds.append(result["seconds"])
        for label, key, choice, first, retimed in result["rows"]:
            by_key[(label, key)].append((choice, first, retimed))
    if save:
        Path(save).write_text(json.dumps([[label, key, results] for (label, key), results in by_key.items()]))
    print(f"tuner picks in {processes} fresh processes, case {case}{' (' + SIMULATION + ')' if SIMULATION else ''}")
    print(f"first-call cost (the first forwards' time beyond a later forward, summed over the case): median "
          f"{statistics.median(seconds):.2f} s, min {min(seconds):.2f} s, max {max(seconds):.2f} s")

    def spread(ts: list[float]) -> str:
        return f"{statistics.median(ts):8.3f} {min(ts):8.3f} {max(ts):8.3f}" if ts else f"{'-':>8} {'':8} {'':8}"

    for (label, key), results in by_key.items():
        counts = collections.Counter(choice for choice, _, _ in results)
        print(f"\n{label}: {key}")
        print("  picks: " + ", ".join(f"{name} x{n}" for name, n in counts.most_common()))
        print(f"  {'candidate':<18} {'first pass (fastest call) ms':>26}  {'second pass (median call) ms':>26}  "
              "timed again")
        print(f"  {'':<18} {'median':>8} {'min':>8} {'max':>8}  {'median':>8} {'min':>8} {'max':>8}")
        for name in results[0][1]:
            first = [f[name] * 1e3 for _, f, _ in results if name in f]
            again = [r[name] * 1e3 for _, _, r in results if name in r]
            print(f"  {name:<18} {spread(first)}  {spread(again)}  {len(again)}/{len(results)}")


def truth(case: str, reps: int) -> None:
    """Each situation's candidates pinned and timed alternately over ``reps`` rounds."""
    torch.set_num_threads(2)
    print(f"alternating measurement of the tuner's candidates, {reps} rounds, case {case}"
          f"{' (' + SIMULATION + ')' if SIMULATION else ''}")
    for label, q, x in _layers(case):
        special = kernels._activation_candidates(q, x.device, x.shape[0], False)
        if special is not None:
            names = [*special, "float_acts"]
        else:
            names = kernels._weight_candidates(q, x.device, x.shape[0], False, kernels.TUNE_MAX_ROWS, x.dtype)

        def pinned(name: str, q: nn.Module = q, x: torch.Tensor = x):
            def call():
                with kernels.pin(name), torch.no_grad():
                    return q(x)
            return call

        times = _timing.alternating_seconds(*(pinned(n) for n in names), reps=reps)
        medians = [statistics.median(t) * 1e3 for t in times]
        best = min(medians)
        print(f"\n{label}")
        print(f"  {'candidate':<18} {'median ms':>10} {'min ms':>8} {'vs fastest':>10}")
        for name, t, med in zip(names, times, medians):
            print(f"  {name:<18} {med:10.3f} {min(t) * 1e3:8.3f} {med / best:9.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("picks", "truth", "one"))
    parser.add_argument("--case", choices=("encoder", "rows32"), required=True)
    parser.add_argument("--processes", type=int, default=10)
    parser.add_argument("--reps", type=int, default=60)
    parser.add_argument("--save", help="picks: also write the measurements as JSON to this file")
    parser.add_argument(_simulate.FLAG, action="store_true", help="time as an AVX2-only CPU would")
    args = parser.parse_args()
    if args.mode != "one":
        print(f"CPU: {mq.fused.cpu_identity()}; torch {torch.__version__}", flush=True)
    {"picks": lambda: picks(args.case, args.processes, args.save), "truth": lambda: truth(args.case, args.reps),
     "one": lambda: one_process(args.case)}[args.mode]()


if __name__ == "__main__":
    main()
