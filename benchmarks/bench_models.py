"""End-to-end time of quantized models against the same float32 models, with the kernel each layer used.

Run: python benchmarks/bench_models.py [--threads 2] [--reps 5] [--skip-encoder] [--skip-cnn] [--skip-decoder]
[--skip-compile] [--nets digits resnet]

Three models, each timed in one process, float32 first, medians of ``--reps`` runs after warm-up (the warm-up
is also when kernels are chosen by measurement, see :mod:`monoquant.tuner`). Every model also gets the row a
user would compare with first, the same model cast with ``model.to(torch.bfloat16)`` (bf16 input), and every
quantized row prints its time against that cast too:

- a BERT-style encoder: 6 layers, d=384, 6 heads, FFN 1536, a batch of 32 sequences of 64 tokens; float32,
  INT4-g128 weight-only, INT8 weight-only, and INT8 weights with dynamic per-token INT8 activations; and the
  INT4 model under ``torch.compile(fullgraph=True)`` against the same model eager (each quantized linear is one
  ``monoquant::linear`` custom op in the graph);
- a decoder-style block stack generating one token at a time: d=2048, 16 heads, FFN 4096, 8 layers, batch 1,
  a key/value cache after a 16-token prompt; the time per generated token, float32 and INT4-g128;
- a small digits CNN (3 Conv2d + 2 Linear, 8x8 images) at batch 1, 16 and 256, and a ResNet-style stage
  (7 Conv2d of 64-128 channels with BatchNorm + 1 Linear, 32x32 images) at batch 1, 16 and 64: INT4 and INT8
  weight-only, INT8 + dynamic INT8 activations (each row with the kernel every layer ran per batch bucket), and
  the digits INT8 model compiled against eager at batch 256 (``--skip-encoder`` runs the conv nets alone).

The encoder and the decoder also get two rows that bound what quantizing can reach:

- **ceiling** rows: the model with every ``nn.Linear`` replaced by a module that returns a preallocated output
  of the right shape (:class:`NoMatmul`), in float32 and in bf16: the time of everything but the linear layers'
  matmuls (norms, attention, GELU, residuals), the lower bound of any weight-only or W8A8 model whose
  activations stay in that dtype;
- **bf16-model** rows: ``model.to(torch.bfloat16)`` quantized (bf16 activations), against the cast itself: the
  like-for-like comparison, since the cast also runs every non-linear op in bf16 while the float32 model's
  quantized rows keep float32 activations.

Targets: encoder INT4 <= 0.9x float32 time; encoder with dynamic INT8 activations <= 0.6x where the CPU has
integer dot products (VNNI/AMX; elsewhere reported without a target); decoder INT4 token <= 0.3x; every conv
net row <= 1.0x float32 (a row that misses it prints its ceiling: the same float ops without monoquant's
per-call dispatch, see :func:`baseline_ops`); a
compiled quantized model <= 1.0x its eager time; on the bf16 model, where the CPU has fast bf16 GEMMs (AMX /
AVX512-BF16), weight-only INT4 and INT8 <= 1.0x the cast and dynamic INT8 activations <= 0.7x the cast (with
integer dot products). The bf16-cast comparisons of the float32 model's rows are printed without targets.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time
from collections import Counter
from collections.abc import Callable

import _simulate
import _timing

SIMULATE_AVX2 = _simulate.requested()  # before torch is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import monoquant as mq  # noqa: E402
from monoquant.conv_kernels import fake_quantize_samples  # noqa: E402

SIMULATION = _simulate.mask_capabilities(mq) if SIMULATE_AVX2 else None


def paired_ms(*fns: Callable[[], object], reps: int, shuffled: bool = False) -> list[float]:
    """Medians of ``fns`` timed alternately in the same rounds, so a load burst on a shared machine hits them alike
    (sequential blocks gave float32 times differing 1.8x between two runs here); ``shuffled``: in a new order each
    round (:func:`_timing.alternating_seconds`)."""
    return [statistics.median(t) * 1e3 for t in _timing.alternating_seconds(*fns, reps=reps, shuffled=shuffled)]


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v/o ``nn.Linear`` layers and an optional key/value cache."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor, cache: list[torch.Tensor] | None = None, causal: bool = False):
        b, t, d = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        if cache is not None:
            if cache:
                k, v = torch.cat((cache[0], k), dim=2), torch.cat((cache[1], v), dim=2)
            cache[:] = [k, v]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal and t > 1)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: attention and a GELU MLP (``fc1``, ``fc2``)."""

    def __init__(self, d: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x: torch.Tensor, cache: list[torch.Tensor] | None = None, causal: bool = False):
        x = x + self.attn(self.norm1(x), cache, causal)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Stack(nn.Module):
    def __init__(self, layers: int, d: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, heads, ffn) for _ in range(layers))

    def forward(self, x: torch.Tensor, caches: list[list[torch.Tensor]] | None = None, causal: bool = False):
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i], causal)
        return x


