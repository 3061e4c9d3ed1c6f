"""Float-vs-quantized comparison of the model output and of each quantized layer's output, summed over ranks.

Same definitions as :func:`monoquant.compare` and :func:`monoquant.quantize_` (and the same report fields):

* ``report.end_to_end``: ``sqnr_db`` = ``10 log10(sum(float^2) / sum((float - quant)^2))`` pooled over every
  floating-point tensor of every compared output (``inf`` when identical); ``top1_agreement``, the fraction of
  rows whose arg-max is the same, for classification-like outputs (a ``logits`` entry or a lone
  ``[batch, classes]`` tensor); ``batches`` and ``samples``;
* each quantized row's ``output_sqnr_db``: the quantized layer's output vs its float twin run on the very
  inputs the quantized model fed it (captured by a forward hook during the same pass).

Each rank accumulates its own batches; :meth:`OutputComparison.compute` packs every sum into one float64 tensor
and reduces it with ``trainer.strategy.reduce(..., reduce_op="sum")`` (one all-reduce under DDP), so every
rank gets the same numbers, computed *after* the observers were synchronised and frozen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from monoquant import OutputStats, batch_size
from monoquant import functional as F

Reduce = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over ranks (``lambda t: trainer.strategy.reduce(t, reduce_op="sum")``)."""

_FIELDS = ("signal", "noise", "agree", "total", "batches", "samples")


class OutputComparison:
    """Accumulates output statistics batch by batch, then reduces them over ranks.

    Args:
        layers: ``{name: (quantized layer, float twin)}`` whose output SQNR to measure (may be empty).
        device: where the reduction tensor lives (the strategy's root device: NCCL needs CUDA tensors).
    """

    def __init__(self, layers: Mapping[str, tuple[nn.Module, nn.Module]], device: torch.device) -> None:
        self.layers = dict(layers)
        self.device = device
        self.stats = OutputStats()
        self.powers = {name: [0.0, 0.0] for name in self.layers}

    @contextlib.contextmanager
    def watching_layers(self) -> Iterator[None]:
        """While open, every forward of a watched quantized layer also runs its float twin on the same inputs."""
        handles = [quant.register_forward_hook(self._hook(name, twin), with_kwargs=True, prepend=True)
                   for name, (quant, twin) in self.layers.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, name: str, twin: nn.Module) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            expected = twin.forward(*args, **kwargs)  # .forward: the user's hooks (shared with the twin) run once
            signal, noise = F.signal_noise_powers(expected, output)
            self.powers[name][0] += signal
            self.powers[name][1] += noise
        return hook

    def update(self, reference: Any, quantized: Any, batch: Any) -> None:
        """Add one batch: the float model's output, the quantized model's output, and the batch itself."""
        self.stats.add(reference, quantized, batch_size(batch))

    def compute(self, reduce: Reduce) -> tuple[dict[str, float], dict[str, float]]:
        """``(report.end_to_end entries, {layer: output SQNR dB})``, summed over ranks with ``reduce``.

        A collective under DDP: every rank must call it, with the same layers.
        """
        local = [float(getattr(self.stats, f)) for f in _FIELDS]
        local += [p for name in self.layers for p in self.powers[name]]
        sums = reduce(torch.tensor(local, dtype=torch.float64, device=self.device)).tolist()
        total = dict(zip(_FIELDS, sums))
        end_to_end = {"sqnr_db": F.sqnr_from_powers(total["signal"], total["noise"])}
        if self.stats.classify and total["total"]:
            end_to_end["top1_agreement"] = total["agree"] / total["total"]
        end_to_end["batches"], end_to_end["samples"] = total["batches"], total["samples"]
        layer_sums = sums[len(_FIELDS):]
        per_layer = {name: F.sqnr_from_powers(layer_sums[2 * i], layer_sums[2 * i + 1])
                     for i, name in enumerate(self.layers) if layer_sums[2 * i] or layer_sums[2 * i + 1]}
        return end_to_end, per_layer
