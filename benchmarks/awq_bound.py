"""How far activation-aware scaling and clipping could take ``awq+gptq`` on bench_accuracy.py's transformer stack.

Run by ``python benchmarks/bench_accuracy.py --only awq-bound --threads 1 --cache FILE`` (INT4-g128, about
3 minutes on one core of a shared AMD EPYC). It prints three things:

1. **Attribution.** One real ``quantize_`` run each of ``gptq min/max`` and ``awq+gptq`` gives every quantized
   layer's effective weight in the float model's frame (its dequantized weight, with a folded AWQ scale divided
   back out). Mixing those weights into the float model reproduces the real end-to-end SQNR (within about
   0.02 dB: the kernels round differently). The table gives, per layer, the held-out end-to-end SQNR with only that
   layer quantized ("alone") and with every layer but it quantized ("all but it"), and two ceilings: only the
   16-input ``embed`` and the 16-output ``head`` quantized (the eight encoder layers float), and only the eight
   encoder layers quantized.
2. **Oracle.** For ``embed`` and ``head`` (the layers the error is made of, and the ones rounded against the model
   output), the search optimises the **end-to-end** error on the calibration data, the one the target measures.
   Every candidate is rounded by the real GPTQ of ``awq+gptq``: the same options, the output-gradient Gram (see
   :mod:`monoquant.output_aware`), one flattened row. The search runs in two stages:
   - per-input-channel scales: AWQ's family ``mean|x|^t`` at :data:`FAMILY`, then coordinate descent over
     :data:`BLOCKS` blocks of channels (sorted by ``mean|x|``), each block's log-scale moved by
     +-:data:`SCALE_STEP`;
   - per-group clip ratios of the scaled weight: uniform at :data:`UNIFORM_CLIPS`, then coordinate descent over
     :data:`BLOCKS` blocks of groups by +-:data:`CLIP_STEP`, applied by a min/max observer that shrinks each
     group's range.

   It prints the calibration score the search maximised and the held-out result.
3. **Bound.** The stack with ``embed`` and ``head`` at their oracle weights is shown two ways: with the encoder
   layers quantized by ``awq+gptq``, and with them float. The second is a ceiling for any scaling or clipping (no
   scale makes an encoder layer exact), and it is compared with the issue's target (``gptq min/max`` + 1 dB).

The oracle is a local search on the very data it is scored on, so it overstates what a method could gain on
held-out data. Its calibration row is the optimistic one.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator

import torch
from torch import nn

import monoquant as mq
from monoquant import awq
from monoquant.gptq import GPTQOptions, HessianObserver, gptq_quantize
from monoquant.output_aware import float_pass, output_grams

FAMILY = (0.0, 0.2, 0.4, 0.6)
"""AWQ's scale exponents the oracle scores first (``s = mean|x|^t``; ``t = 0`` is no scaling)."""
BLOCKS = 8
"""Channel (scales) or group (clips) blocks of the coordinate descent."""
SCALE_STEP = 0.3
"""How far one coordinate step moves a block's natural-log scale."""
UNIFORM_CLIPS = (0.95,)
"""Clip ratios tried for all of a layer's groups at once, before the per-block steps."""
CLIP_STEP = 0.05
"""How far one coordinate step moves a block's clip ratio (kept in ``[0.5, 1]``)."""
ORACLE_LAYERS = ("embed", "head")


class ClipObserver(mq.MinMaxObserver):
    """Min/max ranges with each group's minimum and maximum multiplied by ``ratio`` (flattened, one per group)."""

    def __init__(self, ratio: torch.Tensor) -> None:
        super().__init__()
        self.ratio = ratio

    def _qparams(self, qtype):
        if self.ratio.numel() != self.min_val.numel():
            raise ValueError(f"{self.ratio.numel()} clip ratios for {self.min_val.numel()} groups")
        r = self.ratio.reshape(self.min_val.shape).to(self.min_val)
        return mq.functional.qparams_from_minmax(self.min_val * r, self.max_val * r, qtype)


@contextlib.contextmanager
def chosen_scales(record: dict[str, torch.Tensor], override: dict[str, torch.Tensor] | None = None) -> Iterator[None]:
    """Within: AWQ's scale choice records each layer's scale in ``record`` and returns ``override[name]`` instead
    for the layers listed there (the real search for the others)."""
    original = awq.awq_scale

    def choose(layers, *args, **kwargs):
        name = layers[0].name
        s = override[name] if override and name in override else original(layers, *args, **kwargs)
        record.update({item.name: s for item in layers})
        return s

    awq.awq_scale = choose
    try:
        yield
    finally:
        awq.awq_scale = original


def effective_weights(model: nn.Module, calib: list[torch.Tensor], spec: mq.Int4,
                      quantize: Callable) -> tuple[dict[str, torch.Tensor], nn.Module]:
    """Each quantized Linear's weight in ``model``'s frame after a real ``quantize(copy, config, calib)``, and that
    quantized copy."""
    q = copy.deepcopy(model)
    scales: dict[str, torch.Tensor] = {}
    with chosen_scales(scales):
        quantize(q, mq.QuantConfig(spec), calib)
    weights = {}
    for name, module in q.named_modules():
        if isinstance(module, mq.nn.QuantLinear):
            w = module.weight.detach().float()
            folded = name in scales and module.input_scale is None  # 1/s went into the op before it
            weights[name] = w / scales[name] if folded else w
    return weights, q


