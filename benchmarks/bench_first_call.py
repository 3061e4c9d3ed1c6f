"""The first ``quantize_`` in a fresh process against later ones, with the compiled kernels already built.

Run: python benchmarks/bench_first_call.py [--reps 4]

Each measurement runs in a fresh Python process (so nothing is imported or loaded yet): it quantizes copies of
the same 4-layer MLP (1024 wide) ``--reps`` times with ``Int4(method="mse")``, whose clipping search runs on the
compiled kernels, and prints each call's time and its ratio to the median of the later calls. Target: the first
call <= 1.1x a later one (loading a finished build must not recompile or re-run ``ninja``). The build itself is
done (once) before timing, in another process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import copy, json, sys, time
import torch
from torch import nn
import monoquant as mq
torch.set_num_threads(2)
torch.manual_seed(0)
model = nn.Sequential(*(nn.Linear(1024, 1024) for _ in range(4)))
times = []
for _ in range(int(sys.argv[1])):
    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    mq.quantize_(m, mq.QuantConfig(mq.Int4(method="mse"), skip=mq.SkipRules.none()))
    times.append(time.perf_counter() - t0)
print(json.dumps({"times": times, "state": mq.fused.build_state(), "cpu": mq.fused.cpu_identity()}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--processes", type=int, default=5)
    args = parser.parse_args()
    env = dict(os.environ)
    subprocess.run([sys.executable, "-m", "monoquant", "doctor", "--build"], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    firsts = []
    for p in range(args.processes):
        out = subprocess.run([sys.executable, "-c", CHILD, str(args.reps)], env=env, check=True,
                             capture_output=True, text=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        times = result["times"]
        later = statistics.median(times[1:])
        firsts.append(times[0] / later)
        if p == 0:
            print(f"CPU: {result['cpu']}\ncompiled kernels: {result['state']}")
        print(f"  process {p + 1}: quantize_ s " + " ".join(f"{t:.3f}" for t in times)
              + f"  first / median(later) {times[0] / later:.2f}x ({times[0] - later:+.3f} s)")
    ratio = statistics.median(firsts)
    print(f"median first/later ratio {ratio:.2f}x  target <= 1.1x  {'PASS' if ratio <= 1.1 else 'FAIL'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
