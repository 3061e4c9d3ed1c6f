"""One-command GPU check: the CUDA kernels against the CPU reference, then the speed table on CUDA.

Run: python benchmarks/gpu_check.py [--reps 20]

Without CUDA it prints why and exits with status 0. With CUDA, for a 4096x4096 layer in three configurations
(INT4-g128 weight-only -> ``int4pack_cuda`` on sm80+, INT8 weight-only, INT8 weights + dynamic INT8
activations -> ``w8a8_int_mm`` above 16 rows), it checks every row count's output against the float64
reference computed on the CPU (fake-quantized input times the dequantized weight), then prints speed-ups over
float32 ``nn.Linear`` on the same GPU with the kernel each row ran. Exit status 1 when an output is off.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

import monoquant as mq

ROWS = (1, 8, 32, 256, 2048)
TOLERANCE = 2e-2  # relative error; the CUDA kernels compute in bf16


def cuda_ms(fn, reps: int) -> float:
    fn()
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def configs(lin: nn.Linear) -> dict[str, nn.Module]:
    def q(weights, acts=None):
        model = nn.Sequential(copy.deepcopy(lin))
        mq.quantize_(model, mq.QuantConfig(weights, activations=acts, skip=mq.SkipRules.none()))
        return model[0]

    return {"INT4-g128": q(mq.Int4(group_size=128)), "INT8": q(mq.Int8()),
            "INT8+dynA8": q(mq.Int8(), mq.Int8(dynamic=True))}


def reference(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """float64 on the CPU: the (fake-)quantized input times the dequantized weight."""
    xc = x.cpu()
    act = layer.input_quantizer
    if act is not None:
        xc = act.fake_quantize(xc)  # per-token dynamic quantization, computed on the CPU
    return F.linear(xc.double(), layer.dequantize_weight(torch.float64, flat=True), layer.bias.double())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"no CUDA device (torch {torch.__version__}, cuda build: {torch.version.cuda}): nothing to check")
        return 0
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(dev)}, capability {torch.cuda.get_device_capability(dev)}, "
          f"torch {torch.__version__}")
    torch.manual_seed(0)
    lin = nn.Linear(4096, 4096)
    qs = configs(lin)  # quantized on the CPU: the reference's buffers are exactly the ones moved to CUDA
    lin_cuda = copy.deepcopy(lin).to(dev)
    qs_cuda = {name: copy.deepcopy(q).to(dev) for name, q in qs.items()}
    bad = 0
    print("rows  config       kernel           rel err   fp32 ms   quant ms   speed-up")
    with torch.inference_mode():
        for rows in ROWS:
            x = torch.randn(rows, 4096, device=dev)
            fp32 = cuda_ms(functools.partial(lin_cuda, x), args.reps)
            for name, q in qs_cuda.items():
                y = q(x)
                ref = reference(qs[name], x)
                err = float((y.double().cpu() - ref).norm() / ref.norm())
                ok = err <= TOLERANCE
                bad += not ok
                ms = cuda_ms(functools.partial(q, x), args.reps)
                print(f"{rows:<5} {name:<12} {q.last_kernel:<16} {err:8.1e}{'' if ok else ' BAD'}  {fp32:8.3f}  "
                      f"{ms:9.3f}  {fp32 / ms:8.2f}x")
    print("all outputs within tolerance" if not bad else f"{bad} output(s) off the CPU reference")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