class Mixer:
    """The float model with some Linear weights replaced; end-to-end SQNR against the float model's outputs."""

    def __init__(self, model: nn.Module, data: dict[str, list[torch.Tensor]]) -> None:
        self.model = copy.deepcopy(model)
        self.modules = dict(self.model.named_modules())
        self.float = {n: m.weight.detach().clone() for n, m in self.modules.items() if type(m) is nn.Linear}
        self.data = data
        with float_pass(self.model):
            self.reference = {k: torch.cat([self.model(x) for x in xs]) for k, xs in data.items()}

    def model_sqnr(self, model: nn.Module) -> float:
        """End-to-end SQNR of another model (a quantized copy) on the held-out data."""
        with float_pass(model):
            return mq.functional.sqnr(self.reference["held"], torch.cat([model(x) for x in self.data["held"]]))

    def sqnr(self, weights: dict[str, torch.Tensor], on: str = "held") -> float:
        with float_pass(self.model):
            for name, w in self.float.items():
                self.modules[name].weight.copy_(weights.get(name, w))
            out = torch.cat([self.model(x) for x in self.data[on]])
        return mq.functional.sqnr(self.reference[on], out)


class OracleLayer:
    """One output-aware layer rounded by ``awq+gptq``'s GPTQ for a given scale vector and clip ratios."""

    def __init__(self, module: nn.Linear, gram: torch.Tensor, hessian: torch.Tensor, abs_mean: torch.Tensor,
                 spec: mq.Int4) -> None:
        self.w = module.weight.detach().float()
        self.gram, self.h, self.abs_mean, self.spec = gram, hessian, abs_mean, spec
        self.best: torch.Tensor | None = None
        n, k = self.w.shape
        self.group = min(spec.group_size, k)
        self.groups = n * k // self.group
        self.rounding = GPTQOptions.of(spec).rounding()

    def weight(self, s: torch.Tensor, ratio: torch.Tensor | None = None) -> torch.Tensor:
        """The effective weight of GPTQ (one flattened row, Hessian ``G (x) H / s s^T``) on ``W s``, in the float
        frame."""
        spec = self.spec if ratio is None else mq.Int4(group_size=self.spec.group_size, method="awq+gptq",
                                                        observer=ClipObserver(ratio))
        n, k = self.w.shape
        flat = (self.w * s).reshape(1, n * k)
        stored = gptq_quantize(spec, flat, torch.kron(self.gram, self.h / (s[:, None] * s[None, :])), self.group,
                               **self.rounding)
        return spec.dequantize(stored, n * k, self.group, torch.float32).reshape(n, k) / s


def _descend(score: Callable[[torch.Tensor], float], x: torch.Tensor, best: float, blocks: list[torch.Tensor],
             step: float, lo: float, hi: float) -> tuple[torch.Tensor, float]:
    """One coordinate sweep: each block moved by +step, else -step, kept where ``score`` improves."""
    for block in blocks:
        for sign in (1, -1):
            trial = x.clone()
            trial[block] = (trial[block] + sign * step).clamp(lo, hi)
            value = score(trial)
            if value > best:
                x, best = trial, value
                break
    return x, best


def search(layer: OracleLayer, name: str, mixer: Mixer) -> dict[str, tuple[float, float]]:
    """Oracle scales, then clips, for one layer (only it quantized): ``stage -> (calibration, held-out)`` SQNR dB;
    the final effective weight is left in ``layer.best``."""
    k = layer.w.shape[1]

    def scaled(logs: torch.Tensor) -> float:
        return mixer.sqnr({name: layer.weight(logs.exp())}, "calib")

    rows = {}
    logs = torch.zeros(k)
    best = scaled(logs)
    rows["no scales"] = (best, mixer.sqnr({name: layer.weight(logs.exp())}))
    a = (layer.abs_mean / layer.abs_mean.max()).clamp_min(1e-4).log()
    for t in FAMILY[1:]:
        value = scaled(a * t)
        if value > best:
            logs, best = a * t, value
    order = torch.argsort(layer.abs_mean, descending=True)
    logs, best = _descend(scaled, logs, best, list(order.chunk(BLOCKS)), SCALE_STEP, -8.0, 8.0)
    s = logs.exp()
    rows["oracle scales"] = (best, mixer.sqnr({name: layer.weight(s)}))

    def clipped(ratio: torch.Tensor) -> float:
        return mixer.sqnr({name: layer.weight(s, ratio)}, "calib")

    ratio = torch.ones(layer.groups)
    for r in UNIFORM_CLIPS:
        value = clipped(torch.full((layer.groups,), r))
        if value > best:
            ratio, best = torch.full((layer.groups,), r), value
    ratio, best = _descend(clipped, ratio, best, list(torch.arange(layer.groups).chunk(BLOCKS)), CLIP_STEP, 0.5, 1.0)
    layer.best = layer.weight(s, ratio)
    rows["oracle scales + clips"] = (best, mixer.sqnr({name: layer.best}))
    return rows


