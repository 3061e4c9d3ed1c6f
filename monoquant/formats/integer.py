"""What the integer formats (:class:`~monoquant.Int8`, :class:`~monoquant.Int4`) share: qparams chosen by an
observer, codes ``round(w / scale) + zero_point`` clamped to the qtype's range, and ``(q - zero_point) * scale``
back. Subclasses say how codes are stored (:meth:`IntegerFormat.encode`) and widened (:meth:`widen_into`).

Stored buffers of a weight whose 2-D view is ``[N, K]`` (conv kernels are viewed as
``[out_channels, in_channels/groups * prod(kernel)]``):

============  ==========================================  ===================  ======================
spec          ``qweight``                                 ``scale`` (float32)  ``zero_point``
============  ==========================================  ===================  ======================
Int8 sym      int8 ``[N, K]``                             ``[N]`` or ``[]``    none
Int8 affine   uint8 ``[N, K]``                            ``[N]`` or ``[]``    uint8, same as scale
Int4 affine   uint8 ``[N, ceil(K/2)]`` (see packing.py)   ``[N, K/g]``         uint8 ``[N, K/g]``
Int4 sym      same, codes offset by +8                    ``[N, K/g]``         none (implicitly 8)
============  ==========================================  ===================  ======================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import torch

from .. import functional as F
from .. import fused, hardware
from ..qtypes import PerChannel, PerGroup, PerTensor, QType
from .base import SCALE_DTYPE, Stored, WeightSpec
from .kernel import KernelCandidate, KernelQuery, QuantWeight

if TYPE_CHECKING:
    from ..observers import Observer


def _code_dtype(qtype: QType) -> torch.dtype:
    """The narrowest integer dtype that holds every code of ``qtype``."""
    if qtype.qmin >= 0 and qtype.qmax <= 255:
        return torch.uint8
    if qtype.qmin >= -128 and qtype.qmax <= 127:
        return torch.int8
    return torch.int16


FUSED_MAX_ROWS = 8
"""Largest row count the static table sends to the compiled ``fused_cpu`` kernel (it re-reads the weight
once per 8 input rows, so its cost grows with rows like the packed kernels')."""

FUSED_TUNE_MAX_ROWS = 64
"""Largest row count at which ``fused_cpu`` is timed: past it, it cannot win."""


def fused_eligible(weight: QuantWeight, q: KernelQuery) -> bool:
    """The compiled kernels (:mod:`monoquant.fused`) run float32 on CPU, when the C++ file could be built here,
    for inputs that need no gradient and layers that force no compute dtype."""
    return q.device.type == "cpu" and not q.needs_grad and q.compute_dtype is None and fused.available()


def fused_candidate(run, bind) -> KernelCandidate:
    """The ``fused_cpu`` candidate of an integer format whose stored layout the compiled kernel reads
    (``run(weight, x2d, bias)``: the bias is added inside the kernel, a separate add cost a 1-row call ~2 us;
    ``bind(weight)``: the compiled call with the lookups done once, see :attr:`KernelCandidate.bind`)."""
    return KernelCandidate("fused_cpu", run, fused_eligible, max_rows=FUSED_MAX_ROWS,
                           tune_max_rows=FUSED_TUNE_MAX_ROWS, fuses_bias=True, bind=bind)


FUSED_BF16_TUNE_MAX_ROWS = 256
"""Largest row count at which ``fused_bf16`` is timed: it dequantizes the weight once per 8 input rows, so past
it a dequantize + bf16 GEMM (the weight dequantized once) wins (``bench_linear.py``: at 256 rows of 4096x4096 the
two were within 15% of each other on AMD EPYC Zen 4)."""

FUSED_BF16_BLOCK = 32
"""``fused_bf16`` reads the input and the weight 32 columns (one ``vdpbf16ps``) at a time: ``K`` must be a
multiple of it (INT4: the group size too)."""


def fused_bf16_eligible(weight: QuantWeight, q: KernelQuery) -> bool:
    """The compiled AVX512-BF16 kernels (:func:`monoquant.fused.int4_linear_bf16`) compute in bf16 on CPUs with
    ``avx512_bf16`` where the build has them, for ``K`` a multiple of 32 and ``N`` of 4, and only for bf16 inputs
    (or a layer asked to compute in bf16): a float32 model keeps its float32 arithmetic wherever it did."""
    bf16 = q.input_dtype == torch.bfloat16 or q.compute_dtype == torch.bfloat16
    return (bf16 and q.device.type == "cpu" and q.low_bit_ok and q.k % FUSED_BF16_BLOCK == 0 and q.n % 4 == 0
            and hardware.cpu_has_avx512_bf16() and fused.bf16_dot())


def fused_bf16_candidate(run, eligible=fused_bf16_eligible) -> KernelCandidate:
    """The ``fused_bf16`` candidate of an integer format: chosen by measurement only (``max_rows=0`` keeps it out
    of the static table, which stays the same on every CPU), timed up to :data:`FUSED_BF16_TUNE_MAX_ROWS` rows."""
    return KernelCandidate("fused_bf16", run, eligible, max_rows=0, tune_max_rows=FUSED_BF16_TUNE_MAX_ROWS)


def fused_bf16_gemm_eligible(weight: QuantWeight, q: KernelQuery) -> bool:
    """The panel GEMM (:func:`monoquant.fused.int4_gemm_bf16`): as :func:`fused_bf16_eligible`, ``N`` a multiple
    of 16."""
    return q.n % 16 == 0 and fused_bf16_eligible(weight, q)


def fused_bf16_gemm_candidate(run) -> KernelCandidate:
    """The ``fused_bf16_gemm`` candidate of an integer format: by measurement only, at any row count (its weight
    cost is one dequantize per call, like the ``dequant`` rows'); it adds the layer's bias itself
    (``run(weight, x2d, bias)``), in float32 before the output's one rounding to bf16."""
    return KernelCandidate("fused_bf16_gemm", run, fused_bf16_gemm_eligible, max_rows=0, fuses_bias=True)



def _quantize_rows(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qtype: QType,
                   granularity: PerTensor | PerChannel | PerGroup) -> torch.Tensor:
    """Codes of a 2-D weight in the narrowest integer dtype that holds them: one pass of
    :func:`monoquant.fused.quantize_weight_rows` for a contiguous float32 CPU weight when the extension is built,
    else :func:`monoquant.functional.quantize_rows` (float64 row chunks); the same codes either way."""
    dtype = _code_dtype(qtype)
    rows, cols = w.shape
    if not (w.device.type == "cpu" and w.dtype == torch.float32 and w.is_contiguous() and w.numel()
            and fused.available()):
        return F.quantize_rows(w, scale, zero, qtype, granularity, dtype)
    group = granularity.size if isinstance(granularity, PerGroup) else cols
    slots = (rows, cols // group)

    def per_slot(p: torch.Tensor) -> torch.Tensor:  # [rows, cols // group] float64 (one per row for per tensor)
        p = p.double()
        return (p.reshape(1, 1).expand(slots) if isinstance(granularity, PerTensor) else p.reshape(slots)).contiguous()

    out = torch.empty(rows, cols, dtype=dtype, device=w.device)
    return fused.quantize_weight_rows(w, per_slot(scale), None if qtype.symmetric else per_slot(zero), group,
                                      qtype.qmin, qtype.qmax, out)


class IntegerFormat(WeightSpec):
    """Shared behaviour of integer formats with a scale and an optional zero-point per qparam slot."""

    symmetric_offset: ClassVar[int] = 0
    """Added to signed codes before storing them unsigned (INT4 stores symmetric codes as ``q + 8``)."""
    fused_dequantize: ClassVar[Callable[..., torch.Tensor] | None] = None
    """This format's compiled one-pass dequantize (e.g. :func:`monoquant.fused.dequantize_int4_into`, called as
    ``(out, qweight, scale, zero_point, group_size, row_start, scaled)``), ``None`` when it has none."""

    def weight_qtype(self) -> QType:
        raise NotImplementedError

    def weight_granularity(self, group_size: int | None) -> PerTensor | PerChannel | PerGroup:
        raise NotImplementedError

    @property
    def supports_gptq(self) -> bool:
        return True

    def as_integer(self) -> IntegerFormat:
        return self

    def round_trip_minmax(self, w: torch.Tensor, group_size: int | None) -> torch.Tensor:
        # rounded in float32 without storing codes (AWQ's search calls this 40 times per layer; storing and
        # unpacking INT4 codes took most of its time)
        granularity = self.weight_granularity(group_size)
        view = F.group_view(w.float(), granularity)
        lo, hi = view.amin(-1, keepdim=True), view.amax(-1, keepdim=True)
        qtype = self.weight_qtype()
        scale, zero = F.qparams_from_minmax(lo, hi, qtype)
        scale, zero = scale.float(), zero.float()
        q = torch.round(view / scale).add_(zero).clamp_(qtype.qmin, qtype.qmax)
        return q.sub_(zero).mul_(scale).reshape(w.shape)

    # ---- float -> stored -------------------------------------------------------------------------------------
    def qparams(self, weight2d: torch.Tensor, group_size: int | None,
                observer: Observer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale (float64, rounded to the stored dtype) and zero-point of a weight, chosen by ``observer``."""
        observer = observer if observer is not None else self.make_observer()
        observer.configure(self.weight_qtype(), self.weight_granularity(group_size))
        observer(weight2d)
        scale, zero = observer.calculate_qparams()
        # round the scale to its stored dtype first, so codes are computed with the scale that is stored
        return scale.to(SCALE_DTYPE).double(), zero

    def quantize(self, weight2d: torch.Tensor, group_size: int | None = None,
                 observer: Observer | None = None) -> Stored:
        scale, zero = self.qparams(weight2d, group_size, observer)
        granularity = self.weight_granularity(group_size)
        w = weight2d.detach()
        if isinstance(granularity, PerChannel) and granularity.axis != 0:
            view = F.group_view(w, granularity)
            codes = F.quantize(view, F.expand_qparam(scale, granularity), F.expand_qparam(zero, granularity),
                               self.weight_qtype())
            return self.encode(codes.reshape(w.shape[0], -1), scale, zero)
        # row chunks in one reused float64 buffer, codes straight into the narrowest integer dtype that holds them
        # (what encode stores for the 8-bit formats, so its conversion is a no-op): the temporaries were 16x the
        # float32 layer, then a few MB but freshly allocated per chunk; the codes are the same
        codes = _quantize_rows(w.reshape(w.shape[0], -1), scale, zero, self.weight_qtype(), granularity)
        return self.encode(codes, scale, zero)

    def encode(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> Stored:
        """Store integer ``codes`` (int64 in the qtype's range, ``[N, K]``) with their qparams."""
        raise NotImplementedError

    # ---- stored -> float -------------------------------------------------------------------------------------
    def widen_into(self, out: torch.Tensor, qweight_rows: torch.Tensor, scratch: torch.Tensor | None) -> None:
        """Write the codes of ``qweight_rows`` as ``out.dtype`` values into ``out`` (``[rows, K]``)."""
        out.copy_(qweight_rows)

    def dequant_params(self, stored: Stored, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(scale, zero_point)`` in ``dtype``, shaped to broadcast against the weight's group view.

        The zero-point is ``None`` when there is none to subtract, decided from the format (never by reading a
        value back from the device)."""
        scale, zero_point = stored.scale.float(), stored.zero_point
        if zero_point is not None:
            zero = zero_point.float()
        elif self.symmetric_offset:
            zero = torch.full((), float(self.symmetric_offset), device=scale.device)
        else:
            zero = None
        if scale.dim():
            scale = scale.unsqueeze(-1)
            zero = zero.unsqueeze(-1) if zero is not None and zero.dim() else zero
        return scale.to(dtype), None if zero is None else zero.to(dtype)

    def compiled_dequantize_into(self, out: torch.Tensor, stored: Stored, row_start: int,
                                 group_size: int | None, scaled: bool = True) -> torch.Tensor | None:
        """The compiled one-pass dequantize (bit-identical, 5-10x faster for INT4) for a contiguous float32 or
        bf16 ``out`` on CPU, when the format has a :attr:`fused_dequantize` and the extension is built here."""
        if (self.fused_dequantize is None or out.device.type != "cpu"
                or out.dtype not in (torch.float32, torch.bfloat16) or not out.is_contiguous()
                or stored.qweight.device.type != "cpu" or not fused.available()):
            return None
        return self.fused_dequantize(out, stored.qweight, stored.scale, stored.zero_point, group_size, row_start,
                                     scaled)

    def group_rows_view(self, out: torch.Tensor, group_size: int | None) -> torch.Tensor:
        """``out`` (``[rows, K]``) viewed so that the per-row parameters broadcast against it."""
        return out

    def dequantize_into(self, out: torch.Tensor, stored: Stored, row_start: int, params: tuple,
                        group_size: int | None, scratch: torch.Tensor | None = None, *,
                        scaled: bool = True) -> torch.Tensor:
        """``(q - zero) * scale`` in ``out.dtype`` with no temporary the size of the weight, in cheap passes:
        widen the codes, subtract the zero-point, multiply by the scale. In bf16 the result is the exact value
        rounded once, since ``q - zero`` is an integer of at most 8 bits."""
        sl = slice(row_start, row_start + out.shape[0])
        scale, zero = params
        self.widen_into(out, stored.qweight[sl], scratch)
        view = self.group_rows_view(out, group_size)
        if scale.dim():
            scale, zero = scale[sl], (zero[sl] if zero is not None and zero.dim() else zero)
        if zero is not None:
            view.sub_(zero)
        if scaled or self.output_scale(params) is None:
            view.mul_(scale)
        return out
