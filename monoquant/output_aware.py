"""Output-aware GPTQ rounding: small layers rounded against the error at the *model output*, not their own.

GPTQ minimises a layer's own output error ``||(W - W_q) X||^2``. For a layer with few weights that error is a poor
guide: what follows it (a LayerNorm, a readout) weighs its output channels very differently. With ``g`` the
gradient of a random projection of the model output with respect to the layer's output, a weight error ``E``
moves the model output by about ``tr(G E H E^T)`` in squared norm (``G = E[g^T g]``, ``H`` the input Hessian: the
Kronecker-factored approximation of K-FAC), so GPTQ runs once over all ``N K`` weights of the layer (flattened,
:func:`monoquant.gptq._gptq_flattened`) with the Hessian ``G (x) H``; a layer feeding a LayerNorm, for instance,
can then put its error where the norm removes it.

It is the GPTQ option ``output_aware`` (``mq.Int4(group_size=128, method="gptq", output_aware=True)``; the default,
:data:`monoquant.gptq.DEFAULT_OPTIONS`, was chosen on ``benchmarks/bench_accuracy.py``) of ``method="gptq"`` and
``"awq+gptq"`` alike, and applies to ``nn.Linear`` layers with a grouped format and at most
:data:`OUTPUT_AWARE_WEIGHTS` weights whose weight no other layer shares. On that benchmark's transformer stack it
takes the 16-input ``embed`` layer alone (everything else float) from 33.1 to 41.8 dB end to end (INT4-g128), while
that layer's own output SQNR drops. Cost: one float pass with gradients per calibration batch (only when such a
layer exists), an ``[N, N]`` Gram per layer, and at freeze its ``[N K, N K]`` Hessian (at most 64 MB).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import data as data_mod
from .compare import _output_tensors
from .observers import distributed_ready

OUTPUT_AWARE_WEIGHTS = 4096
"""Layers with at most this many weights (and a grouped format) are rounded against the model output's error: the
flattened Hessian has ``(N K)^2`` entries, 64 MB in float32 at 4096 weights (a 16-input projection into 256
channels), and GPTQ's factorisation holds a few copies: measured 393 MB of peak memory and 2.6 s on one core of an
AMD EPYC (Zen 4, shared) for a ``256 x 16`` layer."""
OUTPUT_PROBES = 2
"""Random projections of the model output per calibration batch that :func:`output_grams` backpropagates."""


def small_enough(module: nn.Module, group_size: int | None) -> bool:
    """Whether output-aware rounding can apply to ``module``: an ``nn.Linear`` with a grouped format
    (``group_size`` resolved, not ``None``) and at most :data:`OUTPUT_AWARE_WEIGHTS` weights."""
    return (isinstance(module, nn.Linear) and group_size is not None
            and module.weight.numel() <= OUTPUT_AWARE_WEIGHTS)


@contextlib.contextmanager
def float_pass(model: nn.Module, grad: bool = False) -> Iterator[None]:
    """Eval mode, no_grad (unless ``grad``), and PyTorch's fused transformer fast path off (it skips the Linear
    modules' calls)."""
    flags = [(m, m.training) for m in model.modules()]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        model.eval()
        with torch.set_grad_enabled(grad):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def _no_inference_tensors(model: nn.Module) -> Iterator[None]:
    """Parameters and buffers made under ``torch.inference_mode()`` replaced by ordinary copies meanwhile
    (autograd cannot save inference tensors for backward); the originals are put back afterwards."""
    replaced: list[tuple[dict[str, Any], str, torch.Tensor]] = []
    try:
        for module in model.modules():
            for table in (module._parameters, module._buffers):
                for name, tensor in table.items():
                    if isinstance(tensor, torch.Tensor) and tensor.is_inference():
                        replaced.append((table, name, tensor))
                        copy = tensor.clone()
                        table[name] = nn.Parameter(copy, requires_grad=False) if table is module._parameters else copy
        yield
    finally:
        for table, name, tensor in reversed(replaced):
            table[name] = tensor


class NoGradients(RuntimeError):
    """:func:`output_grams` could not backpropagate through the model (an op without a backward, inference
    tensors): the small layers are then rounded against their own output's error."""


