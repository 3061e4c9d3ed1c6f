"""Activation-aware channel scaling: AWQ (Lin et al., 2024) for low-bit weights, SmoothQuant (Xiao et al., 2023)
for INT8 activations.

A Linear layer computes the same thing after dividing its input channel ``j`` by ``s_j > 0`` and multiplying its
weight column ``j`` by ``s_j``: ``x W^T = (x / s) (W s)^T``. Both methods choose ``s`` from calibration activations,
then quantize ``W s`` instead of ``W``:

* **AWQ** (``method="awq"`` / ``"awq+gptq"``): ``s = mean|x|^t`` with ``t`` searched on a grid of
  :data:`SCALE_GRID` values in ``[0, 1)`` to minimise the output error ``sum ||x W^T - x (Q(W s) / s)^T||^2`` of
  all the layers that read the same input (q/k/v, gate/up), exactly over every calibration row through the input
  Hessian ``H = mean x^T x``, ``Q`` round-to-nearest (for ``"awq+gptq"`` the :data:`GPTQ_SHORTLIST` best candidates
  are then scored with GPTQ itself). ``method="awq"`` then searches a clipping range per weight group
  (shrinking its min/max by ``1 - 0.5 i / CLIP_GRID``) that minimises that group's share of the output error, and
  rounds to nearest; ``"awq+gptq"`` rounds the scaled weight with GPTQ (its observer chooses the ranges): the
  same clipping applied before GPTQ lowered the end-to-end SQNR of ``benchmarks/bench_accuracy.py``'s transformer
  stack from 33.43 to 31.06 dB (INT4-g128), and scoring all :data:`SCALE_GRID` candidates with GPTQ instead of the
  :data:`GPTQ_SHORTLIST` best gave the same 33.43 dB. Its GPTQ is ``method="gptq"``'s, options included (e.g.
  ``output_aware``, :mod:`monoquant.output_aware`): ``"awq+gptq"`` is AWQ's scales followed by the same GPTQ.
* **SmoothQuant** (``QuantConfig(smoothquant=alpha)``): ``s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)``, which
  evens out activation channels whose range is far larger than the others' (outliers), so that one per-tensor
  INT8 activation scale fits all channels.

Where the scales go: the op that produced the layers' input is found by tracing one calibration batch (the input
tensor *is* the output of a ``LayerNorm``, an RMSNorm or a ``Linear``). When one is found, ``1 / s`` is folded
into its weight (and bias), the model's output on that batch is compared with the output before folding, and the
fold is kept only when they agree (relative error below :data:`FOLD_TOLERANCE`): a norm whose output also feeds a
residual connection, or an RMSNorm computing ``(1 + w) x``, cannot absorb the scales and fails that check. When
nothing can absorb them, the quantized layer keeps ``1 / s`` as its ``input_scale`` buffer (one multiply per input
element, saved and loaded with the layer). Folding leaves the float model's output unchanged (up to rounding).

The search runs on the float model's activations (one pass over the calibration data; with ``torch.distributed``
initialised the statistics are all-reduced so every rank chooses the same scales and folds), one group at a time;
only ``nn.Linear`` layers whose weight no other layer shares are scaled (other layers keep the method's rounding:
RTN for ``"awq"``, GPTQ for ``"awq+gptq"``). Memory: one ``[K, K]`` float32 Hessian per group of
layers with ``K`` inputs (AWQ only), held until the scales are chosen.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import data as data_mod
from .compare import _output_tensors
from .errors import CalibrationError
from .formats import WeightSpec, method_of
from .gptq import GPTQOptions, HessianObserver, gptq_quantize
from .observers import distributed_ready
from .output_aware import float_pass
from .qtypes import PerTensor

SCALE_GRID = 20
"""AWQ's scale exponents ``t = 0, 1/20, ..., 19/20`` (the paper's grid)."""
CLIP_GRID = 20
"""AWQ's clipping search: group ranges shrunk by ``1, 0.975, ..., 0.525`` (down to half, as in the paper)."""
GPTQ_SHORTLIST = 3
"""``method="awq+gptq"``: how many of the best scale candidates (by round-to-nearest error) GPTQ then scores. Only
those: adding ``s = 1`` (no scaling) to them, as before, made ``"awq+gptq"`` exactly ``"gptq"`` on the Llama-style
model of ``benchmarks/bench_accuracy.py`` (GPTQ's error on the calibration inputs is lowest without scales in every
group there), while the shortlist alone gives +0.116 vs +0.157% perplexity over float (paired difference
-0.041 +- 0.019 points) and 39.08 vs 39.04 dB on its transformer stack (INT4-g128, AMD EPYC Zen 4). Scoring the
candidates by the error at the model output (:mod:`monoquant.output_aware`'s Grams) instead was worse on both
(+0.140% and 38.86 dB), as was a shortlist of 5 on the stack (38.95 dB); with ``s = 1`` in the shortlist, AutoAWQ's
duo candidates gave 38.87 dB there and a 40-point grid 39.07 dB."""
SEARCH_ROWS = 512
"""The scale search scores each candidate on at most this many output rows of each layer (every ``ceil(N / 512)``-th):
rows are quantized independently (RTN and GPTQ alike), so the error of a row subset is exact for those rows and
estimates the whole layer's; a 4096-row layer is searched 8x faster. Layers quantized per tensor use all rows."""
FOLD_TOLERANCE = 1e-4
"""Largest relative change of the model output (on one calibration batch) for which a fold counts as exact."""