def quantize(model: nn.Module, weights: mq.WeightSpec, activations: mq.WeightSpec | None = None) -> nn.Module:
    q = copy.deepcopy(model)
    mq.quantize_(q, mq.QuantConfig(weights, activations=activations, skip=mq.SkipRules.none()))
    return q


def kernels_used(model: nn.Module) -> str:
    """The kernels each quantized layer ran (per row bucket, :func:`monoquant.kernels.kernel_summary`), one line per
    block of a block stack, else one line for the model."""
    def cells(module: nn.Module) -> str:
        return " ".join(f"{name}={m.kernel_summary()}" for name, m in module.named_modules()
                        if isinstance(m, mq.QuantModule))

    lines = ([f"    block {i}: {cells(block)}" for i, block in enumerate(model.blocks)] if hasattr(model, "blocks")
             else [f"    {cells(model)}"])
    totals = Counter(m.last_kernel for m in model.modules() if isinstance(m, mq.QuantModule))
    lines.append("    last kernel totals: " + ", ".join(f"{k} x{n}" for k, n in totals.most_common()))
    return "\n".join(lines)


def report(name: str, fp32_ms: float, q_ms: float, target: float | None, bf16_ms: float | None = None,
           base: str = "fp32") -> bool:
    ratio = q_ms / fp32_ms
    verdict = "(no target here)" if target is None else ("PASS" if ratio <= target else "FAIL")
    goal = "" if target is None else f"target <= {target}x  "
    vs_bf16 = "" if bf16_ms is None else f"  vs bf16 cast {q_ms / bf16_ms:.3f}x"
    print(f"  {name:<36} {base} {fp32_ms:9.2f} ms  quant {q_ms:9.2f} ms  time ratio {ratio:.3f}x{vs_bf16}  "
          f"{goal}{verdict}")
    return target is None or ratio <= target