def output_grams(model: nn.Module, layers: dict[str, nn.Linear], data: Iterable[Any],
                 forward_fn: data_mod.ForwardFn | None = None, max_batches: int | None = data_mod.DEFAULT_MAX_BATCHES,
                 probes: int = OUTPUT_PROBES, seed: int = 0) -> dict[str, torch.Tensor]:
    """``G = E[g^T g]`` (``[N, N]`` float32, the mean over the layer's output rows) of each layer in ``layers``
    (name -> module), where ``g`` is the gradient of ``<v, y>`` with respect to the layer's output, ``y`` every
    floating-point output of the model and ``v`` standard normal (``probes`` draws per calibration batch, seeded),
    so ``E[g^T g] = E[J^T J]`` for the Jacobian ``J`` from the layer's output to the model's. One float pass with
    gradients per batch; the model's parameters get no ``.grad`` (those made under ``torch.inference_mode()`` are
    copied for the pass: autograd cannot save inference tensors). A layer that is not called exactly once per
    batch, or whose output does not reach the model output, gets no entry (it keeps GPTQ against its own output).
    With ``torch.distributed`` initialised the sums are all-reduced. Raises :class:`NoGradients` when the model
    cannot backpropagate (errors of the data source pass through unchanged)."""
    by_module = {id(module): name for name, module in layers.items()}
    leaves: dict[str, list[torch.Tensor]] = {}

    def leaf(module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return None
        if not out.requires_grad:  # no graph above this layer (frozen weights): start one here
            out = out.detach().requires_grad_()
        leaves.setdefault(by_module[id(module)], []).append(out)
        return out

    sums = {name: torch.zeros(m.out_features, m.out_features, device=m.weight.device) for name, m in layers.items()}
    rows = dict.fromkeys(layers, 0)
    skipped: set[str] = set()
    gen = torch.Generator().manual_seed(seed)
    handles = [module.register_forward_hook(leaf) for module in layers.values()]
    try:
        with float_pass(model, grad=True), _no_inference_tensors(model):
            for batch in data_mod.iter_batches(data, max_batches, desc="output gradients", progress=False):
                leaves.clear()
                try:
                    outputs = [t for _, t in _output_tensors(data_mod.run_batch(model, batch, forward_fn))
                               if t.requires_grad]
                except RuntimeError as e:
                    raise NoGradients(str(e)) from e
                skipped.update(name for name in sums if len(leaves.get(name, ())) != 1)
                names = [name for name in sums if name not in skipped]
                if not outputs or not names:
                    continue
                for p in range(probes):
                    vs = [torch.randn(t.shape, generator=gen).to(t) for t in outputs]
                    try:
                        grads = torch.autograd.grad(outputs, [leaves[n][0] for n in names], vs,
                                                    retain_graph=p + 1 < probes, allow_unused=True)
                    except RuntimeError as e:
                        raise NoGradients(str(e)) from e
                    for name, g in zip(names, grads):
                        if g is None:
                            skipped.add(name)
                            continue
                        g2 = g.detach().reshape(-1, g.shape[-1]).float()
                        sums[name].addmm_(g2.t(), g2)
                        rows[name] += g2.shape[0]
    finally:
        for h in handles:
            h.remove()
    if distributed_ready():
        for name in sorted(sums):
            dist.all_reduce(sums[name])
            count = torch.tensor([rows[name], int(name in skipped)], device=sums[name].device)
            dist.all_reduce(count)
            rows[name] = int(count[0])
            if int(count[1]):
                skipped.add(name)
    return {name: sums[name] / rows[name] for name in sums
            if name not in skipped and rows[name] and float(sums[name].diagonal().sum()) > 0}


def collect(model: nn.Module, layers: dict[str, nn.Linear], data: Iterable[Any],
            forward_fn: data_mod.ForwardFn | None, max_batches: int | None) -> tuple[dict[str, torch.Tensor], str]:
    """:func:`output_grams` of ``layers`` and a report note saying how many got one (or why none did: a model
    without gradients keeps every layer's GPTQ on its own output)."""
    if not layers:
        return {}, ""
    try:
        grams = output_grams(model, layers, data, forward_fn, max_batches)
    except NoGradients as e:  # an op without a backward, inference tensors
        return {}, (f"output-aware GPTQ: no gradients through the model ({str(e).splitlines()[0]}): its "
                    f"{len(layers)} small layers are rounded against their own output's error")
    return grams, (f"output-aware GPTQ: {len(grams)} of {len(layers)} layers with at most {OUTPUT_AWARE_WEIGHTS} "
                   "weights rounded against the model output's error")
