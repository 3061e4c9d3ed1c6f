"""What a weight format is: the :class:`WeightSpec` protocol every format implements, and the format registry.

A *format* owns everything about how a weight is stored: its buffers (names, dtypes, shapes), how a float weight
is quantized into them and dequantized back (one implementation, chunk-capable), what a file header stores about
it (and how that is validated on load), how it is recognised from a bare state dict, its default accuracy floors
and which low-bit kernels may run it. Everything else in monoquant asks the format instead of checking types.

A format is a frozen dataclass (hashable, comparable, safe to share between layers) registered by its ``kind``::

    @register_format
    @dataclass(frozen=True)
    class MyFormat(WeightSpec):
        kind: ClassVar[str] = "myformat"
        ...

The registered formats are listed in :data:`FORMATS`; ``formats/int8.py``, ``int4.py``, ``nf4.py`` and ``half.py``
are the built-in ones. A format's fields are what its bytes mean; a format that several methods can make also
carries how they are made, as one :class:`~monoquant.formats.method.MethodConfig` (its field ``method_config``,
see :func:`~monoquant.formats.method.method_options`). An ``observer`` given to a format belongs to that method
config and is a *prototype*: each layer gets its own deep copy (or a fresh instance when a factory is given).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch

from ..errors import ConfigError, SerializationError
from .method import (
    AWQ_METHODS,
    GPTQ_METHODS,
    METHODS,
    ROUND_TO_NEAREST,
    MethodConfig,
    check_method,
    method_options,
    take_method_options,
)

__all__ = ["AWQ_METHODS", "FORMATS", "GPTQ_METHODS", "METHODS", "MIN_FALLBACK_GROUP", "ROUND_TO_NEAREST",
           "SCALE_DTYPE", "GroupWise", "MethodConfig", "Stored", "StoredWeight", "WeightSpec", "check_method",
           "format_class", "method_of", "method_options", "register_format", "resolve_group_size",
           "spec_from_dict", "spec_to_dict", "take_method_options"]

if TYPE_CHECKING:
    from ..observers import Observer
    from .integer import IntegerFormat
    from .kernel import KernelCandidate

class StoredWeight(NamedTuple):
    """A quantized weight's buffers (the integer and half formats'); ``None`` for a buffer the format does not use."""

    qweight: torch.Tensor
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None


Stored = tuple
"""A format's stored weight: a ``NamedTuple`` of its buffers (:class:`StoredWeight` or the format's own
``stored_type``), whose field names are the layer's buffer names."""

SCALE_DTYPE = torch.float32
"""Stored dtype of every scale (exact enough that dequantized weights equal a float64 reference quantizer, and
cheap: 4 bytes per 128 weights at INT4-g128)."""

FORMATS: dict[str, type[WeightSpec]] = {}
"""Registered weight formats by ``kind`` (the name stored in file headers)."""


def register_format(cls: type[WeightSpec]) -> type[WeightSpec]:
    """Class decorator: make ``cls`` known by its ``kind`` to ``quantize_``, ``load``, the CLI and the report."""
    kind = getattr(cls, "kind", "")
    if not kind or not isinstance(kind, str):
        raise ConfigError(f"{cls.__name__} needs a class attribute kind = '<name>' to be registered")
    if kind in FORMATS and FORMATS[kind] is not cls:
        raise ConfigError(f"weight format {kind!r} is already registered by {FORMATS[kind].__name__}")
    FORMATS[kind] = cls
    return cls


