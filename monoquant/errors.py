"""Errors raised by monoquant.

Every error is a :class:`MonoQuantError`; each message says what went wrong *and* what to do about it.
"""

from __future__ import annotations

from typing import Any


class MonoQuantError(Exception):
    """Base class of every error monoquant raises on purpose."""


class ConfigError(MonoQuantError, ValueError):
    """A quantization config or argument is invalid (bad bit width, group size, option name...)."""


class ModelError(MonoQuantError, TypeError):
    """The thing given as a model cannot be quantized as asked (not an ``nn.Module``, wrong layer type...)."""


class AlreadyQuantizedError(ModelError):
    """The model is already quantized where a float model is needed (``quantize_`` with nothing float left,
    ``sensitivity``); the message names ``mq.dequantize_``."""


class NonFiniteWeightError(MonoQuantError, ValueError):
    """A weight holds NaN or Inf values; the message names the layer."""


class InputError(MonoQuantError, TypeError):
    """A quantized layer got an input its float twin would refuse too (integer dtype, wrong feature size)."""


class InferenceOnlyError(MonoQuantError, RuntimeError):
    """A quantized module was asked for something only float modules can do (e.g. weight gradients)."""


class CalibrationError(MonoQuantError, RuntimeError):
    """Calibration could not produce quantization parameters (no data seen, NaN inputs...)."""


class SerializationError(MonoQuantError, ValueError):
    """A monoquant file or state dict cannot be written or read back; the message names the first problem."""


class AccuracyError(MonoQuantError):
    """Quantization hurt accuracy past the configured thresholds (raised when ``on_failure="raise"``).

    The full :class:`~monoquant.QuantReport` is attached as ``.report``.
    """

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report


class MissingExtraError(MonoQuantError, ImportError):
    """An optional feature needs a package that is not installed; the message names the ``pip install`` extra."""
