"""``QuantModule``: what every quantized layer shares.

A quantized layer holds its weight as buffers (``qweight``, ``scale``, ``zero_point``; see
:mod:`monoquant.schemes` for dtypes and shapes) plus a float ``bias`` buffer, so ``.to()``,
``state_dict()``, ``copy.deepcopy`` and ``torch.save`` work with no extra code. No float copy of the
weight is kept: :meth:`dequantize_weight` rebuilds it on demand (the ``weight`` property does the same for
code that reads ``layer.weight`` directly, such as PyTorch's fused transformer fast path).

Quantized layers are for inference. They run under ``torch.no_grad()`` and ``torch.inference_mode()``
alike; an input that requires grad is supported (gradients flow to the input through the dequantize
path) but the quantized weights themselves never receive gradients: ``mq.dequantize_(model)`` first to
fine-tune.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import schemes
from ..config import Int4, QuantConfig, WeightSpec, as_config
from ..errors import ConfigError, NonFiniteWeightError
from ..observers import Observer
from ..packing import unpack_int4


class QuantModule(nn.Module):
    """Mixin base of :class:`QuantLinear` and the ``QuantConv`` classes."""

    float_module_type: type[nn.Module]
    spec: WeightSpec
    group_size: int | None
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
            raise ConfigError(f"spec must be a weight spec such as mq.Int8() or mq.Int4(), got {spec!r}")
        self.spec = spec
        self.weight_shape = torch.Size(weight_shape)
        n, k = self.weight2d_shape
        if isinstance(spec, Int4):
            group_size = group_size or spec.resolve_group_size(k)
            if group_size is None or k % group_size:
                raise ConfigError(
                    f"no INT4 group size fits in_features={k} (asked for {spec.group_size}); "
                    "pass a group_size that divides it"
                )
        else:
            group_size = None
        self.group_size = group_size
        self.compute_dtype = compute_dtype
        self.float_dtype = dtype or torch.get_default_dtype()
        self.last_kernel: str | None = None
        self._kernel_cache: dict[str, Any] = {}
        for name, tensor in self._empty_buffers(device).items():
            self.register_buffer(name, tensor)
        self.register_buffer("bias", torch.zeros(n, device=device, dtype=self.float_dtype) if bias else None)

    # ---- shapes -------------------------------------------------------------------------------------
    @property
    def weight2d_shape(self) -> tuple[int, int]:
        """``(N, K)``: output channels and the flattened input size each one sees."""
        return self.weight_shape[0], int(torch.Size(self.weight_shape[1:]).numel())

    def _empty_buffers(self, device: Any) -> dict[str, torch.Tensor | None]:
        n, k = self.weight2d_shape
        spec = self.spec
        if spec.kind in ("float16", "bfloat16"):
            return {"qweight": torch.empty(n, k, dtype=spec.storage_dtype, device=device),
                    "scale": None, "zero_point": None}
        symmetric = spec.weight_qtype().symmetric
        if isinstance(spec, Int4):
            qshape, qdtype, pshape = (n, (k + 1) // 2), torch.uint8, (n, k // self.group_size)
        else:
            qshape, qdtype = (n, k), (torch.int8 if symmetric else torch.uint8)
            pshape = (n,) if spec.granularity == "channel" else ()
        return {
            "qweight": torch.empty(qshape, dtype=qdtype, device=device),
            "scale": torch.ones(pshape, dtype=schemes.SCALE_DTYPE, device=device),
            "zero_point": None if symmetric else torch.zeros(pshape, dtype=torch.uint8, device=device),
        }

    @property
    def stored(self) -> schemes.StoredWeight:
        return schemes.StoredWeight(self.qweight, self.scale, self.zero_point)

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def _check_float(cls, module: nn.Module, name: str) -> None:
        if not isinstance(module, cls.float_module_type):
            raise ConfigError(f"{cls.__name__}.from_float expects {cls.float_module_type.__name__}, "
                              f"got {type(module).__name__}")
        weight = module.weight
        if weight.device.type == "meta":
            raise ConfigError(f"layer {name or '<module>'} is on the meta device: load real weights before "
                              "quantizing, or use mq.load(model, path) to load a quantized file")
        if not torch.isfinite(weight).all():
            raise NonFiniteWeightError(
                f"layer {name or '<module>'} has NaN or Inf in its weight; fix the checkpoint or skip the layer "
                "with SkipRules(exclude=[...])"
            )

    def _load_float_weight(self, weight: torch.Tensor, observer: Observer | None = None) -> None:
        """Quantize a float weight of shape ``weight_shape`` into this module's buffers."""
        stored = schemes.quantize_weight(self.spec, weight.detach().reshape(self.weight2d_shape[0], -1),
                                         self.group_size, observer)
        self.set_stored(stored)

    def set_stored(self, stored: schemes.StoredWeight) -> None:
        """Replace the stored buffers (same shapes and dtypes) and drop kernel caches."""
        with torch.no_grad():
            self.qweight.copy_(stored.qweight)
            if self.scale is not None:
                self.scale.copy_(stored.scale)
            if self.zero_point is not None:
                self.zero_point.copy_(stored.zero_point)
        self._kernel_cache.clear()

    @staticmethod
    def _spec_of(config: QuantConfig | WeightSpec) -> tuple[WeightSpec, torch.dtype | None]:
        cfg = as_config(config)
        return cfg.weights, cfg.compute_dtype

    # ---- dequantization -----------------------------------------------------------------------------
    def dequantize_weight(self, dtype: torch.dtype | None = None, *, flat: bool = False,
                          rows: slice | None = None) -> torch.Tensor:
        """The float weight these buffers represent, in ``dtype`` (default: the original float dtype).

        ``flat=True`` returns the ``[N, K]`` view; ``rows`` selects output rows (used by chunked kernels).
        """
        dtype = dtype or self.float_dtype
        if rows is None and dtype in (torch.float32, torch.float64):
            w = schemes.dequantize_weight(self.spec, self.stored, self.weight2d_shape[1], self.group_size, dtype)
        else:
            w = self._dequantize_fast(dtype, rows or slice(None))
        return w if flat else w.reshape(-1, *self.weight_shape[1:])

    def _dequantize_fast(self, dtype: torch.dtype, rows: slice) -> torch.Tensor:
        """Dequantize output ``rows`` straight into ``dtype`` with one fused multiply-add per element."""
        k = self.weight2d_shape[1]
        if self.spec.kind in ("float16", "bfloat16"):
            return self.qweight[rows].to(dtype)
        scale, offset = self._kernel_cache.get(("dequant", dtype)) or self._dequant_params(dtype)
        if isinstance(self.spec, Int4):
            codes = unpack_int4(self.qweight[rows], k)
            g = self.group_size
            view = codes.view(codes.shape[0], k // g, g).to(dtype)
            return torch.addcmul(offset[rows], view, scale[rows]).view(codes.shape[0], k)
        codes = self.qweight[rows].to(dtype)
        if scale.dim() == 0:
            return torch.addcmul(offset, codes, scale)
        return torch.addcmul(offset[rows], codes, scale[rows])

    def _dequant_params(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, -zero * scale)`` in ``dtype``, shaped to broadcast, cached per dtype."""
        with torch.inference_mode(False), torch.no_grad():
            scale = self.scale.float()
            if self.zero_point is not None:
                zero = self.zero_point.float()
            elif isinstance(self.spec, Int4):
                zero = torch.full_like(scale, float(schemes.INT4_SYMMETRIC_OFFSET))
            else:
                zero = torch.zeros_like(scale)
            if scale.dim():
                scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
            params = (scale.to(dtype), (-zero * scale).to(dtype))
        self._kernel_cache[("dequant", dtype)] = params
        return params

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized float weight, rebuilt on every access (for code that reads ``.weight`` directly)."""
        return self.dequantize_weight()

    def to_float(self) -> nn.Module:
        """A plain float module (``nn.Linear``/``nn.Conv*``) with the dequantized weight."""
        raise NotImplementedError

    # ---- housekeeping -------------------------------------------------------------------------------
    def _apply(self, fn, recurse: bool = True):
        """``.to()``/``.cuda()``/``.half()``: move the stored weight but never change its dtype.

        The bias follows the model's dtype (and with it the output's compute dtype); integer codes and
        float32 scales keep theirs, so a ``model.half()`` cannot silently round the scales.
        """
        self._kernel_cache = {}
        protected = {n: self._buffers.pop(n) for n in ("qweight", "scale") if self._buffers.get(n) is not None}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buf in protected.items():
                self._buffers[name] = buf.to(device=fn(buf.new_empty(0)).device)
        if self.bias is not None:
            self.float_dtype = self.bias.dtype
        return self

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._kernel_cache = {}
        super()._load_from_state_dict(*args, **kwargs)

    def storage_bytes(self) -> int:
        """Bytes of every buffer this module owns (the real resident size)."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=True))

    def scheme(self) -> str:
        return self.spec.describe(self.group_size)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        kernel = f", kernel={self.last_kernel}" if self.last_kernel else ""
        return f"{base}, scheme={self.scheme()}{kernel}"
