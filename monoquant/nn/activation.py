"""``ActivationQuantizer``: the input-quantization state a :class:`QuantModule` holds as ``input_quantizer``.

Static (``mq.Int8(dynamic=False)``, the default): per-tensor qparams. An observer collects statistics while
:func:`monoquant.calibrate` runs; :func:`monoquant.freeze` turns them into the ``scale`` / ``zero_point``
buffers, sets ``frozen`` and drops the observer. Dynamic (``mq.Int8(dynamic=True)``): one scale and
zero-point per token (row of the flattened input) computed on the fly from that row's min/max; nothing to
calibrate.

Codes follow :mod:`monoquant.functional`: affine activations are ``uint8`` codes in ``[0, 255]`` with an
integer zero-point, symmetric ones ``int8`` in ``[-128, 127]`` with zero-point 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import functional as F
from .. import fused
from ..errors import CalibrationError, ConfigError
from ..formats import Int8
from ..observers import HistogramObserver, Observer, apply_keeping_dtypes
from ..qtypes import PerChannel, PerTensor


class ActivationQuantizer(nn.Module):
    """Quantizes a layer's input with ``spec`` (an :class:`~monoquant.Int8` activation format)."""

    def __init__(self, spec: Int8, layer_name: str = "") -> None:
        super().__init__()
        if not getattr(spec, "supports_activations", False):
            raise ConfigError(f"activations must be quantized with mq.Int8(...), got {spec!r}")
        self.spec = spec
        self.qtype = spec.activation_qtype()
        self.layer_name = layer_name
        self.calibrating = False
        # default: the outlier-robust histogram (benchmarks/bench_calibration.py --only outliers measured it within
        # 0.2 dB of the best mode on every row, and 33 dB above min/max with one stray value of 400)
        method = spec.method_config
        observer = HistogramObserver() if method.observer is None else method.make_observer()
        self.observer = None if spec.dynamic else observer.configure(self.qtype, PerTensor())
        if self.observer is not None:
            self.observer.name = layer_name
        self.register_buffer("scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        self.register_buffer("frozen", torch.tensor(False))
        self._frozen_cache: bool | None = None  # Python copy of `frozen`: forward must not sync with a GPU

    def _apply(self, fn, recurse: bool = True):
        return apply_keeping_dtypes(self, fn, recurse)

    @property
    def dynamic(self) -> bool:
        return self.spec.dynamic

    @property
    def ready(self) -> bool:
        """True when inputs can be quantized: dynamic, or static and frozen."""
        if self.dynamic:
            return True
        if self._frozen_cache is None:
            self._frozen_cache = bool(self.frozen)
        return self._frozen_cache

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._frozen_cache = None  # `frozen` may change: read it again on next use
        super()._load_from_state_dict(*args, **kwargs)

    @property
    def needs_calibration(self) -> bool:
        return not self.ready

    def observe(self, x: torch.Tensor) -> None:
        """Feed ``x`` to the observer (static mode before freeze; otherwise nothing to do)."""
        if self.observer is not None and not self.ready:
            self.observer(x)

    def observed_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(scale, zero_point)`` the observer's statistics give, changing nothing. Raises if it saw no data."""
        if not self.observer.has_seen_data:
            raise CalibrationError(f"layer {self.layer_name!r}: its input observer saw no data; run calibration "
                                   "batches that reach this layer before mq.freeze(model)")
        return self.observer.calculate_qparams()

    def freeze(self, qparams: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Fix ``scale``/``zero_point`` (``qparams``, default :meth:`observed_qparams`) and drop the observer."""
        if self.ready:
            return
        scale, zero = qparams if qparams is not None else self.observed_qparams()
        self.scale.fill_(float(scale))
        self.zero_point.fill_(int(zero))
        self.frozen.fill_(True)
        self._frozen_cache = True
        self.observer = None

    def thaw(self, observer: Observer) -> None:
        """Undo :meth:`freeze`: calibrating again with ``observer`` (the one ``freeze`` dropped)."""
        self.observer = observer
        self.frozen.fill_(False)
        self._frozen_cache = False

    def check_ready(self) -> None:
        if not self.ready:
            raise CalibrationError(
                f"layer {self.layer_name!r} quantizes its input but was not calibrated: run batches under "
                "`with mq.calibrate(model):` (or mq.calibrate_with(model, data)) then mq.freeze(model)"
            )

    def qparams(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` (float32, int32) for a flattened input: ``[rows, 1]`` when dynamic, else ``[]``."""
        self.check_ready()
        if self.dynamic:
            mn, mx = F.minmax(x2d.float(), PerChannel(0))
            scale, zero = F.qparams_from_minmax(mn, mx, self.qtype)
            return scale.float().unsqueeze(-1), zero.to(torch.int32).unsqueeze(-1)
        return self.scale, self.zero_point

    @property
    def eps(self) -> float:
        """The smallest scale (:data:`monoquant.functional.SCALE_EPS`), what dynamic qparams are clamped to."""
        return F.SCALE_EPS

    def static_qparams(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(scale, zero_point)`` as a compiled kernel takes them: ``(None, None)`` when dynamic (per-row qparams
        are computed inside the kernel), else float32 ``[1]`` and int32 ``[1]`` (``None`` for symmetric)."""
        if self.dynamic:
            return None, None
        self.check_ready()
        zero = None if self.qtype.symmetric else self.zero_point.to(torch.int32).reshape(1).contiguous()
        return self.scale.float().reshape(1).contiguous(), zero

    def quantize(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Integer codes (float32 holding integers in the qtype's range) of a flattened ``[rows, K]`` input, with
        their scale and zero-point: ``clamp(round(x / scale) + zero, qmin, qmax)`` in float32 (one rounding of
        the quotient, then exact integer arithmetic), so the integer and simulated paths agree bit for bit."""
        scale, zero = self.qparams(x2d)
        codes = torch.div(x2d.float(), scale).round_()
        if not self.qtype.symmetric:
            codes += zero
        return codes.clamp_(self.qtype.qmin, self.qtype.qmax), scale, zero

    def nan_nonfinite_rows_(self, out2d: torch.Tensor, x2d: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Set to NaN, in place, the rows of ``out2d`` whose input row in ``x2d`` holds an inf or NaN (``scale``
        from :meth:`qparams`); returns ``out2d``.

        No code stands for such a row (an inf would become the largest code, a NaN an arbitrary one), so every
        path makes its output NaN, as float math would, rather than return plausible numbers. Dynamic qparams
        are non-finite exactly for those rows; static ones need a look at the input."""
        bad = ~torch.isfinite(scale.reshape(-1)) if self.dynamic else ~torch.isfinite(x2d).all(dim=-1)
        # CUDA and traced graphs (torch.compile): no host sync, one masked pass
        if out2d.device.type != "cpu" or torch.compiler.is_compiling() or bool(bad.any()):
            out2d.masked_fill_(bad.unsqueeze(-1), float("nan"))
        return out2d

    def int8_codes(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`quantize`'s codes as int8, affine codes ``[0, 255]`` shifted by -128 (``shift`` = 128, else 0),
        with the scale and zero-point: what an integer GEMM multiplies. On CPU with the compiled kernels built
        (:func:`monoquant.fused.quantize_rows`, and for dynamic qparams
        :func:`monoquant.fused.dynamic_quantize_rows`) this is one pass, bit-identical to :meth:`qparams` and
        :meth:`quantize`."""
        shift = 0 if self.qtype.symmetric else 128
        if x2d.device.type == "cpu" and fused.available():
            if self.dynamic and x2d.shape[-1] > 0:  # the per-row qparams too, in the same pass over each row
                xf = x2d.contiguous() if x2d.dtype == torch.bfloat16 else x2d.float().contiguous()  # bf16: read as is
                codes, scale, zero = fused.dynamic_quantize_rows(xf, self.qtype.qmin,
                                                                 self.qtype.qmax, self.qtype.symmetric, F.SCALE_EPS)
                return codes, scale.unsqueeze(-1), zero.unsqueeze(-1)
            scale, zero = self.qparams(x2d)
            xf = x2d.float().contiguous()
            codes = fused.quantize_rows(xf, scale.float().contiguous(), None if shift == 0 else zero,
                                        self.qtype.qmin, self.qtype.qmax, shift)
            return codes, scale, zero
        codes, scale, zero = self.quantize(x2d)
        return (codes.sub_(shift) if shift else codes).to(torch.int8), scale, zero

    def fake_quantize(self, x: torch.Tensor, *, per: str = "token") -> torch.Tensor:
        """``x`` quantized then dequantized (same dtype and shape): what the integer path sees.

        Dynamic qparams are per token (``per="token"``: each row of ``x`` flattened to ``[-1, x.shape[-1]]``)
        or per sample (``per="sample"``: each ``x[i]``, used for convolution inputs). Gradients pass straight
        through (the rounding counts as identity), so an input that requires grad still gets one.
        """
        xd = x.detach()
        if per == "token" or not self.dynamic:
            x2d = xd.reshape(-1, x.shape[-1])
        else:  # explicit size: reshape(0, -1) raises on an empty batch
            x2d = xd.reshape(x.shape[0], math.prod(x.shape[1:]))
        if x2d.device.type == "cpu" and fused.available() and x2d.shape[-1] > 0:
            # the compiled one-pass codes (bit-identical to quantize), widened: a third of the passes
            int8, scale, zero = self.int8_codes(x2d)
            codes = int8.to(torch.float32)
            shift = 0 if self.qtype.symmetric else 128
            if shift:
                codes.sub_((zero - shift).float())
        else:
            codes, scale, zero = self.quantize(x2d)
            if not self.qtype.symmetric:
                codes.sub_(zero.float())
        # (codes - zero) * scale in float32, in place: codes is a fresh float32 tensor of ours, and two fresh
        # input-sized temporaries measured 30 ms of page faults for a 2048x4096 input
        codes.mul_(scale.float())
        out = self.nan_nonfinite_rows_(codes, x2d, scale).to(x.dtype).reshape(x.shape)
        return x + (out - x).detach() if x.requires_grad else out

    def extra_repr(self) -> str:
        mode = "dynamic per-token" if self.dynamic else ("frozen" if self.ready else "calibrating")
        return f"{self.qtype}, {mode}"
