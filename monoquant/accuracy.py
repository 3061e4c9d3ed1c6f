"""Everything about measuring what quantization cost, in one namespace (``mq.accuracy``).

The pieces live in modules with one job each: :mod:`monoquant.compare` (float-vs-quantized comparison),
:mod:`monoquant.thresholds` (floors and the warnings/errors they raise), :mod:`monoquant.measure` (measurement
inside ``quantize_`` and the ``target_sqnr`` search) and :mod:`monoquant.tuning` (per-layer sensitivity, which
calls ``quantize_``). This module only gathers their public names.
"""

from .compare import Comparison, OutputStats, Reference, batch_size, compare, evaluating, measure, record_outputs
from .measure import MEASURE_BATCHES
from .rules import exact_pattern
from .thresholds import ON_FAILURE, Thresholds, check, check_end_to_end
from .tuning import LayerSensitivity, rules_from_sensitivity, sensitivity

__all__ = ["MEASURE_BATCHES", "ON_FAILURE", "Comparison", "LayerSensitivity", "OutputStats", "Reference",
           "Thresholds", "batch_size", "check", "check_end_to_end", "compare", "evaluating", "exact_pattern",
           "measure", "record_outputs", "rules_from_sensitivity", "sensitivity"]