@dataclass(frozen=True)
class WeightSpec:
    """Base class of all weight formats (see the module docstring). Subclasses set the class attributes and
    implement :meth:`empty_buffers`, :meth:`quantize`, :meth:`dequantize_into` and :meth:`infer`."""

    kind: ClassVar[str] = ""
    """Registry name, stored in file headers (``"int8"``, ``"int4"``, ``"nf4"``, ``"float16"``...)."""
    layout: ClassVar[str] = ""
    """Name of the stored layout, written to and checked in file headers."""
    bits: ClassVar[int] = 16
    """Bits per stored weight (orders formats from lowest to highest precision in reports)."""
    stored_type: ClassVar[type[tuple]] = StoredWeight
    """The ``NamedTuple`` of stored buffers; its fields are the buffers a layer of this format registers."""
    shared_buffers: ClassVar[tuple[str, ...]] = ()
    """Buffers that do not run over the output rows (kept whole by :meth:`take_rows`)."""
    thresholds: ClassVar[Mapping[str, float]] = {}
    """Default accuracy floors in dB: ``weight_sqnr_db``, ``output_sqnr_db`` and ``end_to_end_sqnr_db``."""
    supports_activations: ClassVar[bool] = False
    """Whether this format can also quantize a layer's inputs (``QuantConfig(activations=...)``)."""
    costly_at_model_ends: ClassVar[bool] = False
    """Whether ``Thresholds(int4_first_and_last=True)`` warns when the first and the last layers both use this
    format (a rule of thumb for the lowest-precision integer grid)."""
    method_option_names: ClassVar[tuple[str, ...]] = ()
    """The method options its constructor takes (``"observer"``, ``"method"``, ``"act_order"``...; set by
    :func:`~monoquant.formats.method.method_options`); empty for formats made one way only."""

    def __post_init__(self) -> None:
        if not type(self).kind:
            raise ConfigError(f"{type(self).__name__} is the abstract base of weight formats and stores nothing; "
                              "use mq.Int8(), mq.Int4(group_size=128), mq.NF4(), mq.Float16() or another format")
        missing = [m for m in REQUIRED_METHODS if getattr(type(self), m) is getattr(WeightSpec, m)]
        if missing:
            raise ConfigError(f"{type(self).__name__} (kind {type(self).kind!r}) does not implement "
                              f"{', '.join(missing)}: "
                              f"a weight format must define {', '.join(REQUIRED_METHODS)} (the README's 'Extending "
                              "monoquant' section shows a complete format)")

    # ---- naming --------------------------------------------------------------------------------------------
    def describe(self, group_size: int | None = None) -> str:
        """The scheme: this format's label with its resolved group size, shown in reports and headers
        (``"int4-affine-g128"``)."""
        return self.kind

    @classmethod
    def buffer_names(cls) -> tuple[str, ...]:
        """Names of the buffers a layer of this format holds (unused ones are ``None``)."""
        return cls.stored_type._fields

    # ---- shapes ----------------------------------------------------------------------------------------------
    def resolve_group_size(self, cols: int) -> int | None:
        """The group size used for rows of ``cols`` weights; ``None`` for formats without groups."""
        return None

    def unfit_reason(self, cols: int) -> str | None:
        """Why rows of ``cols`` weights cannot be stored in this format (``None``: they can)."""
        return None

    def empty_buffers(self, n: int, k: int, group_size: int | None, device: Any = None) -> Stored:
        """Buffers (right shapes and dtypes, unspecified values) for an ``[n, k]`` weight."""
        raise NotImplementedError

    # ---- conversions -----------------------------------------------------------------------------------------
    def make_observer(self) -> Observer:
        """A fresh weight observer: a copy of the method's ``observer`` prototype, or the method's default
        (:meth:`MethodConfig.make_observer`)."""
        return method_of(self).make_observer()

    def quantize(self, weight2d: torch.Tensor, group_size: int | None = None,
                 observer: Observer | None = None) -> Stored:
        """Round-to-nearest quantization of a float ``[N, K]`` weight into its stored buffers."""
        raise NotImplementedError

    def as_integer(self) -> IntegerFormat:
        """This format as an integer format with qparams (``ConfigError`` when it stores something else)."""
        raise ConfigError(f"{self.kind} weights are not stored as integer codes with qparams")

    def round_trip_minmax(self, w: torch.Tensor, group_size: int | None) -> torch.Tensor:
        """``w`` (``[N, K]``) rounded to nearest in this format with min/max ranges, dequantized to float32 (what
        AWQ's scale search compares; integer formats do it without storing codes)."""
        from ..observers import MinMaxObserver

        return self.dequantize(self.quantize(w, group_size, MinMaxObserver()), w.shape[1], group_size,
                               torch.float32)

    def dequant_params(self, stored: Stored, dtype: torch.dtype) -> tuple[torch.Tensor | None, ...]:
        """Per-row parameters :meth:`dequantize_into` needs, in ``dtype`` (layers cache them per dtype)."""
        return ()

    def dequantize_into(self, out: torch.Tensor, stored: Stored, row_start: int, params: tuple,
                        group_size: int | None, scratch: torch.Tensor | None = None, *,
                        scaled: bool = True) -> torch.Tensor:
        """Write rows ``row_start : row_start + len(out)`` of the float ``[N, K]`` weight into ``out``.

        The one dequantization of the format: whole weights, chunks of rows and every dtype go through it.
        ``params`` comes from :meth:`dequant_params` for ``out.dtype``; ``scratch`` is an optional reusable
        uint8 buffer; ``scaled=False`` may leave out a per-row scale (see :meth:`output_scale`)."""
        raise NotImplementedError

    def output_scale(self, params: tuple) -> torch.Tensor | None:
        """A per-output-row scale a caller may apply to the matmul output instead of the weight
        (``dequantize_into(..., scaled=False)``), or ``None`` when the format has none."""
        return None

    def take_rows(self, stored: Stored, index: torch.Tensor) -> Stored:
        """The stored weight of output rows ``index`` only (a gathered copy; lookups dequantize just those).

        Every buffer whose first dimension runs over the rows is gathered; scalars and the buffers named in
        ``shared_buffers`` (e.g. a codebook) are kept whole."""
        n = stored.qweight.shape[0]
        return type(stored)(*(t if t is None or t.dim() == 0 or name in self.shared_buffers or t.shape[0] != n
                              else t.index_select(0, index) for name, t in zip(stored._fields, stored)))

    def dequantize(self, stored: Stored, cols: int, group_size: int | None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float ``[N, K]`` weight in ``dtype`` (float64 gives the exact stored values)."""
        qweight = stored.qweight
        out = torch.empty(qweight.shape[0], cols, dtype=dtype, device=qweight.device)
        return self.dequantize_into(out, stored, 0, self.dequant_params(stored, dtype), group_size)

    def compiled_dequantize_into(self, out: torch.Tensor, stored: Stored, row_start: int,
                                 group_size: int | None, scaled: bool = True) -> torch.Tensor | None:
        """A faster (compiled) :meth:`dequantize_into` for this ``out`` with bit-identical results, or ``None``
        when the format has none for it (the default)."""
        return None

    # ---- accuracy ----------------------------------------------------------------------------------------------
    def promotion(self) -> WeightSpec | None:
        """The higher-precision format a layer moves to when this one misses an accuracy target
        (``quantize_(..., target_sqnr=...)`` tries it before float), or ``None``: straight to float."""
        return None

    # ---- kernels and GPTQ ------------------------------------------------------------------------------------
    def kernel_candidates(self) -> tuple[KernelCandidate, ...]:
        """The low-bit kernels that can run this format's stored layout, preferred first (see
        :mod:`monoquant.formats.kernel`); dequantize + matmul, which runs every format, is not listed."""
        return ()

    def conv_kernel_candidates(self) -> tuple[KernelCandidate, ...]:
        """The convolution kernels that can run this format's stored layout, preferred first: candidates whose
        ``run(weight, x, geometry, act, bias)`` takes the batched input ``[B, C, *spatial]``, the layer's
        :class:`~monoquant.im2col.ConvGeometry`, its activation quantizer and bias, and returns the finished
        ``[B, N, *out]`` output (see :mod:`monoquant.conv_kernels`); the dequantize + ``F.conv*`` paths, which
        run every format, are not listed."""
        return ()

    def kernels(self) -> tuple[str, ...]:
        """Names of :meth:`kernel_candidates`."""
        return tuple(c.name for c in self.kernel_candidates())

    @property
    def supports_gptq(self) -> bool:
        """Whether ``method="gptq"`` can produce this format (it needs a uniform integer grid: ``weight_qtype``,
        ``qparams`` and ``encode``, as :class:`~monoquant.formats.IntegerFormat` has)."""
        return False

    # ---- storage apart from method ---------------------------------------------------------------------------
    @classmethod
    def method_fields(cls) -> tuple[str, ...]:
        """The method options a file records (``method`` and the GPTQ options this format takes: its
        :attr:`method_option_names` but the observer); empty for formats made one way only."""
        return tuple(o for o in cls.method_option_names if o != "observer")

    @property
    def method_config(self) -> MethodConfig | None:
        """How weights of this spec are made (``None`` for formats made one way only; :func:`method_of` reads
        round to nearest for them). A format with method options holds it as a field."""
        return None

    def storage(self) -> WeightSpec:
        """This format with what its bytes mean only (made by the default method, round to nearest)."""
        return self.with_method(ROUND_TO_NEAREST) if self.method_option_names else self

    def with_method(self, method: MethodConfig) -> WeightSpec:
        """This format made by ``method`` (the public spelling ``Int4(method="gptq", ...)`` builds the same)."""
        names = set(self.method_fields())
        options = {"method": method.name, **{k: v for k, v in method.options().items() if v is not None}}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ConfigError(f"{type(self).__name__} has no method option(s) {unknown} (it takes {sorted(names)})")
        return dataclasses.replace(self, **{o: method.option(o) for o in self.method_option_names})

    # ---- files -----------------------------------------------------------------------------------------------
    @classmethod
    def _field_defaults(cls) -> dict[str, Any]:
        """The public spelling's fields with their defaults: the storage fields, then the method options."""
        storage = {f.name: f.default for f in dataclasses.fields(cls) if f.compare and f.name != "method_config"}
        return {**storage, **{o: ROUND_TO_NEAREST.option(o) for o in cls.method_fields()}}

    def to_dict(self) -> dict[str, Any]:
        """The format in its public spelling: the storage fields and the method options (observers are not
        written), so that ``type(spec)(**fields)`` rebuilds it. File headers keep the two apart:
        :meth:`storage_dict` and ``method_config.to_dict()``."""
        return {"kind": self.kind, **{name: getattr(self, name) for name in self._field_defaults()}}

    def storage_dict(self) -> dict[str, Any]:
        """What the stored bytes mean, as a file header's ``spec`` entry stores it: the kind and storage fields."""
        method = set(self.method_fields())
        return {k: v for k, v in self.to_dict().items() if k not in method}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "file header") -> WeightSpec:
        """Inverse of :meth:`to_dict` (also reads the method options 0.1 and 0.2 files kept in ``spec``),
        validating every field (``SerializationError`` names the bad one)."""
        fields = cls._field_defaults()
        values = {k: v for k, v in d.items() if k != "kind"}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise SerializationError(f"{where}: invalid {cls.kind} spec: unknown field(s) {unknown}; was the file "
                                     "written by a newer monoquant?")
        for name, value in values.items():
            default = fields[name]
            if default is not dataclasses.MISSING and default is not None and not _same_type(value, default):
                raise SerializationError(f"{where}: invalid {cls.kind} spec: field {name!r} must be a "
                                         f"{type(default).__name__}, got {value!r}")
        try:
            return cls(**values)
        except (TypeError, ValueError, ConfigError) as e:
            raise SerializationError(f"{where}: invalid {cls.kind} spec {dict(d)}: {e}") from e

    @classmethod
    def infer(cls, buffers: Mapping[str, torch.Tensor], cols: int) -> tuple[WeightSpec, int | None] | None:
        """``(spec, group_size)`` when a layer's state-dict ``buffers`` are this format's, else ``None``."""
        return None