def _statistics(model: nn.Module, names: tuple[str, ...], calib: list[torch.Tensor]):
    """Input Hessian and mean |x| per channel of each named Linear on the calibration data."""
    modules = dict(model.named_modules())
    hessians = {n: HessianObserver(modules[n].in_features) for n in names}
    sums = dict.fromkeys(names, 0.0)

    def tap(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            hessians[name](x)
            sums[name] = sums[name] + x.abs().mean(0)
        return hook

    handles = [modules[n].register_forward_pre_hook(tap(n)) for n in names]
    try:
        with float_pass(model):
            for x in calib:
                model(x)
    finally:
        for h in handles:
            h.remove()
    return {n: hessians[n].hessian().float() for n in names}, {n: sums[n] / len(calib) for n in names}


def awq_bound(model: nn.Module, calib: list[torch.Tensor], held: list[torch.Tensor], quantize: Callable,
              group: int = 128) -> list[str]:
    """Print the attribution and oracle tables (see the module docstring); return the bound lines."""
    mixer = Mixer(model, {"calib": calib, "held": held})
    specs = {"gptq min/max": mq.Int4(group_size=group, method="gptq", observer=mq.MinMaxObserver()),
             "awq+gptq": mq.Int4(group_size=group, method="awq+gptq")}
    runs = {row: effective_weights(model, calib, spec, quantize) for row, spec in specs.items()}
    eff = {row: weights for row, (weights, _) in runs.items()}
    real = {row: mixer.model_sqnr(q) for row, (_, q) in runs.items()}
    names = list(eff["awq+gptq"])
    inner = [n for n in names if n not in ORACLE_LAYERS]
    print(f"\nAWQ bound, transformer stack INT4-g{group}: held-out end-to-end SQNR dB with some layers quantized "
          "(effective weights of a real quantize_ run mixed into the float model)")
    print(f"{'layers quantized':28}" + "".join(f"{row + ': alone':>20}{'all but it':>12}" for row in specs))
    for n in names:
        print(f"{n:28}" + "".join(f"{mixer.sqnr({n: e[n]}):20.2f}"
                                  f"{mixer.sqnr({m: e[m] for m in names if m != n}):12.2f}" for e in eff.values()))
    print(f"{'all (the real quantize_ run)':28}" + "".join(f"{real[row]:20.2f}{'':12}" for row in specs))
    for label, subset in (("all", names), ("embed + head only", list(ORACLE_LAYERS)), ("encoder layers only", inner)):
        print(f"{label:28}" + "".join(f"{mixer.sqnr({m: e[m] for m in subset}):20.2f}{'':12}" for e in eff.values()))
    grams = output_grams(model, {n: dict(model.named_modules())[n] for n in ORACLE_LAYERS}, calib, None, None)
    hessians, means = _statistics(model, ORACLE_LAYERS, calib)
    modules = dict(model.named_modules())
    print("\noracle (only this layer quantized, awq+gptq's GPTQ; search scored on the calibration end output): "
          "calibration / held-out SQNR dB; awq+gptq's own scales for comparison")
    print(f"{'layer':8} {'awq+gptq':>9} " + " ".join(f"{stage:>24}" for stage in
                                                     ("no scales", "oracle scales", "oracle scales + clips")))
    best = {}
    for n in ORACLE_LAYERS:
        layer = OracleLayer(modules[n], grams[n], hessians[n], means[n], specs["awq+gptq"])
        rows = search(layer, n, mixer)
        best[n] = layer.best
        print(f"{n:8} {mixer.sqnr({n: eff['awq+gptq'][n]}):9.2f} "
              + " ".join(f"{c:11.2f} / {h:10.2f}" for c, h in rows.values()), flush=True)
    target = real["gptq min/max"] + 1.0
    oracle_all = mixer.sqnr({**eff["awq+gptq"], **best})
    # optimistic: each of embed, head at whichever of its two weights is better on the held-out data
    ceiling = mixer.sqnr({n: max((best[n], eff["awq+gptq"][n]), key=lambda w, n=n: mixer.sqnr({n: w}))
                          for n in ORACLE_LAYERS})
    verdict = "reachable" if ceiling >= target else "out of reach"
    mixed = mixer.sqnr(eff["awq+gptq"])
    return [f"(bound) INT4-g{group} stack: awq+gptq {real['awq+gptq']:.2f} dB (mixed: {mixed:.2f}); "
            f"with embed and head at their oracle scales and clips {oracle_all:.2f} dB (mixed); ceiling (each of "
            f"embed, head at the better on held-out data of its oracle and awq+gptq weights, encoder layers float) "
            f"{ceiling:.2f} dB vs target gptq min/max + 1 = {target:.2f} dB: {verdict} by channel scaling and "
            "clipping"]
