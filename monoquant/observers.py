"""Observers: modules that collect statistics and turn them into scales and zero-points.

Protocol: ``forward(x)`` updates statistics held in buffers and returns ``x`` unchanged;
``calculate_qparams(qtype, granularity)`` returns ``(scale, zero_point)`` (float64, int64);
``reset()`` forgets everything. The framework calls ``configure(qtype, granularity)`` before the first
``forward`` so that the observer knows how to reduce what it sees.
"""

from __future__ import annotations

import torch
from torch import nn

from . import functional as F
from .errors import CalibrationError, ConfigError
from .qtypes import PerChannel, PerGroup, PerTensor, QType


class Observer(nn.Module):
    """Base class. Subclasses implement :meth:`_observe` and :meth:`_qparams`; buffers hold all state."""

    def __init__(self) -> None:
        super().__init__()
        self.qtype: QType | None = None
        self.granularity: PerTensor | PerChannel | PerGroup = PerTensor()
        self.register_buffer("seen", torch.tensor(False))

    def configure(self, qtype: QType, granularity: PerTensor | PerChannel | PerGroup | None = None) -> Observer:
        """Fix the target format and the granularity of statistics; returns ``self``."""
        self.qtype = qtype
        self.granularity = granularity or PerTensor()
        return self

    @property
    def has_seen_data(self) -> bool:
        return bool(self.seen)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel():
            self._observe(x.detach())
            self.seen.fill_(True)
        return x

    def calculate_qparams(
        self, qtype: QType | None = None, granularity: PerTensor | PerChannel | PerGroup | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero-point for what was observed, in the configured (or given) format."""
        qtype = qtype or self.qtype
        if qtype is None:
            raise ConfigError(f"{type(self).__name__} has no qtype: call configure(qtype, granularity) first")
        if granularity is not None and granularity != self.granularity:
            raise ConfigError(
                f"{type(self).__name__} collected {self.granularity} statistics, cannot give {granularity} qparams"
            )
        if not self.has_seen_data:
            raise CalibrationError(f"{type(self).__name__} has seen no data: run calibration batches first")
        return self._qparams(qtype)

    def reset(self) -> None:
        self.seen.fill_(False)

    def _observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def _qparams(self, qtype: QType) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class MinMaxObserver(Observer):
    """Running minimum and maximum (per tensor, channel or group as configured)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    def _observe(self, x: torch.Tensor) -> None:
        if isinstance(self.granularity, PerTensor):
            mn, mx = torch.aminmax(x.float())
        else:
            mn, mx = F.minmax(x.float(), self.granularity)
        if not self.has_seen_data or self.min_val.shape != mn.shape:
            self.min_val = mn.clone()
            self.max_val = mx.clone()
        else:
            torch.minimum(self.min_val, mn, out=self.min_val)
            torch.maximum(self.max_val, mx, out=self.max_val)

    def _qparams(self, qtype: QType) -> tuple[torch.Tensor, torch.Tensor]:
        return F.qparams_from_minmax(self.min_val, self.max_val, qtype)

    def reset(self) -> None:
        super().reset()
        self.min_val = torch.tensor(float("inf"), device=self.min_val.device)
        self.max_val = torch.tensor(float("-inf"), device=self.max_val.device)
