"""INT8 weights: per-output-channel (default) or per-tensor scales, symmetric (int8 codes) or affine (uint8 codes
with a uint8 zero-point). Also the activation format (per-tensor, affine by default, static or dynamic)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import InitVar, dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from .. import fused, hardware
from ..errors import ConfigError
from ..im2col import ConvGeometry, conv_patches
from ..qtypes import PerChannel, PerGroup, PerTensor, QType
from .base import SCALE_DTYPE, Stored, StoredWeight, WeightSpec, register_format
from .integer import IntegerFormat, fused_bf16_candidate, fused_bf16_gemm_candidate, fused_candidate
from .kernel import KernelCandidate, KernelQuery, QuantWeight, bf16_rows
from .method import ROUND_TO_NEAREST, MethodConfig, method_options, take_method_options

ObserverLike = Any  # an Observer instance (used as a prototype) or a zero-argument factory returning one


# ---- the kernels that run INT8 (registered by Int8.kernel_candidates) -------------------------------------
def _int8pack_cpu_eligible(w: QuantWeight, q: KernelQuery) -> bool:
    # the op crashes the process for other K (torch 2.13)
    return q.low_bit_ok and q.device.type == "cpu" and hardware.HAS["int8pack"] and q.k % 16 == 0


def _int8pack_cpu(w: QuantWeight, x2d: torch.Tensor) -> torch.Tensor:
    stored = w.stored
    scales = w.cached("int8pack_scales", lambda: stored.scale.expand(w.shape2d[0]).to(torch.bfloat16).contiguous())
    return torch.ops.aten._weight_int8pack_mm(bf16_rows(x2d), stored.qweight, scales)


def _fused_int8(w: QuantWeight, x2d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    stored = w.stored
    return fused.int8_linear(x2d.to(torch.float32).contiguous(), stored.qweight, stored.scale, stored.zero_point,
                             None if bias is None else bias.to(torch.float32).contiguous())


def _bind_fused_int8(w: QuantWeight):
    call, buffers = fused.compiled("int8_linear"), w.buffers
    return lambda x2d, bias: call(x2d, buffers["qweight"], buffers["scale"], buffers["zero_point"], bias)


def _fused_bf16_int8(w: QuantWeight, x2d: torch.Tensor) -> torch.Tensor:
    stored = w.stored
    return fused.int8_linear_bf16(bf16_rows(x2d), stored.qweight, stored.scale, stored.zero_point)


def _fused_bf16_gemm_int8(w: QuantWeight, x2d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    stored = w.stored
    return fused.int8_gemm_bf16(bf16_rows(x2d), stored.qweight, stored.scale, stored.zero_point, bias)


def _int_mm_eligible(w: QuantWeight, q: KernelQuery) -> bool:
    fast_here = q.device.type == "cuda" or hardware.cpu_has_int_dot()  # elsewhere _int_mm is a slow reference loop
    return (hardware.HAS["int_mm"] and not q.needs_grad and fast_here
            and hardware.int_mm_shape_ok(q.device, q.rows, q.n, q.k))


def _w8a8_fused_eligible(w: QuantWeight, q: KernelQuery) -> bool:
    return q.device.type == "cpu" and not q.needs_grad and q.k <= fused.W8A8_MAX_K and fused.available()


EXACT_FLOAT_SUM = 1 << 24
"""Integers up to this magnitude are exact in float32: the bound on an INT8 GEMM's sums that a float32 output
must respect to hold the exact int32 sums."""


def _onednn_exact(w: QuantWeight) -> bool:
    """Whether every sum of int8 input codes (``|a| <= 128``) times this weight's codes is exact in float32:
    ``128 * max_n sum_k |w[n, k]| < 2**24`` (a property of the weight, computed once)."""
    return w.cached("w8a8_l1_ok", lambda: bool(128 * w.stored.qweight.abs().sum(1, dtype=torch.int64).max()
                                               < EXACT_FLOAT_SUM))


def _w8a8_onednn_eligible(w: QuantWeight, q: KernelQuery) -> bool:
    # AMX only: without it this op ran a reference loop here (AMD EPYC Zen 4, AVX512-VNNI, 2 threads: 6.3 s for
    # 2048x384 @ 384x384, torch._int_mm 0.012-0.024 s), which made timing it alone cost seconds per layer
    return (q.device.type == "cpu" and not q.needs_grad and hardware.HAS["onednn_qlinear"]
            and hardware.cpu_has_amx() and fused.available() and _onednn_exact(w))


def _w8a8_sim_eligible(w: QuantWeight, q: KernelQuery) -> bool:
    return not hardware.HAS["int_mm"] and not q.needs_grad


def _w8a8(w: QuantWeight, x2d: torch.Tensor, act, bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    """``x W^T + b`` from INT8 input codes and INT8 weight codes: exact integer sum, then a float32 rescale.

    Affine input codes ``[0, 255]`` are shifted by -128 into int8 and the shift moves into the zero-point,
    whose contribution ``zero * rowsum(W_q)`` is subtracted exactly. ``backend``: ``"int_mm"``
    (``torch._int_mm``), ``"fused"`` (the compiled int16-pair GEMM, :func:`monoquant.fused.w8a8_gemm`) or
    ``"sim"`` (the same integers in float64, exact below 2**53) or ``"onednn"`` (oneDNN's int8 matmul with the
    weight prepacked once, AMX-INT8 / VNNI, its float32 output holding the int32 sums exactly: eligible only where
    no sum can pass 2**24); all round to the same float32 values (bf16 for a bf16 input: rounded once).
    """
    a, x_scale, x_zero = act.int8_codes(x2d)
    zero = None if act.qtype.symmetric else x_zero - 128
    stored = w.stored
    wq = stored.qweight
    if backend == "sim":
        acc = a.double() @ wq.double().t()
        if zero is not None:
            acc.addr_(zero.reshape(-1).double().expand(acc.shape[0]),
                      w.cached("w8a8_rowsum_f64", lambda: wq.double().sum(1)), alpha=-1)
    else:
        if backend == "int_mm":
            acc = torch._int_mm(a, wq.t())
        elif backend == "onednn":  # float32 sums, exact (see _onednn_exact), in the rescale below like int32 ones
            packed, ones, zeros = w.cached("w8a8_onednn", lambda: _onednn_pack(wq))
            acc = torch.ops.onednn.qlinear_pointwise(a, 1.0, 0, packed, ones, zeros, None, 1.0, 0, torch.float32,
                                                     "none", [], "")
        else:  # the compiled vpmaddwd GEMM, on the weight repacked once into its panels
            acc = fused.w8a8_gemm(a, w.cached("w8a8_packed", lambda: fused.w8a8_pack(wq)), wq.shape[0])
        if zero is not None:
            rowsum = w.cached("w8a8_rowsum_i32", lambda: wq.sum(1, dtype=torch.int32))
            zero = zero.reshape(-1).to(torch.int32).expand(acc.shape[0])
            if not (acc.device.type == "cpu" and fused.available()):  # else inside the rescale pass below
                acc.addr_(zero, rowsum, alpha=-1)  # one in-place rank-1 update
    # the integer sums are exact; scale per row of x, then per output channel, then add the bias
    if acc.dtype in (torch.int32, torch.float32) and acc.device.type == "cpu" and fused.available():
        # the zero-point term, the scales, the bias and a bf16 input's output dtype in one pass over the sums
        b = None if bias is None else bias.float().contiguous()
        y = fused.rescale_rows(acc, x_scale.float().contiguous(), stored.scale.float().contiguous(), b,
                               None if zero is None else zero.contiguous(), None if zero is None else rowsum,
                               x2d.dtype == torch.bfloat16)
    else:
        y = acc.to(torch.float32).mul_(x_scale.float()).mul_(stored.scale.float())  # in place: no temporary
        if bias is not None:
            y.add_(bias.to(y.dtype))
    act.nan_nonfinite_rows_(y, x2d, x_scale)
    return y


def _onednn_pack(wq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The weight codes in oneDNN's blocked layout, with unit scales and zero zero-points (the sums come out
    unscaled; monoquant's rescale pass applies the scales)."""
    n = wq.shape[0]
    return (torch.ops.onednn.qlinear_prepack(wq, None), torch.ones(n, device=wq.device),
            torch.zeros(n, dtype=torch.int64, device=wq.device))


