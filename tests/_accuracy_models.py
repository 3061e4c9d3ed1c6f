"""Small models for the accuracy tests: a well-behaved MLP and the same MLP with one fragile layer."""

from __future__ import annotations

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, fragile: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 256)
        self.fc3 = nn.Linear(256, 256)
        self.head = nn.Linear(256, 10)
        if fragile:
            make_fragile(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.head(torch.relu(self.fc3(x)))


def make_fragile(net: Net) -> None:
    """fc2 gets a huge weight (1000x the others) on an input that is always 0 (fc1's unit 0 is dead).

    The float model computes the same function as before; fc2's weight SQNR stays high (the outliers carry
    the energy), but every INT4 group / INT8 row holding one rounds its other weights to ~0, so fc2's output on
    real inputs is wrecked."""
    with torch.no_grad():
        net.fc1.weight[0].zero_()
        net.fc1.bias[0] = -1.0
        net.fc2.weight[:, 0] = 1000.0 * net.fc2.weight.std()


def batches(n: int = 4, size: int = 16, dim: int = 64, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, dim, generator=g) for _ in range(n)]
