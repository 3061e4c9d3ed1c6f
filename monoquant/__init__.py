"""monoquant: a small PyTorch quantization library.

>>> import monoquant as mq
>>> report = mq.quantize_(model, mq.Int4(group_size=128))   # doctest: +SKIP
"""

from . import accuracy, functional
from .accuracy import Comparison, LayerSensitivity, Thresholds, compare, sensitivity
from .calibration import calibrate, calibrate_with, freeze, needs_calibration, sync_observers
from .config import BFloat16, Float16, Int4, Int8, QuantConfig, WeightSpec
from .errors import (
    AccuracyError,
    CalibrationError,
    ConfigError,
    InferenceOnlyError,
    ModelError,
    MonoQuantError,
    NonFiniteWeightError,
    SerializationError,
)
from .gptq import HessianObserver
from .nn import QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear, QuantModule
from .observers import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    NonFiniteInputWarning,
    Observer,
)
from .qtypes import PerChannel, PerGroup, PerTensor, QType
from .quantize import dequantize_, quantize_
from .report import AccuracyWarning, LayerReport, NothingQuantizedWarning, QuantReport
from .rules import SkipRules
from .serialization import load, save

__version__ = "0.1.0"

__all__ = [
    "AccuracyError", "AccuracyWarning", "BFloat16", "CalibrationError", "Comparison", "ConfigError", "Float16",
    "InferenceOnlyError", "Int4", "Int8", "LayerReport", "LayerSensitivity", "MinMaxObserver", "ModelError",
    "MonoQuantError", "NonFiniteWeightError", "NothingQuantizedWarning", "Observer", "PerChannel", "PerGroup",
    "PerTensor", "QType", "QuantConfig", "QuantConv1d", "QuantConv2d", "QuantConv3d", "QuantLinear", "QuantModule",
    "QuantReport", "SerializationError", "SkipRules", "Thresholds", "WeightSpec", "accuracy", "compare",
    "dequantize_", "functional", "load", "quantize_", "save", "sensitivity",
    "HessianObserver", "HistogramObserver", "MSEObserver", "MovingAverageMinMaxObserver", "NonFiniteInputWarning",
    "calibrate", "calibrate_with", "freeze", "needs_calibration", "sync_observers",
]
