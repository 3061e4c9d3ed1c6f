"""Quantize an existing model in place and print what happened.

Run: python examples/quantize_existing_model.py
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import monoquant as mq


class Block(nn.Module):
    """A Hugging Face-style MLP block: plain nn.Linear inside a custom module."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def build_model(dim: int = 256, depth: int = 4, classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, dim), *[Block(dim) for _ in range(depth)], nn.Linear(dim, classes))


def main() -> None:
    model = build_model().eval()
    reference = copy.deepcopy(model)
    batches = [torch.randn(32, 64) for _ in range(4)]  # stand-in for a few batches of real inputs
    for name, spec in (("INT8", mq.Int8()), ("INT4-g128", mq.Int4(group_size=128))):
        quantized = copy.deepcopy(model)
        # with calibration_data the report also has each layer's output SQNR and the model-output comparison
        # skip_head=True keeps the output head float (no layer is named like one here, so the last nn.Linear)
        report = mq.quantize_(quantized, mq.QuantConfig(spec, skip=mq.SkipRules.defaults(skip_head=True)),
                              calibration_data=batches)
        print(f"\n== {name} ==")
        print(report)
        result = mq.compare(reference, quantized, [torch.randn(32, 64)])  # on data it did not see
        print(f"held-out batch: output SQNR {result.sqnr_db:.1f} dB, top-1 agreement {result.top1_agreement:.1%}")


if __name__ == "__main__":
    main()