@dataclass
class ScaledLayer:
    """One Linear layer to scale: its name, float module, weight format and resolved group size."""

    name: str
    module: nn.Linear
    spec: WeightSpec
    group_size: int | None
    smooth_alpha: float | None = None
    """SmoothQuant's migration strength; ``None``: AWQ (the format's method says which variant)."""

    @property
    def clips(self) -> bool:
        """Whether AWQ's clipping search applies (``method="awq"``, and a weight with per-row or group ranges)."""
        return (self.smooth_alpha is None and method_of(self.spec).name == "awq"
                and not isinstance(self.spec.weight_granularity(self.group_size), PerTensor))


@dataclass
class _Group:
    """Layers reading one input tensor: they share one scale vector, folded into ``producer`` when possible."""

    layers: list[ScaledLayer]
    producer: tuple[str, nn.Module] | None = None
    hessian: HessianObserver | None = None
    abs_sum: torch.Tensor | None = None
    abs_max: torch.Tensor | None = None
    rows: int = 0
    scale: torch.Tensor | None = None
    folded: bool = False

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        a = x.abs()
        total, peak = a.sum(0), a.amax(0)
        if self.abs_sum is None:
            self.abs_sum, self.abs_max = total, peak
        else:
            self.abs_sum += total
            torch.maximum(self.abs_max, peak, out=self.abs_max)
        self.rows += x.shape[0]
        if self.hessian is not None:
            self.hessian(x)


@dataclass
class _Change:
    """A parameter a fold changed: ``module``'s ``name`` was ``tensor`` holding ``old``. An inference tensor
    (made under ``torch.inference_mode()``) cannot change in place: the fold gave the module a new parameter."""

    module: nn.Module
    name: str
    tensor: torch.Tensor
    old: torch.Tensor


def _scale_parameter(module: nn.Module, name: str, factor: torch.Tensor, saved: list[_Change],
                     divide: bool = False) -> None:
    """Multiply (``divide``: divide) ``module``'s parameter ``name`` by ``factor`` (broadcast), in place, or for an
    inference tensor (never requiring gradients) by replacing it with a new one; recorded in ``saved`` for
    :func:`_restore`."""
    tensor = getattr(module, name)
    saved.append(_Change(module, name, tensor, tensor.detach().clone()))
    factor = factor.to(tensor.dtype)
    with torch.no_grad():
        if tensor.is_inference():
            new = tensor.detach().clone()
            new = new / factor if divide else new * factor
            is_parameter = name in module._parameters
            setattr(module, name, nn.Parameter(new, requires_grad=False) if is_parameter else new)
        elif divide:
            tensor.div_(factor)
        else:
            tensor.mul_(factor)


