"""End-to-end comparison of float and quantized outputs with torchmetrics (synchronised across ranks).

Same definitions as :func:`monoquant.compare` (and the same ``report.end_to_end`` keys):

* ``sqnr_db``: ``10 log10(sum(float^2) / sum((float - quant)^2))`` pooled over every floating-point tensor
  of every compared output (``inf`` when they are identical);
* ``top1_agreement``: the fraction of rows whose arg-max is the same, for classification-like outputs (a
  ``logits`` entry or a lone ``[batch, classes]`` tensor); absent otherwise;
* ``batches``, ``samples``: how much was compared.

The sums are torchmetrics ``SumMetric`` states, so under DDP ``compute()`` adds up every rank's batches and
all ranks get the same numbers.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import SumMetric

from monoquant import functional as F
from monoquant.accuracy import _logits, _output_tensors, batch_size
from monoquant.errors import ModelError


class OutputComparison:
    """Accumulates float-vs-quantized output statistics batch by batch."""

    def __init__(self, device: torch.device) -> None:
        def total() -> SumMetric:
            return SumMetric().set_dtype(torch.float64).to(device)

        self.signal, self.noise, self.agree, self.rows = total(), total(), total(), total()
        self.batches, self.samples = total(), total()
        self.classify = True

    def update(self, reference: Any, quantized: Any, batch: Any) -> None:
        """Add one batch: the float model's output, the quantized model's output, and the batch itself."""
        ref, approx = _output_tensors(reference), _output_tensors(quantized)
        if [(p, t.shape) for p, t in ref] != [(p, t.shape) for p, t in approx] or not ref:
            raise ModelError("the float and quantized models returned outputs of different structure or shape "
                             "(or no floating-point tensor); pass forward_fn=lambda module, batch: ... returning "
                             "the output tensor to compare")
        for (_, r), (_, a) in zip(ref, approx):
            signal, noise = F.signal_noise_powers(r, a)
            self.signal.update(signal)
            self.noise.update(noise)
        lr, la = _logits(ref), _logits(approx)
        if lr is None or la is None:
            self.classify = False
        else:
            agree, rows = F.top1_matches(lr, la)
            self.agree.update(agree)
            self.rows.update(rows)
        self.batches.update(1)
        self.samples.update(batch_size(batch))

    def compute(self) -> dict[str, float]:
        """The ``report.end_to_end`` entries (a collective under DDP: every rank must call it)."""
        result = {"sqnr_db": F.sqnr_from_powers(self.signal.compute(), self.noise.compute())}
        if self.classify:
            agree, rows = float(self.agree.compute()), float(self.rows.compute())
            if rows:
                result["top1_agreement"] = agree / rows
        result["batches"] = float(self.batches.compute())
        result["samples"] = float(self.samples.compute())
        return result
