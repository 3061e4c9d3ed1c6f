"""monoquant: a small PyTorch quantization library.

>>> import monoquant as mq
>>> report = mq.quantize_(model, mq.Int4(group_size=128))   # doctest: +SKIP
"""

from . import accuracy, formats, functional, schemes
from ._version import __version__
from .calibration import calibrate, calibrate_and_freeze, calibrate_with, freeze, needs_calibration, sync_observers
from .compare import Comparison, OutputStats, batch_size, compare, evaluating
from .config import SMOOTHQUANT_ALPHA, QuantConfig, as_config, spec_named
from .data import call_form, run_batch
from .errors import (
    AccuracyError,
    AlreadyQuantizedError,
    CalibrationError,
    ConfigError,
    InferenceOnlyError,
    InputError,
    MissingExtraError,
    ModelError,
    MonoQuantError,
    NonFiniteWeightError,
    SerializationError,
)
from .formats import (
    FORMATS,
    NF4,
    BFloat16,
    Float16,
    Int4,
    Int8,
    MethodConfig,
    WeightSpec,
    method_of,
    register_format,
    spec_from_dict,
    spec_to_dict,
)
from .gptq import HessianObserver
from .nn import (
    LAYERS,
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantEmbedding,
    QuantHFConv1D,
    QuantLinear,
    QuantModule,
    register_layer,
)
from .observers import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    NonFiniteInputWarning,
    Observer,
)
from .pipeline import quantize_pretrained
from .qtypes import PerChannel, PerGroup, PerTensor, QType
from .quantize import dequantize_, quantize_
from .report import AccuracyWarning, CalibrationPendingWarning, LayerReport, NothingQuantizedWarning, QuantReport
from .rules import SkipRules, exact_pattern
from .serialization import load, save
from .thresholds import Thresholds, check_end_to_end
from .tuning import LayerSensitivity, rules_from_sensitivity, sensitivity

__all__ = [
    # quantizing
    "QuantConfig", "quantize_", "dequantize_", "SkipRules", "as_config", "spec_named", "SMOOTHQUANT_ALPHA",
    # weight formats (see monoquant.formats; register_format adds one)
    "WeightSpec", "Int8", "Int4", "NF4", "Float16", "BFloat16", "FORMATS", "register_format", "spec_to_dict",
    "spec_from_dict", "MethodConfig", "method_of",
    # quantized layers (see monoquant.nn; register_layer adds one)
    "QuantModule", "QuantLinear", "QuantConv1d", "QuantConv2d", "QuantConv3d", "QuantEmbedding", "QuantHFConv1D",
    "LAYERS",
    "register_layer",
    # observers and calibration
    "Observer", "MinMaxObserver", "MovingAverageMinMaxObserver", "HistogramObserver", "MSEObserver",
    "HessianObserver", "NonFiniteInputWarning", "calibrate", "calibrate_and_freeze", "calibrate_with", "freeze",
    "needs_calibration", "sync_observers", "run_batch", "call_form",
    # measuring
    "compare", "Comparison", "OutputStats", "batch_size", "evaluating", "Thresholds", "check_end_to_end",
    "sensitivity", "LayerSensitivity", "rules_from_sensitivity", "exact_pattern", "QuantReport", "LayerReport",
    "AccuracyWarning", "NothingQuantizedWarning", "CalibrationPendingWarning",
    # files
    "save", "load", "quantize_pretrained",
    # qtypes
    "QType", "PerTensor", "PerChannel", "PerGroup",
    # errors
    "MonoQuantError", "ConfigError", "ModelError", "AlreadyQuantizedError", "InputError", "NonFiniteWeightError",
    "CalibrationError", "SerializationError", "AccuracyError", "InferenceOnlyError", "MissingExtraError",
    # modules
    "accuracy", "formats", "functional", "schemes", "__version__",
]