def _restore(saved: list[_Change]) -> None:
    """Undo the changes in ``saved`` (latest first): the same tensors with their old values; an inference tensor
    that was replaced is put back itself."""
    with torch.no_grad():
        for change in reversed(saved):
            if getattr(change.module, change.name) is change.tensor:
                change.tensor.copy_(change.old)
            else:
                setattr(change.module, change.name, change.tensor)
    saved.clear()


@dataclass
class Scaling:
    """What :func:`scale_layers` did: the float weights to quantize, the input scales of layers whose scales
    nothing absorbed, and :meth:`undo` (put every folded weight back)."""

    groups: list[_Group] = field(default_factory=list)
    sources: dict[str, nn.Module] = field(default_factory=dict)
    input_scales: dict[str, torch.Tensor] = field(default_factory=dict)
    _saved: list[_Change] = field(default_factory=list)

    def source(self, name: str, module: nn.Module) -> nn.Module:
        """The float module whose weight layer ``name`` is quantized from (``module`` when it was not scaled)."""
        return self.sources.get(name, module)

    def input_scale(self, name: str) -> torch.Tensor | None:
        """``1 / s`` for a scaled layer whose scales no preceding op absorbed, else ``None``."""
        return self.input_scales.get(name)

    def undo(self) -> None:
        """Restore every weight and bias a fold changed (the same tensors, their old values)."""
        _restore(self._saved)

    def summary(self, what: str) -> str:
        """A report note: how many groups were scaled and where their scales went."""
        folded = sum(g.folded for g in self.groups)
        layers = sum(len(g.layers) for g in self.groups)
        return (f"{what}: {layers} layers in {len(self.groups)} groups sharing an input; {folded} groups' scales "
                f"folded into the op before them, {len(self.groups) - folded} kept as an input_scale")


def is_norm(module: nn.Module) -> bool:
    """A LayerNorm or RMSNorm with a per-channel weight (a possible home for ``1 / s``)."""
    weight = getattr(module, "weight", None)
    norm = isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith("RMSNorm")
    return norm and isinstance(weight, torch.Tensor) and weight.dim() == 1