def _w8a8_onednn(w: QuantWeight, x2d: torch.Tensor, act, bias: torch.Tensor | None) -> torch.Tensor:
    return _w8a8(w, x2d, act, bias, "onednn")


def _w8a8_int_mm(w: QuantWeight, x2d: torch.Tensor, act, bias: torch.Tensor | None) -> torch.Tensor:
    return _w8a8(w, x2d, act, bias, "int_mm")


def _w8a8_fused(w: QuantWeight, x2d: torch.Tensor, act, bias: torch.Tensor | None) -> torch.Tensor:
    return _w8a8(w, x2d, act, bias, "fused")


def _w8a8_sim(w: QuantWeight, x2d: torch.Tensor, act, bias: torch.Tensor | None) -> torch.Tensor:
    return _w8a8(w, x2d, act, bias, "sim")


def _w8a8_vnni_eligible(w: QuantWeight, q: KernelQuery) -> bool:
    return (q.device.type == "cpu" and not q.needs_grad and 0 < q.k <= fused.W8A8_MAX_K
            and hardware.cpu_has_avx512_vnni() and fused.has_vnni())


def _w8a8_vnni(w: QuantWeight, x2d: torch.Tensor, act, bias: torch.Tensor | None) -> torch.Tensor:
    """The whole layer in one compiled call (:func:`monoquant.fused.w8a8_vnni_linear`): the input rows quantized
    as ``act.int8_codes`` would, u8 x s8 ``vpdpbusd`` sums on the weight packed once, the zero-point term, the
    scales and the bias applied from registers; the same float32 (bf16) values as the other ``int8_inputs``
    kernels, rows holding an inf or NaN all NaN."""
    xf = (x2d if x2d.dtype == torch.bfloat16 else x2d.float()).contiguous()
    if bias is not None and bias.dtype not in (torch.float32, torch.bfloat16):
        bias = bias.float()  # the kernel widens float32 / bf16 itself
    return _bind_w8a8_vnni(w)(xf, act, bias)


