"""What a quantized number is: :class:`QType` and the granularity of its scales.

These are small frozen dataclasses with no behaviour beyond describing ranges; the formulas that use
them live in :mod:`monoquant.functional`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class QType:
    """An integer format: ``bits`` wide, ``signed`` or not, with ``symmetric`` (zero-point 0) or affine qparams.

    Symmetric formats are signed and use the range ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]`` for scales
    (``scale = absmax / qmax``); affine formats are unsigned ``[0, 2**bits - 1]`` with an integer zero-point.
    """

    bits: int
    symmetric: bool

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or self.bits not in (2, 3, 4, 5, 6, 7, 8):
            raise ConfigError(f"bits must be an integer from 2 to 8, got {self.bits!r}; use 8 or 4 for real kernels")

    @property
    def signed(self) -> bool:
        return self.symmetric

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def __str__(self) -> str:
        return f"int{self.bits}-{'sym' if self.symmetric else 'affine'}"


@dataclass(frozen=True)
class PerTensor:
    """One scale (and zero-point) for the whole tensor."""

    def __str__(self) -> str:
        return "per-tensor"


@dataclass(frozen=True)
class PerChannel:
    """One scale per slice along ``axis`` (axis 0 = output channels of a weight)."""

    axis: int = 0

    def __str__(self) -> str:
        return "per-channel"


@dataclass(frozen=True)
class PerGroup:
    """One scale per ``size`` consecutive values along the last (input) dimension of a 2-D tensor."""

    size: int

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size <= 0:
            raise ConfigError(f"group size must be a positive integer, got {self.size!r}; try 32, 64, 128 or 256")

    def __str__(self) -> str:
        return f"group-{self.size}"


Granularity = PerTensor | PerChannel | PerGroup
