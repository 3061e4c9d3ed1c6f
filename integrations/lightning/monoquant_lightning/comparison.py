"""End-to-end comparison of float and quantized outputs with torchmetrics (synchronised across ranks).

* ``output_sqnr_db``: ``10 log10(sum(float^2) / sum((float - quant)^2))`` over every output element of every
  compared batch (``inf`` when the outputs are identical);
* ``top1_agreement``: the fraction of rows whose arg-max over the last dimension is the same (only for
  outputs with at least 2 dimensions and 2 classes, i.e. logits).

Under DDP, torchmetrics sums the statistics of all ranks in ``compute()``, so every rank gets the same numbers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torchmetrics import SumMetric
from torchmetrics.classification import MulticlassAccuracy

from monoquant.errors import ConfigError


def first_tensor(output: Any) -> torch.Tensor:
    """The tensor to compare in a model output: the output itself, ``output["logits"]``, or its first tensor."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        if isinstance(output.get("logits"), torch.Tensor):
            return output["logits"]
        values = list(output.values())
    elif isinstance(output, (list, tuple)):
        values = list(output)
    else:
        values = []
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise ConfigError(f"cannot compare model outputs of type {type(output).__name__}: pass "
                      "forward_fn=lambda module, batch: ... returning a tensor (e.g. the logits)")


class OutputComparison:
    """Accumulates float-vs-quantized output statistics batch by batch."""

    def __init__(self, device: torch.device) -> None:
        self.signal = SumMetric().to(device)
        self.noise = SumMetric().to(device)
        self.agreement: MulticlassAccuracy | None = None
        self.device = device

    def update(self, reference: torch.Tensor, quantized: torch.Tensor) -> None:
        ref, q = reference.detach().double(), quantized.detach().double()
        self.signal.update(ref.square().sum())
        self.noise.update((ref - q).square().sum())
        if ref.dim() >= 2 and ref.shape[-1] >= 2:
            if self.agreement is None:
                self.agreement = MulticlassAccuracy(num_classes=ref.shape[-1], average="micro").to(self.device)
            classes = ref.shape[-1]
            self.agreement.update(q.reshape(-1, classes), ref.reshape(-1, classes).argmax(-1))

    def compute(self) -> dict[str, float]:
        signal, noise = float(self.signal.compute()), float(self.noise.compute())
        if noise == 0:
            sqnr = math.inf
        elif signal == 0:
            sqnr = -math.inf
        else:
            sqnr = 10 * math.log10(signal / noise)
        result = {"output_sqnr_db": sqnr}
        if self.agreement is not None:
            result["top1_agreement"] = float(self.agreement.compute())
        return result