def bf16_cast(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """``model.to(torch.bfloat16)`` (a copy) called on bf16 ``x``: what a user would try before quantizing."""
    cast = copy.deepcopy(model).to(torch.bfloat16)
    return functools.partial(cast, x.to(torch.bfloat16))


def bf16_row(fp32_ms: float, bf16_ms: float) -> None:
    print(f"  {'bf16 cast (model.to(torch.bfloat16))':<36} fp32 {fp32_ms:9.2f} ms  bf16  {bf16_ms:9.2f} ms  "
          f"time ratio {bf16_ms / fp32_ms:.3f}x  (the user's alternative)")


class NoMatmul(nn.Module):
    """Stands in for an ``nn.Linear`` at no matmul cost: returns a preallocated output (one per input shape, random
    values so that the ops after it see ordinary numbers) in the layer's dtype."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.out_features = linear.out_features
        self.register_buffer("probe", torch.empty(0, dtype=linear.weight.dtype))  # follows model.to(dtype)
        self.outputs: dict[tuple, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], self.out_features)
        out = self.outputs.get((shape, self.probe.dtype))
        if out is None:
            out = self.outputs[shape, self.probe.dtype] = torch.randn(shape, dtype=self.probe.dtype)
        return out


def without_matmuls_(model: nn.Module) -> nn.Module:
    """``model`` (in place) with every ``nn.Linear`` replaced by a :class:`NoMatmul`: the ceiling rows' model."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, NoMatmul(child))
    return model


def ceiling_row(dtype: str, fp32_ms: float, ms: float) -> None:
    print(f"  {'ceiling ' + dtype + ' (no Linear matmul cost)':<36} fp32 {fp32_ms:9.2f} ms  {dtype:<5} {ms:9.2f} ms  "
          f"time ratio {ms / fp32_ms:.3f}x  (bound of any {dtype}-activation quantized model)")


def bench_bf16_model(model: nn.Module, x: torch.Tensor, variants, reps: int) -> int:
    """The ceilings (float32, bf16), then each ``(name, weights, activations, target vs the cast)`` quantization of
    ``model.to(torch.bfloat16)`` (bf16 activations) against that cast, timed in the same rounds. Returns the
    number of missed targets."""
    cast = copy.deepcopy(model).to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    ceiling32 = without_matmuls_(copy.deepcopy(model))
    ceiling16 = without_matmuls_(copy.deepcopy(cast))
    fp32, bf16, c32, c16 = paired_ms(functools.partial(model, x), functools.partial(cast, xb),
                                     functools.partial(ceiling32, x), functools.partial(ceiling16, xb), reps=reps)
    bf16_row(fp32, bf16)
    ceiling_row("fp32", fp32, c32)
    ceiling_row("bf16", fp32, c16)
    print(f"  bf16 model quantized (bf16 activations), against the cast; ceiling bf16 = {c16 / bf16:.3f}x the cast")
    failures = 0
    fast_bf16 = mq.kernels.cpu_has_fast_bf16()
    for name, weights, act, target in variants:
        q = quantize(cast, weights, act)
        bf16, ms = paired_ms(functools.partial(cast, xb), functools.partial(q, xb), reps=reps)
        failures += not report(f"bf16 model {name}", bf16, ms, target if fast_bf16 else None, base="bf16")
        print(kernels_used(q))
    return failures


def compiled_row(name: str, q: nn.Module, x: torch.Tensor, reps: int) -> bool:
    """``torch.compile(q, fullgraph=True)`` against ``q`` eager (compile time printed); target <= 1.0x."""
    start = time.perf_counter()
    compiled = torch.compile(q, fullgraph=True)
    compiled(x)
    seconds = time.perf_counter() - start
    eager, ms = paired_ms(functools.partial(q, x), functools.partial(compiled, x), reps=reps)
    ok = report(f"{name} compiled (fullgraph)", eager, ms, 1.0, base="eager")
    print(f"    (compiled in {seconds:.1f} s)")
    return ok


def bench_variants(model: nn.Module, x: torch.Tensor, variants, reps: int, compile_kind: str | None,
                   shuffled: bool = False) -> int:
    """Each ``(name, weights, activations, target)`` quantized copy of ``model`` against float32, with the bf16
    cast timed in the same rounds (``shuffled``: in a new order each round, see :func:`paired_ms`); the weight-only
    variant of format ``compile_kind`` also compiled. Returns the number of missed targets."""
    failures = 0
    cast = bf16_cast(model, x)
    for name, weights, act, target in variants:
        q = quantize(model, weights, act)
        fp32, bf16, ms = paired_ms(functools.partial(model, x), cast, functools.partial(q, x), reps=reps,
                                   shuffled=shuffled)
        bf16_row(fp32, bf16)  # timed in the same rounds as the quantized model below
        failures += not report(name, fp32, ms, target, bf16)
        print(kernels_used(q))
        if act is None and weights.kind == compile_kind:
            failures += not compiled_row(name, q, x, reps)
    return failures


def bench_encoder(reps: int, compile_too: bool, bf16_only: bool = False) -> int:
    """The encoder's float32-model rows (unless ``bf16_only``), then its bf16-model rows against the cast."""
    torch.manual_seed(0)
    model = Stack(6, 384, 6, 1536).eval()
    x = torch.randn(32, 64, 384)
    print("encoder: 6 layers, d=384, FFN 1536, 32 x 64 tokens (rows per linear: 2048)")
    has_dot = mq.kernels.cpu_has_int_dot()
    failures = 0 if bf16_only else bench_variants(model, x, (
        ("INT4-g128 weight-only", mq.Int4(group_size=128), None, 0.9),
        ("INT8 weight-only", mq.Int8(), None, None),
        ("INT8 weights + dynamic INT8 acts", mq.Int8(), mq.Int8(dynamic=True), 0.6 if has_dot else None),
    ), reps, "int4" if compile_too else None)
    return failures + bench_bf16_model(model, x, (
        ("INT4-g128 weight-only", mq.Int4(group_size=128), None, 1.0),
        ("INT8 weight-only", mq.Int8(), None, 1.0),
        ("INT8 weights + dynamic INT8 acts", mq.Int8(), mq.Int8(dynamic=True), 0.7 if has_dot else None),
    ), reps)


class DigitsCNN(nn.Module):
    """3 Conv2d + 2 Linear on 8x8 grey digits (the issue's small CNN)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        )
        self.fc = nn.Linear(64 * 4 * 4, 128)
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(self.features(x).flatten(1))))


class ResNetStage(nn.Module):
    """A ResNet-style net on 32x32 RGB images: a 3x3 stem to 64 channels, a basic block at 64 channels, a strided
    block to 128 channels at 16x16 (1x1 projection shortcut), global average pool, a linear head; BatchNorm after
    every conv, as in ResNet (7 Conv2d + 1 Linear)."""

    def __init__(self) -> None:
        super().__init__()

        def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))

        self.stem = conv_bn(3, 64)
        self.block1 = nn.ModuleList([conv_bn(64, 64), conv_bn(64, 64)])
        self.block2 = nn.ModuleList([conv_bn(64, 128, stride=2), conv_bn(128, 128)])
        self.project = conv_bn(64, 128, k=1, stride=2)
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.block1[1](torch.relu(self.block1[0](x))))
        x = torch.relu(self.project(x) + self.block2[1](torch.relu(self.block2[0](x))))
        return self.head(x.mean((2, 3)))


def baseline_ops(q: nn.Module) -> nn.Module:
    """The float ops of ``q``'s baseline path without monoquant's per-call dispatch: a float copy holding the
    dequantized weights (``mq.dequantize_``), whose layers with INT8 activations fake-quantize their input in a
    pre-hook (per sample for convs, one compiled call; per token for linears), as the baseline does, unless the
    layer ran on its float input (``float_acts``/``float_acts_conv``, measured faster). The ceiling
    printed under a conv-net row that misses its target: what is left between it and the quantized model is the
    per-call dispatch (input checks, the kernel lookup) of each layer."""
    acts = {name: m.input_quantizer for name, m in q.named_modules()  # not where the float input ran (float_acts*)
            if isinstance(m, mq.QuantModule) and m.input_quantizer is not None
            and not (m.last_kernel or "").startswith("float_acts")}
    ceiling = mq.dequantize_(copy.deepcopy(q))
    for name, m in ceiling.named_modules():
        act = acts.get(name)
        if act is not None and isinstance(m, nn.Conv2d):
            m.register_forward_pre_hook(lambda _, args, act=act: (fake_quantize_samples(act, args[0]),))
        elif act is not None:
            m.register_forward_pre_hook(lambda _, args, act=act: (act.fake_quantize(args[0]),))
    return ceiling


def bench_convnet(title: str, model: nn.Module, image: tuple[int, ...], batches: tuple[int, ...], reps: int,
                  compile_batch: int | None) -> int:
    """Float32 vs INT4 / INT8 weight-only / INT8 + dynamic INT8 activations at each batch, target <= 1.0x float32
    (each conv's kernel is chosen by measurement with the float conv as the baseline, see
    :mod:`monoquant.conv_kernels`); a row over its target also prints its ceiling (:func:`baseline_ops`) and the
    dispatch cost per layer that separates the quantized model from it. The INT8 weight-only model at
    ``compile_batch`` is also compiled."""
    failures = 0
    for batch in batches:
        torch.manual_seed(0)
        x = torch.randn(batch, *image)
        rounds = rounds_for(model, x, reps)
        print(f"{title}, batch {batch} (medians of {rounds} rounds)")
        for name, weights, act in (("INT4 weight-only", mq.Int4(), None), ("INT8 weight-only", mq.Int8(), None),
                                   ("INT8 weights + dynamic INT8 acts", mq.Int8(), mq.Int8(dynamic=True))):
            # shuffled rounds: in a fixed order the quantized model always ran right after the bf16 cast, whose
            # oneDNN bf16 convs left it 25 us (15%) slower at batch 1 than after the float model (AMD EPYC Zen 4)
            failed = bench_variants(model, x, ((name, weights, act, 1.0),), rounds,
                                    "int8" if batch == compile_batch else None, shuffled=True)
            if rounds >= 200:  # calls under 2 ms (rounds_for's cap): also each model warm, as when served in a loop
                warm_row(model, quantize(model, weights, act), x)
            if failed:
                q = quantize(model, weights, act)
                q(x)  # kernels chosen before timing
                ceiling = baseline_ops(q)
                fp32, ceil, ms = paired_ms(functools.partial(model, x), functools.partial(ceiling, x),
                                           functools.partial(q, x), reps=rounds, shuffled=True)
                layers = sum(isinstance(m, mq.QuantModule) for m in q.modules())
                print(f"    ceiling: the baseline's float ops without dispatch {ceil:.2f} ms ({ceil / fp32:.3f}x "
                      f"float32 {fp32:.2f} ms); quantized {ms:.2f} ms: {(ms - ceil) / layers * 1e3:.1f} us of "
                      f"dispatch per layer ({layers} layers)")
            failures += failed
    return failures


def warm_row(model: nn.Module, q: nn.Module, x: torch.Tensor, calls: int = 300, blocks: int = 8) -> None:
    """Quantized against float32 with each called ``calls`` times in a row (blocks alternating,
    :func:`_timing.alternating_blocks`): informational, next to the target row, which times every call right after
    the other models' (the bf16 cast's oneDNN kernels, the float model's) and so with colder caches."""
    fp32, quant = _timing.alternating_blocks(functools.partial(model, x), functools.partial(q, x), calls=calls,
                                             blocks=blocks)
    print(f"    warm ({calls} calls in a row each, blocks alternating; not the target's measure): fp32 "
          f"{fp32 * 1e3:.2f} ms  quant {quant * 1e3:.2f} ms  time ratio {quant / fp32:.3f}x")


def rounds_for(model: nn.Module, x: torch.Tensor, reps: int, seconds: float = 0.4, most: int = 200) -> int:
    """``reps``, raised for a model that runs in well under a millisecond so that its rounds take about ``seconds``
    (at most ``most`` rounds): a median of 5 calls of 0.3 ms measured the scheduler of a shared machine (one
    run's float32 digits CNN at batch 16 took 1.1 ms, the next 5.2 ms), one of ~1000 the model."""
    model(x)
    once = min(_timing.alternating_seconds(functools.partial(model, x), reps=3)[0])
    return max(reps, min(most, int(seconds / max(once, 1e-6))))


def bench_cnn(reps: int, compile_too: bool, nets: tuple[str, ...] = ("digits", "resnet")) -> int:
    failures = 0
    if "digits" in nets:
        torch.manual_seed(0)
        failures += bench_convnet("digits CNN: 3 Conv2d + 2 Linear, 8x8 images", DigitsCNN().eval(), (1, 8, 8),
                                  (1, 16, 256), reps, 256 if compile_too else None)
    if "resnet" in nets:
        torch.manual_seed(0)
        failures += bench_convnet("ResNet-style stage: 7 Conv2d (64-128 channels) + 1 Linear, 32x32 images",
                                  ResNetStage().eval(), (3, 32, 32), (1, 16, 64), reps, None)
    return failures


def bench_decoder(reps: int, tokens: int = 8) -> int:
    d, layers = 2048, 8

    def build() -> nn.Module:  # the same float32 weights every time (rebuilt rather than copied: 1 GB each)
        torch.manual_seed(0)
        return Stack(layers, d, 16, 2 * d).eval()

    prompt = torch.randn(1, 16, d)
    print(f"decoder: {layers} layers, d={d}, FFN {2 * d}, batch 1, one token at a time after a 16-token prompt")

    def token_ms(m: nn.Module, dtype: torch.dtype = torch.float32) -> float:
        caches: list[list[torch.Tensor]] = [[] for _ in range(layers)]
        m(prompt.to(dtype), caches, causal=True)
        times = []
        for _ in range(tokens + 2):
            step = torch.randn(1, 1, d, dtype=dtype)
            t0 = time.perf_counter()
            m(step, caches, causal=True)
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times[2:])

    def median_token_ms(m: nn.Module, dtype: torch.dtype = torch.float32) -> float:
        return statistics.median(token_ms(m, dtype) for _ in range(reps))

    model = build()
    fp32 = median_token_ms(model)
    model.to(torch.bfloat16)  # in place (memory)
    bf16 = median_token_ms(model, torch.bfloat16)
    bf16_row(fp32, bf16)
    ceiling = without_matmuls_(build())
    ceiling_row("fp32", fp32, median_token_ms(ceiling))
    ceiling_row("bf16", fp32, median_token_ms(ceiling.to(torch.bfloat16), torch.bfloat16))
    failures = 0
    mq.quantize_(model, mq.QuantConfig(mq.Int4(group_size=128), skip=mq.SkipRules.none()))  # the bf16 model
    q16 = median_token_ms(model, torch.bfloat16)
    failures += not report("bf16 model INT4-g128 token latency", bf16, q16,
                           1.0 if mq.kernels.cpu_has_fast_bf16() else None, base="bf16")
    print(kernels_used(model))
    del model
    model = build()
    mq.quantize_(model, mq.QuantConfig(mq.Int4(group_size=128), skip=mq.SkipRules.none()))  # in place: memory
    q_ms = median_token_ms(model)
    failures += not report("INT4-g128 token latency", fp32, q_ms, 0.3, bf16)
    print(kernels_used(model))
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(_simulate.FLAG, action="store_true",
                        help="time as an AVX2-only CPU would (see benchmarks/_simulate.py)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--skip-cnn", action="store_true", help="no conv-net rows")
    parser.add_argument("--skip-decoder", action="store_true")
    parser.add_argument("--skip-encoder", action="store_true", help="no encoder rows (the conv nets and decoder only)")
    parser.add_argument("--nets", nargs="*", choices=["digits", "resnet"], default=["digits", "resnet"],
                        help="which conv nets to time (none: no conv rows)")
    parser.add_argument("--skip-compile", action="store_true", help="no torch.compile rows (compiling takes a while)")
    parser.add_argument("--only-bf16-model", action="store_true",
                        help="of the encoder, only the bf16-model rows against the cast (fits a short quiet run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    k = mq.kernels
    print(f"CPU: {mq.fused.cpu_identity()}\ntorch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"fused kernel: {mq.fused.simd()}, integer dot products: {k.cpu_has_int_dot()}, "
          f"fast bf16: {k.cpu_has_fast_bf16()}")
    if SIMULATION:
        print(SIMULATION)
    failures = 0
    with torch.inference_mode():
        if not args.skip_encoder:
            failures += bench_encoder(args.reps, not args.skip_compile, args.only_bf16_model)
        if not args.skip_cnn:
            failures += bench_cnn(args.reps, not args.skip_compile, tuple(args.nets))
        if not args.skip_decoder:
            failures += bench_decoder(args.reps)
    print(f"{failures} target(s) missed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
