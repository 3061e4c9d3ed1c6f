"""``QuantModule``: what every quantized layer shares.

A quantized layer holds its weight as buffers (``qweight``, ``scale``, ``zero_point``; see
:mod:`monoquant.formats` for dtypes and shapes) plus a float ``bias`` buffer, so ``.to()``,
``state_dict()``, ``copy.deepcopy`` and ``torch.save`` work with no extra code. No float copy of the
weight is kept: :meth:`dequantize_weight` rebuilds it on demand (the ``weight`` property does the same for
code that reads ``layer.weight`` directly, such as PyTorch's fused transformer fast path).

Quantized layers are for inference. They run under ``torch.no_grad()`` and ``torch.inference_mode()``
alike; an input that requires grad is supported (gradients flow to the input through the dequantize
path) but the quantized weights themselves never receive gradients: ``mq.dequantize_(model)`` first to
fine-tune.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from .. import call_plans
from .. import functional as F
from ..config import QuantConfig, as_config
from ..errors import ConfigError, InputError, NonFiniteWeightError
from ..formats import Int8, Stored, WeightSpec
from ..formats.kernel import QuantWeight
from ..im2col import ConvGeometry
from ..observers import Observer, apply_keeping_dtypes
from .registry import replaces

_OPTIONAL_BUFFERS = ("scale", "zero_point")
"""Buffers every layer has as attributes (``None`` where its format does not use them)."""


_FORGETS_CALL_PLANS = frozenset({"gptq", "input_quantizer", "calibration_tap"})
"""Setting these on a layer (calibration attaching a GPTQ state, an activation quantizer or its tap, freeze
detaching them) drops its call plans (:mod:`monoquant.call_plans`): a plan is for the state it was made in."""


class QuantModule(nn.Module):
    """Base of every quantized layer class (:class:`QuantLinear`, the ``QuantConv`` classes, ...).

    A subclass declares what it replaces and how, and registers itself with
    :func:`~monoquant.nn.registry.register_layer`:

    * ``float_module_type`` (or ``float_module_path``, a dotted class path for libraries monoquant does not
      import) and ``GEOMETRY``, the constructor arguments it shares with the float type besides ``bias``;
    * ``quantizes_inputs``: whether an activation format applies to its inputs (not for embeddings, whose
      inputs are indices);
    * ``kernel_family``: how its forward is computed (``"linear"``, ``"conv"``, ``"embedding"``), shown by
      :meth:`kernel_summary`;
    * ``config_field``: which :class:`~monoquant.QuantConfig` field names its weight format.

    and implements the contract the rest of monoquant relies on (nothing else checks layer types):

    * :meth:`float_weight` (float module -> its weight in the stored layout ``weight_shape``, ``[out, in, ...]``)
      and :meth:`float_layout` (the inverse: a stored-layout weight -> the float module's layout), which
      :attr:`weight` and :meth:`to_float` use;
    * :meth:`input_spec`: the input's feature count and dimension, checked by :meth:`prepare_input`;
    * ``forward`` starts with :meth:`prepare_input` (the one shared input-preparation step: refuse a bad input,
      apply the input transform, feed calibration observers), then computes with :meth:`compute_weight` (the
      pending GPTQ float weight or the dequantized one) or through :mod:`monoquant.kernels`, quantizing the input
      with :meth:`quantize_input` when it has no kernel that takes INT8 inputs;
    * ``supports_gptq`` and :meth:`gptq_geometry`: whether GPTQ can calibrate the layer and how its Hessian is
      built from the prepared input (``None``: rows of ``[..., K]``; a :class:`~monoquant.im2col.ConvGeometry`:
      convolution patches).
    """

    float_module_type: ClassVar[type[nn.Module] | None] = None
    float_module_path: ClassVar[str | None] = None
    GEOMETRY: ClassVar[tuple[str, ...]] = ()
    """Constructor arguments shared with the float module type, besides ``bias``."""
    quantizes_inputs: ClassVar[bool] = True
    kernel_family: ClassVar[str] = "linear"
    config_field: ClassVar[str] = "weights"
    """The :class:`~monoquant.QuantConfig` field holding this layer type's weight format; layers whose field is
    ``None`` (``embeddings`` by default) are not candidates for ``quantize_`` at all."""
    float_weight_ranks: ClassVar[tuple[int, ...]] = ()
    """Ranks of the float weights this class can stand for (``(2,)`` for linear layers); with
    :meth:`empty_for_weight`, what lets a checkpoint tool build it from a tensor shape alone."""
    rank_fallback: ClassVar[bool] = False
    """Whether ``monoquant quantize`` (which has no model to ask) takes this class for a weight of one of its
    ``float_weight_ranks`` that no ``--layer`` pattern names: the documented fallback (Linear for 2-D, the
    ``QuantConv`` classes for 3-5-D); the first registered such class per rank wins."""
    supports_gptq: ClassVar[bool] = True
    """Whether ``method="gptq"`` can calibrate this layer type (layers that cannot stay float, with the reason)."""
    compute_dtype: torch.dtype | None
    weight_shape: torch.Size

    def _init_quant(
        self,
        weight_shape: tuple[int, ...],
        spec: WeightSpec,
        *,
        bias: bool,
        group_size: int | None,
        compute_dtype: torch.dtype | None,
        device: Any,
        dtype: torch.dtype | None,
    ) -> None:
        if not isinstance(spec, WeightSpec):
            raise ConfigError(f"spec must be a weight format such as mq.Int8() or mq.Int4(), got {spec!r}")
        if group_size is not None and (type(group_size) is not int or group_size <= 0):
            raise ConfigError(f"{type(self).__name__}: group_size must be a positive integer or None, "
                              f"got {group_size!r}")
        self.weight_shape = torch.Size(weight_shape)
        group_size = self._resolve_group_size(spec, self.weight2d_shape[1], group_size)
        # the one object kernels read and record into: format, group size, buffers (read from this layer), caches
        self.quant_weight = QuantWeight(spec, group_size, self.weight2d_shape, self._buffers)
        self.compute_dtype = compute_dtype
        self.float_dtype = dtype or torch.get_default_dtype()
        # calibration state (monoquant.calibration.prepare): an ActivationQuantizer when the config quantizes
        # activations; a GPTQState while a method="gptq" weight waits for mq.freeze
        self.input_quantizer: nn.Module | None = None
        self.gptq: nn.Module | None = None
        n, k = self.weight2d_shape
        buffers = spec.empty_buffers(n, k, group_size, device)
        names = spec.buffer_names()
        for name in (*names, *(b for b in _OPTIONAL_BUFFERS if b not in names)):
            self.register_buffer(name, getattr(buffers, name, None))
        self.register_buffer("bias", torch.zeros(n, device=device, dtype=self.float_dtype) if bias else None)
        # per-input-channel multiplier applied to every input before anything else (AWQ / SmoothQuant scales that
        # no preceding op could absorb, see monoquant.awq); None for almost every layer
        self.register_buffer("input_scale", None)

    @staticmethod
    def _resolve_group_size(spec: WeightSpec, k: int, group_size: int | None) -> int | None:
        """The group size rows of ``k`` weights use in ``spec`` (``None`` for formats without groups)."""
        natural, reason = spec.resolve_group_size(k), spec.unfit_reason(k)
        if natural is None and reason is None:
            return None
        if group_size is None:
            if reason is not None:
                raise ConfigError(f"no {spec.kind.upper()} group size fits an input size of {k} (asked for "
                                  f"{spec.describe()}): {reason}, or use Int8()")
            return natural
        if k % group_size:
            raise ConfigError(f"group_size={group_size!r} must divide the input size {k} (try {natural or 'Int8()'})")
        return group_size

    # ---- shapes -------------------------------------------------------------------------------------
    @property
    def weight2d_shape(self) -> tuple[int, int]:
        """``(N, K)``: output channels and the flattened input size each one sees."""
        return self.weight_shape[0], int(torch.Size(self.weight_shape[1:]).numel())

    @property
    def stored(self) -> Stored:
        """The stored weight buffers (the format's ``stored_type``, as :meth:`WeightSpec.quantize` returns them)."""
        return self.quant_weight.stored  # read from _buffers, not through nn.Module's __getattr__ (3 us -> <1 us)

    # ---- the stored weight (format, group size, caches, what the kernels recorded) ------------------
    @property
    def spec(self) -> WeightSpec:
        """The weight format (``self.quant_weight.format``)."""
        return self.quant_weight.format

    @property
    def group_size(self) -> int | None:
        """The resolved group size (``self.quant_weight.group_size``; ``None`` for formats without groups)."""
        return self.quant_weight.group_size

    @property
    def computes_in_float(self) -> bool:
        """True while the layer waits for calibration (a GPTQ weight, or an activation quantizer not ready): its
        ``forward`` runs the float path, which is not what it runs once frozen."""
        modules = self._modules  # a submodule once set: read without nn.Module's __getattr__ (on every forward)
        act = modules.get("input_quantizer")
        return modules.get("gptq") is not None or (act is not None and not act.ready)

    @property
    def last_kernel(self) -> str | None:
        """The kernel the last ``forward`` ran (recorded in ``quant_weight``)."""
        return self.quant_weight.last_kernel

    @last_kernel.setter
    def last_kernel(self, name: str | None) -> None:
        self.quant_weight.last_kernel = name

    @property
    def _kernel_cache(self) -> dict:
        """What is derived from the buffers (``quant_weight.cache``: layouts, parameters, tuned choices)."""
        return self.quant_weight.cache

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def _check_float(cls, module: nn.Module, name: str) -> None:
        if not replaces(cls, module):
            expected = cls.float_module_path or cls.float_module_type.__name__
            raise ConfigError(f"{cls.__name__}.from_float expects {expected}, "
                              f"got {type(module).__name__}")
        weight = cls.float_weight(module)
        if weight.device.type == "meta":
            raise ConfigError(f"layer {name or '<module>'} is on the meta device: load real weights before "
                              "quantizing, or use mq.load(model, path) to load a quantized file")
        if not F.all_finite(weight):
            raise NonFiniteWeightError(
                f"layer {name or '<module>'} has NaN or Inf in its weight; fix the checkpoint or skip the layer "
                "with SkipRules(exclude=[...])"
            )

    @classmethod
    def empty_for_weight(cls, shape: tuple[int, ...], bias: bool, spec: WeightSpec, **kwargs: Any) -> QuantModule:
        """An empty layer (buffers of the right shapes) for a float weight of ``shape`` as the float module stores
        it, with default geometry otherwise (stride 1, no padding, one group); ``kwargs`` go to the constructor
        (``group_size``, ``device``, ``dtype``). For checkpoint tools that have tensors but no model."""
        raise NotImplementedError(f"{cls.__name__} cannot be built from a weight shape alone")

    @classmethod
    def stored_weight_shape(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The stored layout's shape (``weight_shape``) of a float weight of ``shape``: ``float_weight``'s shape."""
        return tuple(shape)

    @classmethod
    def float_weight(cls, module: nn.Module) -> torch.Tensor:
        """The weight of float ``module`` laid out as this class stores it (``[out, in, ...]``); a view, not a copy
        (layers whose float type stores it otherwise, such as transformers' ``Conv1D``, override this)."""
        return module.weight

    def _load_float_weight(self, weight: torch.Tensor, observer: Observer | None = None) -> None:
        """Quantize a float weight of shape ``weight_shape`` into this module's buffers."""
        stored = self.spec.quantize(weight.detach().reshape(self.weight2d_shape[0], -1), self.group_size, observer)
        self.set_stored(stored)

    def set_stored(self, stored: Stored) -> None:
        """Replace the stored buffers (same shapes and dtypes) and drop kernel caches."""
        with torch.no_grad():
            for name in self.spec.buffer_names():
                buf = getattr(self, name)
                if buf is not None:
                    buf.copy_(getattr(stored, name))
        self.quant_weight.clear_cache()

    @classmethod
    def _spec_of(cls, config: QuantConfig | WeightSpec | str) -> tuple[WeightSpec, torch.dtype | None]:
        """The format this class is built with: a bare spec (or format name) given to one layer class is that
        layer's format; a :class:`QuantConfig` gives it through the class's ``config_field``."""
        if not isinstance(config, QuantConfig):
            return as_config(config).weights, None
        cfg = config
        spec = getattr(cfg, cls.config_field)
        if spec is None:
            raise ConfigError(f"{cls.__name__} takes its format from QuantConfig({cls.config_field}=...), which is "
                              f"not set; pass e.g. QuantConfig(..., {cls.config_field}=mq.Int8())")
        return spec, cfg.compute_dtype

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        """Why float ``module`` cannot be replaced by this class (an option it cannot honour), else ``None``."""
        return None

    # ---- the input: one shared preparation step ------------------------------------------------------
    calibration_tap: Callable[[QuantModule, torch.Tensor], None] | None = None
    """Set by :mod:`monoquant.calibration` while it collects statistics: called by :meth:`prepare_input` with the
    prepared input (what the weight and the activation quantizer see)."""

    def input_spec(self) -> tuple[int | None, int]:
        """``(features, dim)``: the size the input must have along ``dim`` (``None``: not checked)."""
        return self.weight2d_shape[1], -1

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the layer does to its input before the stored weight applies: the input scale (layers with a
        stored input reordering, such as Hub act-order ``QuantLinear``, apply it first)."""
        return self.scale_input(x)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """The one input-preparation step every ``forward`` starts with: refuse an input the float layer would
        refuse (:meth:`check_input` with :meth:`input_spec`), apply :meth:`transform_input`, and while
        calibration runs hand the result to its observers (GPTQ Hessian, activation observer). A layer called
        with several inputs, or with its input as a keyword, is observed on the tensor its weight applies to."""
        features, dim = self.input_spec()
        self.check_input(x, features, dim)
        x = self.transform_input(x)
        if self.calibration_tap is not None:
            self.calibration_tap(self, x)
        return x

    def quantize_input(self, x: torch.Tensor, *, sample_dims: int | None = None) -> torch.Tensor:
        """``x`` through the layer's activation quantizer (quantized, then dequantized), for layers that compute in
        float: unchanged without one, or while it is still calibrating; a static one not frozen outside
        calibration raises. ``sample_dims``: dims of one sample (dynamic qparams per sample, an unbatched input
        being one sample); ``None``: per token (row of ``[-1, x.shape[-1]]``)."""
        act = self.input_quantizer
        if act is None or (not act.ready and act.calibrating):
            return x
        if sample_dims is None:
            return act.fake_quantize(x)
        unbatched = x.dim() == sample_dims
        x = act.fake_quantize(x.unsqueeze(0) if unbatched else x, per="sample")
        return x.squeeze(0) if unbatched else x

    def compute_weight(self, dtype: torch.dtype, kernel: str) -> torch.Tensor:
        """The weight ``forward`` computes with, in the stored layout and ``dtype``: the float one while a
        ``method="gptq"`` weight waits for :func:`monoquant.freeze`, else the dequantized one; records what ran
        (``"gptq_pending"``, else ``kernel``) in :attr:`last_kernel`."""
        pending = self.gptq is not None
        self.last_kernel = "gptq_pending" if pending else kernel
        return self.gptq.weight.to(dtype) if pending else self.dequantize_weight(dtype)

    def gptq_geometry(self) -> ConvGeometry | None:
        """How GPTQ builds this layer's Hessian from its prepared input: ``None`` for rows of ``[..., K]`` (linear
        layers); convolutions return their :class:`~monoquant.im2col.ConvGeometry` (patches)."""
        return None

    # ---- input scale -------------------------------------------------------------------------------
    def set_input_scale(self, scale: torch.Tensor | None) -> None:
        """Multiply every input by ``scale`` (``[K]``, float32, one per input channel) before the layer computes;
        ``None`` removes it. Kept as the ``input_scale`` buffer, so it is saved and loaded with the layer."""
        if scale is not None:
            k = self.weight2d_shape[1]
            if not self.supports_input_scale or scale.shape != (k,) or not scale.is_floating_point():
                raise ConfigError(f"{type(self).__name__}: an input scale must be a float tensor of shape [{k}] on a "
                                  f"layer that takes [..., {k}] inputs, got {tuple(scale.shape)}")
            scale = scale.detach().to(torch.float32)
        self.register_buffer("input_scale", scale)
        self.quant_weight.clear_cache()

    supports_input_scale: bool = False
    """Whether the layer's input is ``[..., K]`` so that a per-input-channel scale applies (linear layers)."""

    def scale_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` times the layer's input scale (``x`` itself when it has none): the first step of ``forward``."""
        scale = self._buffers["input_scale"]  # not self.input_scale: nn.Module's __getattr__ costs a small conv 1%
        return x if scale is None else x * scale.to(x.dtype)

    # ---- dequantization -----------------------------------------------------------------------------
    def dequantize_weight(self, dtype: torch.dtype | None = None, *, flat: bool = False,
                          rows: slice | None = None) -> torch.Tensor:
        """The float weight these buffers represent, in ``dtype`` (default: the original float dtype).

        ``flat=True`` returns the ``[N, K]`` view; ``rows`` selects output rows (used by chunked kernels).
        """
        dtype = dtype or self.float_dtype
        rows = rows or slice(None)
        n_rows = len(range(*rows.indices(self.weight2d_shape[0])))
        out = torch.empty(n_rows, self.weight2d_shape[1], dtype=dtype, device=self.qweight.device)
        w = self.dequantize_into(out, rows.start or 0)
        return w if flat else w.reshape(-1, *self.weight_shape[1:])

    def dequantize_into(self, out: torch.Tensor, row_start: int = 0, scratch: torch.Tensor | None = None,
                        *, scaled: bool = True) -> torch.Tensor:
        """Write output rows ``row_start : row_start + len(out)`` of the ``[N, K]`` weight into ``out``.

        ``out`` is a contiguous float tensor of shape ``[rows, K]``; ``scratch`` (optional, uint8, at least
        ``2 * rows * (K + 1)`` bytes) is reused for unpacking. The format's one dequantization
        (:meth:`WeightSpec.dequantize_into`, or its compiled twin :meth:`WeightSpec.compiled_dequantize_into`)
        does the work, with its parameters cached per dtype (:meth:`QuantWeight.dequantize_into`).
        ``scaled=False`` leaves out a per-row scale the caller applies to the matmul output instead
        (:meth:`output_scale`): ``x @ ((q - z) s)^T = (x @ (q - z)^T) s`` with ``rows`` times fewer multiplications.
        """
        return self.quant_weight.dequantize_into(out, row_start, scratch, scaled=scaled)

    def dequant_params(self, dtype: torch.dtype) -> tuple:
        """The format's dequantization parameters in ``dtype``, computed once per dtype and cached."""
        return self.quant_weight.dequant_params(dtype)

    def output_scale(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The per-output-row scale (``[N, 1]`` or scalar) in ``dtype`` that ``dequantize_into(..., scaled=False)``
        leaves out, or ``None`` when the format has none."""
        return self.quant_weight.output_scale(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized float weight, rebuilt on every access (for code that reads ``.weight`` directly), with the
        input scale (if any) folded in, so that ``x @ weight.T`` is what the layer computes.

        While a ``method="gptq"`` weight waits for :func:`monoquant.freeze` this is the float weight it computes with.
        """
        w = self.gptq.weight if self.gptq is not None else self.dequantize_weight()
        if self.input_scale is not None:  # the weight a float layer without the input scale computes with
            w = w * self.input_scale.to(w.dtype)
        return self.float_layout(w)

    def float_layout(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight in the stored layout (``weight_shape``) laid out as the float module stores it: the inverse of
        :meth:`float_weight` (the same tensor for layers whose float type stores ``[out, in, ...]``)."""
        return weight

    @classmethod
    def geometry_of(cls, module: nn.Module) -> dict[str, Any]:
        """Constructor arguments (other than ``bias``) that this class shares with its float module type,
        read from ``module`` (a float layer or a quantized one)."""
        return {name: getattr(module, name) for name in cls.GEOMETRY}

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        config: QuantConfig | WeightSpec | None = None,
        *,
        name: str = "",
        observer: Observer | None = None,
        group_size: int | None = None,
    ) -> QuantModule:
        """Quantize float ``module``'s weight with ``config``: a weight format or its name (this layer's format), or a
        full config (the format in its ``config_field``); default ``Int8()``.

        ``name`` is used in error messages; ``observer`` overrides the method's weight observer; ``group_size``
        overrides the INT4 group chosen by :meth:`Int4.resolve_group_size`.
        """
        cls._check_float(module, name)
        reason = cls.unsupported_reason(module)
        if reason is not None:
            raise ConfigError(f"layer {name or '<module>'}: {reason}")
        spec, compute_dtype = cls._spec_of(config or Int8())
        weight = cls.float_weight(module)
        q = cls(**cls.geometry_of(module), bias=getattr(module, "bias", None) is not None, spec=spec,
                group_size=group_size, compute_dtype=compute_dtype, device=weight.device, dtype=weight.dtype)
        q._load_float_weight(weight, observer)
        if getattr(module, "bias", None) is not None:
            q.bias.data.copy_(module.bias.detach())
        q.train(module.training)
        return q

    def make_float(self) -> nn.Module:
        """An empty float module of this layer's float type and geometry, on its device and float dtype."""
        return self.float_module_type(**self.geometry_of(self), bias=self.bias is not None,
                                      device=self.qweight.device, dtype=self.float_dtype)

    def to_float(self) -> nn.Module:
        """A plain float module (``nn.Linear``/``nn.Conv*``...) with the weight this layer computes with: the
        dequantized one, or the float one while a ``method="gptq"`` weight waits for :func:`monoquant.freeze`."""
        module = self.make_float()
        with torch.no_grad():
            module.weight.copy_(self.weight)  # `weight` is in the float module's layout (float_layout)
            if self.bias is not None:
                module.bias.copy_(self.bias)
        module.train(self.training)
        return module

    # ---- housekeeping -------------------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in _FORGETS_CALL_PLANS and "quant_weight" in self.__dict__:
            call_plans.forget(self)  # a plan is made for one calibration state: its checks assume that one

    def _apply(self, fn, recurse: bool = True):
        """``.to()``/``.cuda()``/``.half()``: move the stored weight but never change its dtype.

        The bias follows the model's dtype (and with it the output's compute dtype); integer codes and
        float32 scales keep theirs, so a ``model.half()`` cannot silently round the scales.
        """
        self.quant_weight.clear_cache()
        apply_keeping_dtypes(self, fn, recurse, names=self.spec.buffer_names())
        # the float dtype follows the conversion whether or not there is a bias to carry it
        self.float_dtype = fn(torch.empty(0, dtype=self.float_dtype)).dtype
        return self

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.quant_weight.clear_cache()
        super()._load_from_state_dict(*args, **kwargs)

    def storage_bytes(self) -> int:
        """Bytes of the buffers this layer keeps once calibrated: stored weight, bias, activation qparams.

        Calibration state (input observers, a pending GPTQ float weight and Hessian) is left out: it only
        lives until :func:`monoquant.freeze`, and counting it made a waiting layer look larger than float."""
        act = self.input_quantizer
        transient = [m for m in (self.gptq, getattr(act, "observer", None)) if m is not None]
        skip = {id(b) for m in transient for b in m.buffers()}
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=True) if id(b) not in skip)

    def scheme(self) -> str:
        """Short description of the stored format (``"int4-affine-g128"``)."""
        return self.spec.describe(self.group_size)

    def kernel_summary(self) -> str:
        """What the report shows as this layer's kernel (layer classes with a kernel table refine it)."""
        return self.last_kernel or self.kernel_family

    def check_input(self, x: object, features: int | None, dim: int = -1) -> None:
        """Refuse an input a float layer would refuse too, before any kernel reads it: not a floating-point
        tensor (integer inputs would be truncated silently by the low-bit kernels), or ``features`` (when given)
        not matching its size along ``dim``."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            what = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(f"{type(self).__name__} ({self.scheme()}) got a {what} input; quantized layers compute "
                             "in floating point like their float twins: convert the input, e.g. x.float()")
        if features is not None and (x.dim() == 0 or x.shape[dim] != features):
            raise InputError(f"{type(self).__name__} expects inputs with {features} features along dim {dim}, "
                             f"got shape {tuple(x.shape)}")

    def extra_repr(self) -> str:
        base = super().extra_repr()
        kernel = f", kernel={self.last_kernel}" if self.last_kernel else ""
        return f"{base}, scheme={self.scheme()}{kernel}"
