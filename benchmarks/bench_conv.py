"""Where a quantized convolution's time goes, layer by layer, against the same float32 convolution.

Run: python benchmarks/bench_conv.py [--threads 2] [--reps 15] [--batches 1 16 256] [--nets digits resnet]

For every conv layer of two nets -- the digits CNN of ``bench_models.py`` (3 Conv2d, 8x8 images) and a
ResNet-style stage (3x3 convs, 64 channels at 32x32 and 128 channels at 16x16) -- and every batch size, it times
in the same rounds (the fastest of ``--reps`` calls, microseconds):

- ``float``: the ``nn.Conv2d`` itself;
- ``quant``: the quantized layer's ``forward`` (whatever kernel it chose, shown in the last column);
- the parts of the plain float path a quantized conv can take: ``deq`` (dequantize the whole kernel to float32;
  ``kept`` where the layer keeps its dequantized kernel, see ``kernels.FLOAT_WEIGHT_CACHE_BYTES``), ``fq``
  (fake-quantize the input per sample as the layer does, W8A8 only), ``conv`` (``F.conv2d`` with an already
  dequantized float32 weight); ``over`` is ``quant - deq - fq - conv`` of that plain path (``deq`` counted only
  where not kept: Python overhead, input checks, dispatch), printed for the layers that ran the plain path.

Three formats: INT4 weight-only, INT8 weight-only, INT8 weights + dynamic INT8 activations (per sample).
"""

from __future__ import annotations

import argparse
import copy
import functools
from collections.abc import Callable

import _timing
import torch
import torch.nn.functional as F
from torch import nn

import monoquant as mq
from monoquant.conv_kernels import fake_quantize_samples


def fastest_us(*fns: Callable[[], object], reps: int) -> list[float]:
    """Fastest call of each of ``fns`` in microseconds, timed alternately in the same rounds (a load burst hits
    them alike). The fastest, not the median: on a machine shared with other processes a median of calls this
    short measures the scheduler's time slices (16 ms steps were seen), the fastest the work."""
    return [min(t) * 1e6 for t in _timing.alternating_seconds(*fns, reps=reps)]


def digits_convs() -> list[tuple[str, nn.Conv2d, tuple[int, ...]]]:
    """The digits CNN's convs with the input shape each sees (per sample)."""
    return [("digits conv1 1->32 8x8", nn.Conv2d(1, 32, 3, padding=1), (1, 8, 8)),
            ("digits conv2 32->64 8x8", nn.Conv2d(32, 64, 3, padding=1), (32, 8, 8)),
            ("digits conv3 64->64 4x4", nn.Conv2d(64, 64, 3, padding=1), (64, 4, 4))]


def resnet_convs() -> list[tuple[str, nn.Conv2d, tuple[int, ...]]]:
    """A ResNet-style stage: 3x3 convs (no bias, as before a BatchNorm)."""
    return [("resnet 64->64 32x32", nn.Conv2d(64, 64, 3, padding=1, bias=False), (64, 32, 32)),
            ("resnet 64->128 s2 32x32", nn.Conv2d(64, 128, 3, stride=2, padding=1, bias=False), (64, 32, 32)),
            ("resnet 128->128 16x16", nn.Conv2d(128, 128, 3, padding=1, bias=False), (128, 16, 16))]


VARIANTS = (("INT4", mq.Int4(), None), ("INT8", mq.Int8(), None), ("W8A8", mq.Int8(), mq.Int8(dynamic=True)))


def quantized(conv: nn.Conv2d, weights: mq.WeightSpec, act: mq.WeightSpec | None) -> nn.Module:
    q = copy.deepcopy(nn.Sequential(conv))
    mq.quantize_(q, mq.QuantConfig(weights, activations=act, skip=mq.SkipRules.none()))
    return q[0]


def row(name: str, batch: int, variant: str, conv: nn.Conv2d, q: nn.Module, x: torch.Tensor, reps: int) -> None:
    w = q.dequantize_weight(torch.float32)
    act = q.input_quantizer
    parts: list[Callable[[], object]] = [functools.partial(conv, x), functools.partial(q, x),
                                         functools.partial(q.dequantize_weight, torch.float32),
                                         functools.partial(F.conv2d, x, w, conv.bias, conv.stride, conv.padding)]
    if act is not None:
        parts.append(functools.partial(fake_quantize_samples, act, x))
    times = fastest_us(*parts, reps=reps)
    fl, qt, deq, cv = times[:4]
    fq = times[4] if act is not None else 0.0
    kernel = q.kernel_summary()
    plain = "dequant_conv" in kernel and "bf16" not in kernel
    kept = "float_weight" in q.quant_weight.cache  # no dequantize per call (kernels.FLOAT_WEIGHT_CACHE_BYTES)
    over = f"{qt - (0.0 if kept else deq) - fq - cv:8.0f}" if plain else f"{'-':>8}"
    fq_cell = f"{fq:8.0f}" if act is not None else f"{'-':>8}"
    deq_cell = f"{'kept':>8}" if kept and plain else f"{deq:8.0f}"
    print(f"{name:<24} {batch:>5} {variant:<5} {fl:9.0f} {qt:9.0f} {qt / fl:6.2f}x {deq_cell} {fq_cell} {cv:8.0f} "
          f"{over}  {kernel}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--nets", nargs="+", choices=["digits", "resnet"], default=["digits", "resnet"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {mq.fused.cpu_identity()}\ntorch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"integer dot products: {mq.kernels.cpu_has_int_dot()}, fast bf16: {mq.kernels.cpu_has_fast_bf16()}")
    print(f"{'layer':<24} {'batch':>5} {'fmt':<5} {'float us':>9} {'quant us':>9} {'ratio':>7} {'deq':>8} "
          f"{'fq':>8} {'conv':>8} {'over':>8}  kernel")
    torch.manual_seed(0)
    with torch.inference_mode():
        nets = {"digits": digits_convs, "resnet": resnet_convs}
        for name, conv, shape in [c for net in args.nets for c in nets[net]()]:
            conv.eval()
            for batch in args.batches:
                if batch > 16 and shape[-1] > 16:
                    batch = 64  # the large ResNet maps: 64 images already take tens of ms
                x = torch.randn(batch, *shape)
                for variant, weights, act in VARIANTS:
                    row(name, batch, variant, conv, quantized(conv, weights, act), x, args.reps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