def _bind_w8a8_vnni(w: QuantWeight):
    """:func:`_w8a8_vnni` for contiguous float32 or bf16 rows and a float32 / bf16 bias, the packed weight, its
    code sums and the float32 scales looked up once (``KernelCandidate.bind``)."""
    call, wq = fused.compiled("w8a8_vnni_linear"), w.buffers["qweight"]
    n = wq.shape[0]
    packed = w.cached("w8a8_vnni_packed", lambda: fused.w8a8_vnni_pack(wq))
    rowsum = w.cached("w8a8_rowsum_i32", lambda: wq.sum(1, dtype=torch.int32))
    w_scale = w.buffers["scale"].float().contiguous()

    def run(xf: torch.Tensor, act, bias: torch.Tensor | None) -> torch.Tensor:
        qt = act.qtype
        y, scale = call(xf, packed, n, rowsum, w_scale, bias, qt.qmin, qt.qmax, qt.symmetric, act.eps,
                        *act.static_qparams())
        if not act.dynamic:  # dynamic: the kernel wrote the rows whose scale is not finite as NaN itself
            act.nan_nonfinite_rows_(y, xf, scale)
        return y
    return run


INT8PACK_CPU = KernelCandidate("int8pack_cpu", _int8pack_cpu, _int8pack_cpu_eligible, max_rows=12, tune_max_rows=256,
                               layouts=("int8pack_scales",))
"""torch's packed INT8 weight-only kernel on CPU (bf16), symmetric weights. ``max_rows`` measured with
``bench_linear.py --crossover`` (4096x4096, AVX512 + AMX), packed vs dequantize ms at 24 / 32 rows: 4.8 vs 5.7 /
6.3 vs 5.6 on 2 threads, 9.6 vs 10.1 / 13.0 vs 10.6 on 1 thread."""
FUSED_INT8 = fused_candidate(_fused_int8, _bind_fused_int8)
"""The compiled kernel on the stored INT8 layout (float32), symmetric or affine."""
FUSED_BF16_INT8 = fused_bf16_candidate(_fused_bf16_int8)
"""The compiled AVX512-BF16 kernel on the stored INT8 layout (bf16 weights, exact integers; float32 row scale)."""
FUSED_BF16_GEMM_INT8 = fused_bf16_gemm_candidate(_fused_bf16_gemm_int8)
"""The compiled AVX512-BF16 panel GEMM on the stored INT8 layout (exact integers; float32 row scale)."""
W8A8_INT_MM = KernelCandidate("w8a8_int_mm", _w8a8_int_mm, _int_mm_eligible, int8_inputs=True)
"""INT8 activations x INT8 weights with ``torch._int_mm`` (CPU with VNNI/AMX, or CUDA)."""
W8A8_FUSED = KernelCandidate("w8a8_fused", _w8a8_fused, _w8a8_fused_eligible, int8_inputs=True,
                             layouts=("w8a8_packed",))
