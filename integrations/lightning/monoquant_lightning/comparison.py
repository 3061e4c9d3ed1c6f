"""End-to-end comparison of float and quantized outputs with torchmetrics (synchronised across ranks).

Same definitions as :func:`monoquant.compare` (and the same ``report.end_to_end`` keys):

* ``sqnr_db``: ``10 log10(sum(float^2) / sum((float - quant)^2))`` pooled over every floating-point tensor
  of every compared output (``inf`` when they are identical);
* ``top1_agreement``: the fraction of rows whose arg-max is the same, for classification-like outputs (a
  ``logits`` entry or a lone ``[batch, classes]`` tensor); absent otherwise;
* ``batches``, ``samples``: how much was compared.

Each rank accumulates its batches with :mod:`monoquant.accuracy`'s accumulator; ``compute()`` reduces the
sums with torchmetrics ``SumMetric`` (an all-reduce under DDP), so every rank gets the same numbers.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import SumMetric

from monoquant import functional as F
from monoquant.accuracy import OutputStats, batch_size


class OutputComparison:
    """Accumulates float-vs-quantized output statistics batch by batch (:mod:`monoquant.accuracy`'s
    accumulator), then reduces them over ranks with torchmetrics."""

    FIELDS = ("signal", "noise", "agree", "total", "batches", "samples")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stats = OutputStats()

    def update(self, reference: Any, quantized: Any, batch: Any) -> None:
        """Add one batch: the float model's output, the quantized model's output, and the batch itself."""
        self.stats.add(reference, quantized, batch_size(batch))

    def compute(self) -> dict[str, float]:
        """The ``report.end_to_end`` entries (a collective under DDP: every rank must call it)."""
        sums = {}
        for name in self.FIELDS:
            metric = SumMetric().set_dtype(torch.float64).to(self.device)
            metric.update(float(getattr(self.stats, name)))
            sums[name] = float(metric.compute())
        result = {"sqnr_db": F.sqnr_from_powers(sums["signal"], sums["noise"])}
        if self.stats.classify and sums["total"]:
            result["top1_agreement"] = sums["agree"] / sums["total"]
        result["batches"], result["samples"] = sums["batches"], sums["samples"]
        return result