def _trace(model: nn.Module, layers: list[ScaledLayer], batch: Any, forward_fn: data_mod.ForwardFn | None
           ) -> tuple[list[_Group], list[torch.Tensor]]:
    """Groups of layers reading the same input tensor, each with the norm or Linear that produced it (if any);
    and the model's float outputs on ``batch``."""
    produced: dict[int, tuple[str, nn.Module]] = {}
    keep: list[torch.Tensor] = []  # outputs stay alive during the pass, so no id is reused
    inputs: dict[str, torch.Tensor] = {}
    by_module = {id(item.module): item for item in layers}

    def on_output(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if isinstance(out, torch.Tensor):
                keep.append(out)
                produced[id(out)] = (name, module)
        return hook

    def on_input(module: nn.Module, args: tuple[Any, ...]) -> None:
        item = by_module[id(module)]
        if args and isinstance(args[0], torch.Tensor) and item.name not in inputs:
            inputs[item.name] = args[0]

    handles = [m.register_forward_hook(on_output(n)) for n, m in model.named_modules()
               if is_norm(m) or isinstance(m, nn.Linear)]
    handles += [item.module.register_forward_pre_hook(on_input) for item in layers]
    try:
        with float_pass(model):
            outputs = [t.detach().clone() for _, t in _output_tensors(data_mod.run_batch(model, batch, forward_fn))]
    finally:
        for h in handles:
            h.remove()
    groups: dict[tuple[int, float | None, WeightSpec], _Group] = {}
    for item in layers:
        x = inputs.get(item.name)
        if x is None:
            continue  # never called: it keeps the method's plain rounding
        key = (id(x), item.smooth_alpha, item.spec)
        if key not in groups:
            groups[key] = _Group([], produced.get(id(x)))
        groups[key].layers.append(item)
    return list(groups.values()), outputs


def _collect(model: nn.Module, groups: list[_Group], data: Iterable[Any], forward_fn: data_mod.ForwardFn | None,
             max_batches: int | None) -> None:
    """Per-channel mean and max of |x| (and the Hessian, for AWQ) of each group's input, over the calibration data."""
    def observer(group: _Group):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            group.observe(args[0])
        return hook

    for group in groups:
        if group.layers[0].smooth_alpha is None:
            group.hessian = HessianObserver(group.layers[0].module.in_features,
                                            device=group.layers[0].module.weight.device)
    handles = [g.layers[0].module.register_forward_pre_hook(observer(g)) for g in groups]
    try:
        with float_pass(model):
            for batch in data_mod.iter_batches(data, max_batches, desc="scaling channels", progress=False):
                data_mod.run_batch(model, batch, forward_fn)
    finally:
        for h in handles:
            h.remove()
    if distributed_ready():  # every rank must choose the same scales: statistics over all ranks' data
        for group in groups:
            if group.abs_sum is None:
                raise CalibrationError(f"no calibration batch reached {[i.name for i in group.layers]} on this rank")
            dist.all_reduce(group.abs_sum)
            dist.all_reduce(group.abs_max, op=dist.ReduceOp.MAX)
            rows = torch.tensor(group.rows, device=group.abs_sum.device)
            dist.all_reduce(rows)
            group.rows = int(rows)
            if group.hessian is not None:
                group.hessian.sync()


def _rtn(spec: WeightSpec, w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``w`` rounded to nearest in ``spec`` with min/max ranges, dequantized to float32."""
    return spec.round_trip_minmax(w, group_size)


def _output_error(d: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``sum ||x d^T||^2`` over the calibration rows (mean), from ``H = mean x^T x``."""
    return ((d @ h) * d).sum()


def _candidates(abs_mean: torch.Tensor, grid: int) -> Iterator[torch.Tensor]:
    """AWQ's scale candidates ``mean|x|^t`` for ``t`` on the grid, each normalised to a geometric mean of 1 between
    its extremes; ``t = 0`` is ``s = 1``. (AutoAWQ's "duo" candidates ``mean|x|^t / mean|W|^(1 - t)`` were tried:
    a lower error on the calibration inputs, a lower end-to-end SQNR on held-out ones in tests/test_awq.py.)"""
    a = (abs_mean / abs_mean.max().clamp_min(1e-30)).clamp_min(1e-4)
    for i in range(grid):
        s = a.pow(i / grid)
        yield s / (s.max() * s.min()).sqrt()


def _gptq_error(item: ScaledLayer, w: torch.Tensor, s: torch.Tensor, h: torch.Tensor) -> float:
    """Output error of GPTQ (with the method's options) on the scaled weight ``w s``, for inputs ``x / s``."""
    stored = gptq_quantize(item.spec, w * s, h / (s[:, None] * s[None, :]), item.group_size,
                           **GPTQOptions.of(item.spec).rounding())
    deq = item.spec.dequantize(stored, w.shape[1], item.group_size, torch.float32)
    return float(_output_error(w - deq / s, h))


def _search_rows(item: ScaledLayer, w: torch.Tensor) -> torch.Tensor:
    """The rows of ``w`` the scale search scores (see :data:`SEARCH_ROWS`)."""
    if w.shape[0] <= SEARCH_ROWS or isinstance(item.spec.weight_granularity(item.group_size), PerTensor):
        return w
    return w[:: math.ceil(w.shape[0] / SEARCH_ROWS)]


def awq_scale(layers: list[ScaledLayer], hessian: torch.Tensor, abs_mean: torch.Tensor,
              grid: int = SCALE_GRID, gptq_shortlist: int = GPTQ_SHORTLIST) -> torch.Tensor:
    """AWQ's per-input-channel scale for layers sharing one input (``[K]``, float32; see the module docstring).

    Every candidate is scored by the output error of round-to-nearest on ``W s`` (on :data:`SEARCH_ROWS` rows of
    each layer); for ``method="awq+gptq"`` the ``gptq_shortlist`` best of them are then scored by the output error
    GPTQ itself leaves on those rows. ``s = 1`` is a candidate, so on the calibration inputs the result is never
    worse than no scaling with round-to-nearest; it is not added to GPTQ's shortlist when round-to-nearest does
    not rank it there (see :data:`GPTQ_SHORTLIST`)."""
    h = hessian.float()
    weights = [_search_rows(item, item.module.weight.detach().float()) for item in layers]
    scored = []
    for s in _candidates(abs_mean, grid):
        err = sum(float(_output_error(w - _rtn(item.spec, w * s, item.group_size) / s, h))
                  for w, item in zip(weights, layers))
        scored.append((err, len(scored), s))
    scored.sort(key=lambda t: (t[0], t[1]))
    if method_of(layers[0].spec).name != "awq+gptq":
        return scored[0][2]
    shortlist = [s for _, _, s in scored[:gptq_shortlist]]
    errors = [sum(_gptq_error(item, w, s, h) for w, item in zip(weights, layers)) for s in shortlist]
    return shortlist[min(range(len(shortlist)), key=errors.__getitem__)]


def smooth_scale(layers: list[ScaledLayer], abs_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's scale ``max|x_j|^alpha / max|W_j|^(1 - alpha)`` (``[K]``, float32), the weight maximum over
    all ``layers`` (they read the same input)."""
    w_max = torch.stack([item.module.weight.detach().abs().amax(0).float() for item in layers]).amax(0)
    s = abs_max.clamp_min(1e-5).pow(alpha) / w_max.clamp_min(1e-5).pow(1 - alpha)
    return s.clamp_min(1e-5)


def clip_weight(w: torch.Tensor, hessian: torch.Tensor, spec: WeightSpec, group_size: int | None,
                grid: int = CLIP_GRID) -> torch.Tensor:
    """AWQ's clipping search: ``w`` (``[N, K]``) with each group's range shrunk by the factor in
    ``1, 1 - 0.5/grid, ..., 0.5 + 0.5/grid`` that minimises that group's output error ``d H_gg d^T`` (``H_gg``: the
    group's diagonal block of the input Hessian), so that round-to-nearest with min/max ranges uses that clip."""
    n, k = w.shape
    g = group_size or k
    groups = k // g
    wg = w.float().reshape(n, groups, g)
    blocks = hessian.float().reshape(groups, g, groups, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    best_err = torch.full((n, groups), math.inf, device=w.device)
    best = wg.clone()
    for i in range(grid):
        r = 1 - 0.5 * i / grid
        clipped = torch.minimum(torch.maximum(wg, lo * r), hi * r)
        d = wg - _rtn(spec, clipped.reshape(n, k), group_size).reshape(n, groups, g)
        err = torch.einsum("ngi,gij,ngj->ng", d, blocks, d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better[..., None], clipped, best)
    return best.reshape(n, k)


def _relative_change(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    if len(before) != len(after) or any(a.shape != b.shape for a, b in zip(before, after)):
        return math.inf
    noise = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(after, before))
    signal = sum(float(b.double().pow(2).sum()) for b in before)
    return math.sqrt(noise / signal) if signal > 0 else (0.0 if noise == 0 else math.inf)


def _fold(group: _Group, saved: list[_Change]) -> None:
    """Divide the producer's output channels by ``s`` and multiply the layers' weight columns by it (in place,
    or by new parameters for inference tensors)."""
    s = group.scale
    _, producer = group.producer
    for name in ("weight", "bias"):
        tensor = getattr(producer, name, None)
        if isinstance(tensor, torch.Tensor):
            per_row = s if tensor.dim() == 1 else s[:, None]  # a Linear producer: its output rows
            _scale_parameter(producer, name, per_row, saved, divide=True)
    for item in group.layers:
        _scale_parameter(item.module, "weight", s, saved)


def _foldable(group: _Group) -> bool:
    if group.producer is None:
        return False
    producer = group.producer[1]
    k = group.scale.numel()
    weight = getattr(producer, "weight", None)
    rows = weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() in (1, 2) else None
    return rows == k


def scale_layers(model: nn.Module, layers: list[ScaledLayer], data: Iterable[Any],
                 forward_fn: data_mod.ForwardFn | None = None,
                 max_batches: int | None = data_mod.DEFAULT_MAX_BATCHES) -> Scaling:
    """Choose and apply the channel scales of ``layers`` (AWQ or SmoothQuant, see the module docstring).

    Folds ``1 / s`` into the op before each group where the model's output stays the same; for every layer
    returns, in the :class:`Scaling`, the float weight to quantize (``W s``, clipped for ``method="awq"``) and, if
    nothing absorbed its scales, the input scale ``1 / s`` its quantized layer must apply. The float model is
    changed only by the kept folds (undone by :meth:`Scaling.undo`)."""
    scaling = Scaling()
    if not layers:
        return scaling
    first = next(iter(data_mod.iter_batches(data, max_batches, progress=False)), None)
    if first is None:
        raise CalibrationError("calibration data yielded no batch; AWQ / SmoothQuant search channel scales on real "
                               "inputs: pass a non-empty DataLoader or list of batches")
    groups, reference = _trace(model, layers, first, forward_fn)
    _collect(model, groups, data, forward_fn, max_batches)
    try:
        for group in groups:
            lead = group.layers[0]
            if lead.smooth_alpha is not None:
                group.scale = smooth_scale(group.layers, group.abs_max, lead.smooth_alpha)
            else:
                group.scale = awq_scale(group.layers, group.hessian.hessian(), group.abs_sum / max(group.rows, 1))
        for group in groups:
            if not _foldable(group) or not reference:
                continue
            mark = len(scaling._saved)
            _fold(group, scaling._saved)
            with float_pass(model):
                after = [t for _, t in _output_tensors(data_mod.run_batch(model, first, forward_fn))]
            exact = torch.tensor(float(_relative_change(reference, after) <= FOLD_TOLERANCE))
            if distributed_ready():  # one decision for all ranks (each checked its own first batch)
                dist.all_reduce(exact, op=dist.ReduceOp.MIN)
            if exact.item() == 1.0:
                group.folded = True
            else:  # the produced tensor feeds something else too (a residual): undo this fold
                undone = scaling._saved[mark:]
                del scaling._saved[mark:]
                _restore(undone)
        for group in groups:
            _record(scaling, group)
    except BaseException:
        scaling.undo()
        raise
    scaling.groups = groups
    return scaling


def _record(scaling: Scaling, group: _Group) -> None:
    """The float source module of each layer (scaled, clipped) and its input scale when not folded."""
    s = group.scale
    h = None
    if any(item.clips for item in group.layers):
        h = group.hessian.hessian() / (s[:, None] * s[None, :])  # the Hessian of x / s
    for item in group.layers:
        w = item.module.weight.detach()
        scaled = w if group.folded else w * s.to(w.dtype)
        if item.clips:
            scaled = clip_weight(scaled, h, item.spec, item.group_size).to(w.dtype)
        if scaled is not w:
            twin = copy.copy(item.module)
            twin._parameters = dict(item.module._parameters)
            twin._parameters["weight"] = nn.Parameter(scaled, requires_grad=False)
            scaling.sources[item.name] = twin
        if not group.folded:
            scaling.input_scales[item.name] = (1 / s).float()
    group.hessian = None  # the Hessian can go


def scalable(model: nn.Module) -> set[int]:
    """ids of the ``nn.Linear`` modules in ``model`` whose weight no other module shares (tied weights cannot
    take one layer's column scales)."""
    count: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            count[id(p)] = count.get(id(p), 0) + 1
    return {id(m) for m in model.modules()
            if type(m) is nn.Linear and count.get(id(m.weight), 0) == 1}

