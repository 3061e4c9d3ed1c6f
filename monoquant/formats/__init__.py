"""Weight formats, one file per family, registered by ``kind`` (see :mod:`monoquant.formats.base`)."""

from .base import (
           FORMATS,
           SCALE_DTYPE,
           MethodConfig,
           Stored,
           StoredWeight,
           WeightSpec,
           format_class,
           method_of,
           register_format,
           spec_from_dict,
           spec_to_dict,
)
from .half import BFloat16, Float16, HalfFormat
from .int4 import KERNEL_GROUP_SIZES, Int4
from .int8 import Int8
from .integer import IntegerFormat
from .nf4 import NF4, NF4_VALUES, NF4Weight

__all__ = ["FORMATS", "NF4", "NF4_VALUES", "SCALE_DTYPE", "BFloat16", "Float16", "HalfFormat", "Int4", "Int8",
           "IntegerFormat", "KERNEL_GROUP_SIZES", "MethodConfig", "NF4Weight", "Stored", "StoredWeight", "WeightSpec",
           "format_class", "method_of", "register_format", "spec_from_dict", "spec_to_dict"]