"""The same products with the compiled int16-pair GEMM on CPU (weight repacked once); bit-identical."""
W8A8_ONEDNN = KernelCandidate("w8a8_onednn", _w8a8_onednn, _w8a8_onednn_eligible, int8_inputs=True,
                              layouts=("w8a8_onednn",))
"""The same products with oneDNN's int8 matmul primitive (``onednn::qlinear_pointwise``, weight prepacked once),
which runs AMX-INT8 tiles (eligible only where the CPU has them: without AMX it measured a reference loop);
``torch._int_mm`` goes through oneDNN's GEMM API instead (no AMX: measured 2.9 vs 1.4 ms at 2048x384 @ 384x1536
on one thread of an AMX Xeon, the bf16 GEMM 1.4 ms)."""
W8A8_VNNI = KernelCandidate("w8a8_vnni", _w8a8_vnni, _w8a8_vnni_eligible, int8_inputs=True,
                            layouts=("w8a8_vnni_packed",), bind=_bind_w8a8_vnni)
"""The whole INT8-activation layer as one compiled AVX512-VNNI kernel (quantize, ``vpdpbusd`` GEMM, epilogue),
bit-identical to the others; for CPUs with AVX512-VNNI (without AMX, oneDNN's int8 matmul does not beat it)."""
W8A8_SIM = KernelCandidate("w8a8_sim", _w8a8_sim, _w8a8_sim_eligible, int8_inputs=True, fallback=True)
"""The same integer products in float64 (exact) where this torch has no ``torch._int_mm``."""


# ---- the integer convolution (registered by Int8.conv_kernel_candidates) -----------------------------------
def _w8a8_conv_eligible(w: QuantWeight, q: KernelQuery) -> bool:
    return (q.device.type == "cpu" and hardware.HAS["int_mm"] and hardware.cpu_has_int_dot()
            and not q.needs_grad)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """2-D ``t`` itself when its strides are plain row- or column-major ones on dims longer than 1, else a
    row-major copy: ``torch._int_mm`` (torch 2.13 CPU) read garbage from a size-1 dim with another stride (a
    1-wide kernel sliced by its dilation, the transposed weight of a conv with one input value per patch)."""
    rows, cols = t.shape
    if rows > 1 and cols > 1 and t.stride() in ((cols, 1), (1, rows)):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _w8a8_conv(w: QuantWeight, x: torch.Tensor, geometry: ConvGeometry, act,
               bias: torch.Tensor | None) -> torch.Tensor:
    """A convolution from INT8 input codes and INT8 weight codes: the input is padded (in float, so a padded zero
    gets the zero-point's code exactly: per-sample qparams always cover 0), quantized per sample (dynamic) or per
    tensor (static) in one pass, unfolded into int8 patches (:func:`~monoquant.im2col.conv_patches`, a quarter of
    float32's bytes), multiplied with ``torch._int_mm`` per group (exact int32 sums), corrected for the input
    zero-point and rescaled once in float32. The integers are those of the fake-quantized float path
    (quantize, dequantize, ``F.conv*``), which rounds its float sums in another order.

    A sample holding an inf or NaN gives an all-NaN output sample (no code stands for it)."""
    batch = x.shape[0]
    xf = x.float()
    if any(geometry.pads):
        mode = "constant" if geometry.padding_mode == "zeros" else geometry.padding_mode
        xf = F.pad(xf, list(geometry.pads), mode=mode)
    x2d = xf.reshape(batch, -1)
    codes, x_scale, x_zero = act.int8_codes(x2d if act.dynamic else x2d.reshape(-1, xf.shape[-1]))
    unpadded = ConvGeometry(geometry.kernel_size, geometry.stride, geometry.dilation, (0,) * len(geometry.pads),
                            "zeros", geometry.groups)
    patches = conv_patches(codes.view(xf.shape), unpadded)  # [G, batch * positions, K / G] int8
    groups, rows = patches.shape[:2]
    positions = rows // max(1, batch)
    wq = w.stored.qweight
    per_group = wq.shape[0] // groups
    zero = None if act.qtype.symmetric else x_zero.reshape(-1).to(torch.int32) - 128
    if zero is not None and act.dynamic:
        zero = zero.repeat_interleave(positions)
    accs = []
    for g in range(groups):
        acc = torch._int_mm(_plain(patches[g]), _plain(wq[g * per_group:(g + 1) * per_group].t()))
        if zero is not None:  # every patch value, padded ones included, carries the zero-point: subtract it once
            rowsum = w.cached("w8a8_conv_rowsum", lambda: wq.sum(1, dtype=torch.int32))
            acc.addr_(zero.expand(rows), rowsum[g * per_group:(g + 1) * per_group], alpha=-1)
        accs.append(acc)
    acc = accs[0] if groups == 1 else torch.cat(accs, dim=1)
    row_scale = x_scale.reshape(-1, 1).float()
    if act.dynamic:
        row_scale = row_scale.repeat_interleave(positions, dim=0)
    w_scale = w.stored.scale.float()
    if fused.available():
        y = fused.rescale_rows(acc, row_scale.contiguous(), w_scale.contiguous(),
                               None if bias is None else bias.float().contiguous())
    else:
        y = acc.to(torch.float32).mul_(row_scale).mul_(w_scale)
        if bias is not None:
            y.add_(bias.float())
    bad = ~torch.isfinite(x_scale.reshape(-1)) if act.dynamic else ~torch.isfinite(x2d).all(dim=-1)
    if bool(bad.any()):
        y.view(batch, -1)[bad] = float("nan")
    return y.view(batch, *geometry.output_size(x.shape[2:]), -1).movedim(-1, 1).contiguous()