MIN_FALLBACK_GROUP = 32
"""The smallest group :func:`resolve_group_size` falls back to when the asked-for size does not divide a row."""


REQUIRED_METHODS = ("empty_buffers", "quantize", "dequantize_into")
"""What every weight format must implement itself (the rest has working defaults)."""


def resolve_group_size(group_size: int, cols: int) -> int | None:
    """The group size for rows of ``cols`` weights when ``group_size`` was asked for:

    1. ``group_size`` if it divides the row; one group per row if the row is no longer;
    2. else the largest of ``group_size/2, /4, ...`` (down to :data:`MIN_FALLBACK_GROUP`, 32) that divides it:
       for a power-of-two request these are the sizes the packed low-bit kernels take;
    3. else the largest divisor of the row between ``group_size`` and 32 (e.g. 100 asked on a 256-wide row
       gives 64, 128 on a 250-wide row gives 125);
    4. else ``None`` (smaller groups cost more scale bytes than they save error): the layer stays float with a
       reason that lists the row's smaller divisors.
    """
    if cols % group_size == 0:
        return group_size
    if cols <= group_size:
        return cols
    g = group_size // 2
    while g >= MIN_FALLBACK_GROUP:
        if cols % g == 0:
            return g
        g //= 2
    return next((g for g in range(group_size - 1, MIN_FALLBACK_GROUP - 1, -1) if cols % g == 0), None)


