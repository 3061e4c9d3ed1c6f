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
from ..config import Int4, Int8, QuantConfig, WeightSpec, as_config
from ..errors import ConfigError, NonFiniteWeightError
from ..observers import Observer, apply_keeping_dtypes

_QUAD_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _quad_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[65536]`` int64: entry ``i`` holds the four 2-byte ``dtype`` values of the INT4 codes packed in the two
    bytes ``i`` (little-endian: the low byte's low nibble first), as :mod:`monoquant.packing` lays them out."""
    key = (dtype, device)
    table = _QUAD_TABLES.get(key)
    if table is None:
        with torch.inference_mode(False), torch.no_grad():
            i = torch.arange(65536, device=device)
            codes = torch.stack((i & 0xF, (i >> 4) & 0xF, (i >> 8) & 0xF, i >> 12), dim=-1).to(dtype)
            table = _QUAD_TABLES[key] = codes.view(torch.int64).reshape(65536)
    return table


class QuantModule(nn.Module):
    """Mixin base of :class:`QuantLinear` and the ``QuantConv`` classes."""

    float_module_type: type[nn.Module]
    GEOMETRY: tuple[str, ...]
    """Constructor arguments shared with the float module type, besides ``bias``."""
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
                    f"no INT4 group size fits an input size of {k} (asked for {spec.group_size}; see "
                    "Int4.resolve_group_size); pass Int4(group_size=...) that divides it, or use Int8()"
                )
        else:
            group_size = None
        self.group_size = group_size
        self.compute_dtype = compute_dtype
        self.float_dtype = dtype or torch.get_default_dtype()
        self.last_kernel: str | None = None
        self._kernel_cache: dict[str, Any] = {}
        # calibration state (monoquant.calibration.prepare): an ActivationQuantizer when the config quantizes
        # activations; a GPTQState while a method="gptq" weight waits for mq.freeze
        self.input_quantizer: nn.Module | None = None
        self.gptq: nn.Module | None = None
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
        """Dequantize output ``rows`` straight into a new ``dtype`` tensor (see :meth:`dequantize_into`)."""
        n_rows = len(range(*rows.indices(self.weight2d_shape[0])))
        out = torch.empty(n_rows, self.weight2d_shape[1], dtype=dtype, device=self.qweight.device)
        return self.dequantize_into(out, rows.start or 0)

    def dequantize_into(self, out: torch.Tensor, row_start: int = 0, scratch: torch.Tensor | None = None,
                        *, scaled: bool = True) -> torch.Tensor:
        """Write output rows ``row_start : row_start + len(out)`` of the ``[N, K]`` weight into ``out``.

        ``out`` is a contiguous float tensor of shape ``[rows, K]``; ``scratch`` (optional, uint8, at least
        ``2 * rows * (K + 1)`` bytes) is reused for INT4 unpacking. Computed as ``(q - zero) * scale`` in
        ``out.dtype`` with no temporary the size of the weight, in cheap passes: widen the codes (INT4: one
        table lookup per byte that writes both nibbles' values at once), subtract the zero-point, multiply
        by the scale. This measured several times faster than unpacking then one ``addcmul`` on integer
        codes (``benchmarks/bench_linear.py``). In bf16 the result is the exact value rounded once, since
        ``q - zero`` is an integer of at most 8 bits.

        ``scaled=False`` (INT8 only, whose scale is per output row) leaves out the multiplication by the
        scale, so a caller can apply it to the matmul's output instead: ``x @ ((q - z) s)^T = (x @ (q - z)^T) s``
        with ``rows`` times fewer multiplications.
        """
        sl = slice(row_start, row_start + out.shape[0])
        if self.spec.kind in ("float16", "bfloat16"):
            return out.copy_(self.qweight[sl])
        scale, zero = self._kernel_cache.get(("dequant", out.dtype)) or self._dequant_params(out.dtype)
        k = self.weight2d_shape[1]
        if isinstance(self.spec, Int4):
            self._unpack_int4_into(out, self.qweight[sl], scratch)
            view = out.view(out.shape[0], k // self.group_size, self.group_size)
        else:
            out.copy_(self.qweight[sl])
            view = out
        if scale.dim():
            scale, zero = scale[sl], (zero[sl] if zero is not None and zero.dim() else zero)
        if zero is not None:
            view.sub_(zero)
        if scaled or isinstance(self.spec, Int4):
            view.mul_(scale)
        return out

    def _unpack_int4_into(self, out: torch.Tensor, packed: torch.Tensor, scratch: torch.Tensor | None) -> None:
        """INT4 codes of ``packed`` (``[rows, ceil(K/2)]``) as ``out.dtype`` values in ``out`` (``[rows, K]``).

        A byte holds two codes (low nibble = even column), so a 256-entry table maps each byte to the pair of
        values it encodes, stored as one 32-bit (bf16/fp16 pair) or 64-bit (fp32 pair) integer; gathering
        from it writes the interleaved columns directly. For bf16/fp16 with ``K % 4 == 0``, a 65,536-entry
        table (512 KiB, shared by all layers) maps each *pair* of bytes to four values in one 64-bit integer:
        half the gathers, measured ~1.7x faster for a 4096x4096 layer. Odd ``K`` and float64 take the
        nibble-by-nibble route.
        """
        rows, k = out.shape
        pair_int = {2: torch.int32, 4: torch.int64}.get(out.element_size())
        need = 2 * rows * (k + 1)
        if scratch is None or scratch.numel() < need:
            scratch = torch.empty(need, dtype=torch.uint8, device=out.device)
        if out.element_size() == 2 and k % 4 == 0 and packed.is_contiguous():
            index = scratch[: packed.numel() * 2].view(torch.int32)  # one index per two bytes
            index.copy_(packed.reshape(-1).view(torch.int16)).bitwise_and_(0xFFFF)
            torch.index_select(_quad_table(out.dtype, out.device), 0, index, out=out.view(torch.int64).reshape(-1))
            return
        if pair_int is not None and k % 2 == 0:
            key = ("int4_pairs", out.dtype)
            table = self._kernel_cache.get(key)
            if table is None:
                byte = torch.arange(256, device=out.device)
                pairs = torch.stack((byte & 0xF, byte >> 4), dim=-1).to(out.dtype)  # [256, 2]
                table = self._kernel_cache[key] = pairs.view(pair_int).reshape(256)
            index = scratch[: 4 * packed.numel()].view(torch.int32)
            index.copy_(packed.reshape(-1))
            torch.index_select(table, 0, index, out=out.view(pair_int).reshape(-1))
            return
        pairs = scratch[: packed.numel() * 2].view(rows, packed.shape[1], 2)
        torch.bitwise_and(packed, 0xF, out=pairs[..., 0])
        torch.bitwise_right_shift(packed, 4, out=pairs[..., 1])
        out.copy_(pairs.view(rows, -1)[:, :k])

    def _dequant_params(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(scale, zero_point)`` in ``dtype``, shaped to broadcast against the weight, cached per dtype.

        The zero-point is ``None`` when there is none to subtract (symmetric INT8), decided from the spec so
        that the forward pass never reads a value back from the device to find out."""
        with torch.inference_mode(False), torch.no_grad():
            scale = self.scale.float()
            if self.zero_point is not None:
                zero = self.zero_point.float()
            elif isinstance(self.spec, Int4):
                zero = torch.full((), float(schemes.INT4_SYMMETRIC_OFFSET))
            else:
                zero = None
            if scale.dim():
                scale = scale.unsqueeze(-1)
                zero = zero.unsqueeze(-1) if zero is not None and zero.dim() else zero
            params = (scale.to(dtype), None if zero is None else zero.to(dtype=dtype, device=scale.device))
        self._kernel_cache[("dequant", dtype)] = params
        return params

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized float weight, rebuilt on every access (for code that reads ``.weight`` directly).

        While a ``method="gptq"`` weight waits for :func:`monoquant.freeze` this is the float weight it computes with.
        """
        if self.gptq is not None:
            return self.gptq.weight
        return self.dequantize_weight()

    @classmethod
    def float_weight(cls, module: nn.Module) -> torch.Tensor:
        """The weight of float ``module`` laid out as this class stores it (``[out, in, ...]``); a view, not a copy
        (layers whose float type stores it otherwise, such as transformers' ``Conv1D``, override this)."""
        return module.weight

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
        """Quantize float ``module``'s weight with ``config`` (a weight spec or full config; default ``Int8()``).

        ``name`` is used in error messages; ``observer`` overrides the spec's weight observer; ``group_size``
        overrides the INT4 group chosen by :meth:`Int4.resolve_group_size`.
        """
        cls._check_float(module, name)
        spec, compute_dtype = cls._spec_of(config or Int8())
        q = cls(**cls.geometry_of(module), bias=module.bias is not None, spec=spec, group_size=group_size,
                compute_dtype=compute_dtype, device=module.weight.device, dtype=module.weight.dtype)
        q._load_float_weight(cls.float_weight(module), observer)
        if module.bias is not None:
            q.bias.data.copy_(module.bias.detach())
        q.train(module.training)
        return q

    def to_float(self) -> nn.Module:
        """A plain float module (``nn.Linear``/``nn.Conv*``) with the weight this layer computes with: the
        dequantized one, or the float one while a ``method="gptq"`` weight waits for :func:`monoquant.freeze`."""
        module = self.float_module_type(**self.geometry_of(self), bias=self.bias is not None,
                                        device=self.qweight.device, dtype=self.float_dtype)
        with torch.no_grad():
            module.weight.copy_(self.weight)
            if self.bias is not None:
                module.bias.copy_(self.bias)
        module.train(self.training)
        return module

    # ---- housekeeping -------------------------------------------------------------------------------
    def _apply(self, fn, recurse: bool = True):
        """``.to()``/``.cuda()``/``.half()``: move the stored weight but never change its dtype.

        The bias follows the model's dtype (and with it the output's compute dtype); integer codes and
        float32 scales keep theirs, so a ``model.half()`` cannot silently round the scales.
        """
        self._kernel_cache = {}
        apply_keeping_dtypes(self, fn, recurse, names=("qweight", "scale"))
        # the float dtype follows the conversion whether or not there is a bias to carry it
        self.float_dtype = fn(torch.empty(0, dtype=self.float_dtype)).dtype
        return self

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._kernel_cache = {}
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
        return self.spec.describe(self.group_size)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        kernel = f", kernel={self.last_kernel}" if self.last_kernel else ""
        return f"{base}, scheme={self.scheme()}{kernel}"