W8A8_CONV = KernelCandidate("w8a8_conv_int_mm", _w8a8_conv, _w8a8_conv_eligible, int8_inputs=True,
                            layouts=("w8a8_conv_rowsum",))
"""INT8 activations x INT8 weights as int8 patches and ``torch._int_mm`` (CPU with VNNI/AMX)."""


@register_format
@method_options
@dataclass(frozen=True)
class Int8(IntegerFormat):
    """8-bit integers. As a weight format: per-output-channel (default) or per-tensor, symmetric by default.

    As an activation format: per-tensor, affine by default (``symmetric=False``), qparams from ``observer``
    (default :class:`~monoquant.HistogramObserver`, outlier-robust) after calibration; ``dynamic=True`` computes
    per-token scales on the fly instead of calibrating. ``granularity`` and ``method`` only apply to weights.

    ``method``: ``"rtn"`` (round to nearest with the qparams of ``observer``), ``"mse"`` (the
    :class:`~monoquant.MSEObserver` clipping search) or ``"gptq"`` (needs calibration data; see
    :mod:`monoquant.gptq`, with ``act_order`` (``None``: GPTQ's default, on) and ``damping``, a fraction of
    the Hessian's mean diagonal; ranges from ``observer``, default the MSEObserver). ``refit_scales``
    (``None``: on) re-solves the scales for the codes GPTQ chose (:func:`monoquant.gptq.refit_group_scales`);
    ``sequential`` (``None``: off) collects each GPTQ layer's Hessian with the layers that run before it already
    quantized, when calibration data is given to :func:`~monoquant.quantize_` or
    :func:`~monoquant.calibrate_and_freeze`. ``"awq"`` (activation-aware scaling with its clipping search) and
    ``"awq+gptq"`` (AWQ scales, then GPTQ rounding with the GPTQ options) need ``calibration_data`` in
    :func:`~monoquant.quantize_`; see :mod:`monoquant.awq`.

    The format's fields are what the bytes mean (``symmetric``, ``granularity``; ``dynamic`` for activations);
    ``observer``, ``method`` and the GPTQ options build its :attr:`method_config` (a
    :class:`~monoquant.formats.method.MethodConfig`) and read it back: ``Int8(method="mse").method == "mse"``.
    """

    kind: ClassVar[str] = "int8"
    layout: ClassVar[str] = "int8-rowmajor"
    bits: ClassVar[int] = 8
    thresholds: ClassVar[Mapping[str, float]] = {"weight_sqnr_db": 28.0, "output_sqnr_db": 25.0,
                                                 "end_to_end_sqnr_db": 20.0}
    supports_activations: ClassVar[bool] = True
    fused_dequantize: ClassVar[Callable[..., torch.Tensor] | None] = staticmethod(fused.dequantize_int8_into)

    symmetric: bool | None = None
    granularity: Literal["channel", "tensor"] = "channel"
    # how the weights are made: init-only, folded into method_config (see formats/method.py)
    observer: InitVar[ObserverLike] = None
    method: InitVar[str] = "rtn"
    dynamic: bool = False
    act_order: InitVar[bool | None] = None
    damping: InitVar[float] = 0.01
    refit_scales: InitVar[bool | None] = None
    sequential: InitVar[bool | None] = None
    method_config: MethodConfig = field(default=ROUND_TO_NEAREST, init=False)

    def __post_init__(self, *method_options: Any) -> None:
        if self.granularity not in ("channel", "tensor"):
            raise ConfigError(f"Int8 granularity must be 'channel' or 'tensor', got {self.granularity!r}")
        if self.symmetric is not None and not isinstance(self.symmetric, bool):
            raise ConfigError(f"symmetric must be True, False or None, got {self.symmetric!r}")
        take_method_options(self, method_options)

    def weight_qtype(self) -> QType:
        return QType(8, symmetric=True if self.symmetric is None else self.symmetric)

    def activation_qtype(self) -> QType:
        return QType(8, symmetric=False if self.symmetric is None else self.symmetric)

    def weight_granularity(self, group_size: int | None = None) -> PerTensor | PerChannel | PerGroup:
        return PerChannel(0) if self.granularity == "channel" else PerTensor()

    def describe(self, group_size: int | None = None) -> str:
        return f"int8-{'sym' if self.weight_qtype().symmetric else 'affine'}-{self.granularity}"

    def empty_buffers(self, n: int, k: int, group_size: int | None, device: Any = None) -> Stored:
        symmetric = self.weight_qtype().symmetric
        pshape = (n,) if self.granularity == "channel" else ()
        return StoredWeight(torch.empty(n, k, dtype=torch.int8 if symmetric else torch.uint8, device=device),
                            torch.ones(pshape, dtype=SCALE_DTYPE, device=device),
                            None if symmetric else torch.zeros(pshape, dtype=torch.uint8, device=device))

    def encode(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> Stored:
        if self.weight_qtype().symmetric:
            return StoredWeight(codes.to(torch.int8), scale.to(SCALE_DTYPE), None)
        return StoredWeight(codes.to(torch.uint8), scale.to(SCALE_DTYPE), zero_point.to(torch.uint8))

    def output_scale(self, params: tuple) -> torch.Tensor | None:
        return params[0]  # one scale per output row (or one for all): it commutes with the matmul

    def kernel_candidates(self) -> tuple[KernelCandidate, ...]:
        if self.weight_qtype().symmetric:
            # W8A8: the whole-layer compiled kernel before torch._int_mm's three steps (quantize, GEMM, rescale):
            # the static table runs it where the CPU has it, and the tuner keeps it when the two time within its
            # margin (w8a8_int_mm won such near-ties by order and cost the bf16 encoder 5%)
            return (INT8PACK_CPU, FUSED_INT8, FUSED_BF16_INT8, FUSED_BF16_GEMM_INT8, W8A8_VNNI, W8A8_INT_MM,
                    W8A8_ONEDNN, W8A8_FUSED, W8A8_SIM)
        return (FUSED_INT8, FUSED_BF16_INT8, FUSED_BF16_GEMM_INT8)

    def conv_kernel_candidates(self) -> tuple[KernelCandidate, ...]:
        return (W8A8_CONV,) if self.weight_qtype().symmetric else ()

    @classmethod
    def infer(cls, buffers: Mapping[str, torch.Tensor], cols: int) -> tuple[WeightSpec, int | None] | None:
        q, scale, zero = buffers.get("qweight"), buffers.get("scale"), buffers.get("zero_point")
        if (set(buffers) - {"qweight", "scale", "zero_point"} or q is None or scale is None or q.dim() != 2
                or q.shape[1] != cols or q.dtype not in (torch.int8, torch.uint8) or scale.dim() > 1):
            return None
        symmetric = q.dtype == torch.int8
        if symmetric != (zero is None):
            return None
        return cls(symmetric=symmetric, granularity="channel" if scale.dim() else "tensor"), None