class GroupWise:
    """Mixin of formats with one scale per ``group_size`` weights along the input dimension (INT4, NF4)."""

    group_size: int

    def resolve_group_size(self, cols: int) -> int | None:
        """The group size used for rows of length ``cols``, or ``None`` if no acceptable group exists
        (see :func:`resolve_group_size`)."""
        return resolve_group_size(self.group_size, cols)

    def unfit_reason(self, cols: int) -> str | None:
        if self.resolve_group_size(cols) is None:
            name = type(self).__name__
            divisors = [g for g in range(1, min(self.group_size, MIN_FALLBACK_GROUP)) if cols % g == 0]
            if self.group_size <= MIN_FALLBACK_GROUP:
                return (f"{self.kind.upper()} group size {self.group_size} does not divide input size {cols}; pass "
                        f"{name}(group_size=...) with a divisor of {cols} (e.g. {divisors[-1]})")
            return (f"input size {cols} has no divisor between {MIN_FALLBACK_GROUP} and {self.group_size} to use as "
                    f"the {self.kind.upper()} group size (its divisors below {MIN_FALLBACK_GROUP}: {divisors}); pass "
                    f"{name}(group_size=...) with a divisor of {cols}")
        return None


def _same_type(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and (isinstance(default, float) or isinstance(value, int))
    return isinstance(value, type(default))


def method_of(spec: WeightSpec) -> MethodConfig:
    """How ``spec``'s weights are made: its ``method_config``, or round to nearest for a format made one way only
    (NF4, the half formats)."""
    method = spec.method_config
    return ROUND_TO_NEAREST if method is None else method


def format_class(kind: object, where: str = "file header") -> type[WeightSpec]:
    """The registered format class for ``kind`` (``SerializationError`` when there is none)."""
    cls = FORMATS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise SerializationError(f"{where}: unknown weight spec kind {kind!r} (known: {sorted(FORMATS)}); import the "
                                 "module that registers it first (command line: monoquant --plugin MODULE ...), or "
                                 "the file was written by a newer monoquant")
    return cls


def spec_to_dict(spec: WeightSpec) -> dict[str, Any]:
    """The header form of ``spec`` (see :meth:`WeightSpec.to_dict`)."""
    return spec.to_dict()


def spec_from_dict(d: object, where: str = "file header") -> WeightSpec:
    """Rebuild a format from its header form, validated by its format (``SerializationError`` otherwise)."""
    if not isinstance(d, Mapping):
        raise SerializationError(f"{where}: a weight format must be a JSON object, got {d!r}")
    return format_class(d.get("kind"), where).from_dict(d, where)
