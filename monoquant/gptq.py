"""GPTQ: calibration-driven weight quantization with error compensation (Frantar et al., 2022).

During calibration a :class:`HessianObserver` accumulates ``H = sum_x x^T x`` over the rows ``x`` of a
layer's inputs (averaged by the number of rows when read): a Linear layer's input rows, or a convolution's
input patches (im2col, :mod:`monoquant.im2col`: one row per output position, in the order of the kernel's
``[out, in/groups * prod(kernel)]`` view), with one Hessian per conv group since each group's output channels
only see that group's input channels (depthwise: one ``prod(kernel)``-sized Hessian per channel). At freeze,
:func:`gptq_quantize` quantizes the weight one input column at a time and spreads each column's rounding error
over the columns not yet quantized through the upper Cholesky factor of ``(H + damping * mean(diag H) * I)^-1``,
which minimises the layer's output error ``||(W - W_q) X||^2`` on the calibration inputs column by column.

Storage and kernels are unchanged: only the integer codes and scales differ from round-to-nearest.

* ``act_order``: columns are processed by decreasing ``diag(H)`` (the most active inputs first, while the
  most unquantized columns remain to absorb their error). Each column always uses the qparams of the group it
  is *stored* in, so the stored layout is the canonical one whatever the processing order.
* INT4 group qparams: with ``static_groups`` they are computed up front from the original weight (before any
  permutation); otherwise each group's are chosen when the first of its columns comes up, from the current
  (already error-compensated) values of all its columns.
* Ranges come from the spec's weight observer. For ``method="gptq"`` the default is the
  :class:`~monoquant.MSEObserver` clipping search, run on each group's current (compensated) values when
  groups are chosen on the fly; pass ``observer=mq.MinMaxObserver()`` for plain min/max ranges.
* INT8 per-channel / per-tensor: qparams come from the original weight, codes from the GPTQ pass.
* Dead inputs (``diag(H) == 0``: the input was always zero) get ``H_ii = 1``: their column is rounded to
  nearest and spreads no error. With ``H = I`` no error is spread at all and, with min/max ranges, the result
  equals RTN exactly.

What ``method="gptq"`` uses when a spec leaves these unset is :data:`DEFAULT_OPTIONS` (measured in
``benchmarks/bench_accuracy.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from . import functional as F
from .errors import CalibrationError, ConfigError
from .formats import Stored, WeightSpec
from .im2col import ConvGeometry, conv_patches
from .observers import Observer
from .qtypes import QType

BLOCK_SIZE = 128
"""Columns quantized between two lazy (matrix-multiply) error updates of the remaining weight."""


class HessianObserver(Observer):
    """Accumulates ``sum x^T x`` and the row count for inputs of ``in_features`` columns, in ``dtype``.

    With ``groups > 1`` (grouped and depthwise convolutions) it keeps one statistic per group and takes inputs
    of shape ``[groups, rows, in_features]`` (see :func:`monoquant.im2col.conv_patches`); otherwise any
    ``[..., in_features]`` tensor. ``sync`` sums both over ranks. Gives a Hessian (:meth:`hessian`), not qparams.
    """

    _drops_nonfinite = False

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32, device=None, *, groups: int = 1) -> None:
        super().__init__()
        if dtype not in (torch.float32, torch.float64):
            raise ConfigError(f"HessianObserver dtype must be torch.float32 or torch.float64, got {dtype}")
        if groups < 1:
            raise ConfigError(f"HessianObserver groups must be >= 1, got {groups}")
        self.in_features, self.groups = in_features, groups
        self.register_buffer("xtx", torch.zeros(groups, in_features, in_features, dtype=dtype, device=device))
        self.register_buffer("rows", torch.zeros((), dtype=torch.int64, device=device))

    def _observe(self, x: torch.Tensor) -> None:
        grouped = self.groups > 1
        if x.shape[-1] != self.in_features or (grouped and (x.dim() != 3 or x.shape[0] != self.groups)):
            want = f"[{self.groups}, rows, {self.in_features}]" if grouped else f"[..., {self.in_features}]"
            raise ConfigError(f"{self._where()} expects inputs of shape {want}, got {tuple(x.shape)}")
        x3d = x.reshape(self.groups, -1, self.in_features).to(self.xtx.dtype)
        self.xtx.baddbmm_(x3d.transpose(1, 2), x3d)
        self.rows += x3d.shape[1]

    def hessian(self) -> torch.Tensor:
        """``sum x^T x / rows`` (the mean over calibration rows): ``[in, in]``, or ``[groups, in, in]``."""
        if not self.has_seen_data:
            raise CalibrationError(f"{self._where()} has seen no data: run calibration batches first")
        h = self.xtx / self.rows.clamp_min(1)
        return h if self.groups > 1 else h[0]

    def calculate_qparams(self, qtype=None, granularity=None):
        raise ConfigError("HessianObserver collects GPTQ statistics, not qparams: read .hessian()")

    def _sync(self, group: dist.ProcessGroup | None) -> None:
        dist.all_reduce(self.xtx, group=group)
        dist.all_reduce(self.rows, group=group)

    def reset(self) -> None:
        super().reset()
        self.xtx.zero_()
        self.rows.zero_()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, groups={self.groups}"


def _inverse_cholesky(h: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damping * mean(diag H) * I)^-1``, in float64 for stability."""
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damping * float(torch.diag(h).mean()))
    lower = torch.linalg.cholesky(h)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def gptq_quantize(
    spec: WeightSpec,
    weight2d: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int | None,
    *,
    act_order: bool = False,
    damping: float = 0.01,
    static_groups: bool = False,
    refit_scales: bool = False,
) -> Stored:
    """GPTQ-quantize a ``[N, K]`` float weight into the spec's stored buffers.

    ``hessian`` is ``[K, K]``, or ``[G, K, K]`` for a grouped convolution: rows are split into ``G`` equal
    blocks and block ``g`` is compensated with ``hessian[g]``. ``act_order``: process columns by decreasing
    ``diag(H)``. ``static_groups`` (INT4): every group's qparams come from the original weight up front, else
    each group's come from its error-compensated weights when its first column is reached. Ranges are chosen by
    the spec's weight observer. ``refit_scales``: afterwards, :func:`refit_group_scales` (not for one scale per
    tensor). The stored layout is the canonical one (same as round-to-nearest) in every case.
    """
    n, k = weight2d.shape
    hs = hessian.unsqueeze(0) if hessian.dim() == 2 else hessian
    if hs.dim() != 3 or hs.shape[1:] != (k, k) or n % hs.shape[0]:
        raise ConfigError(f"Hessian of shape {tuple(hessian.shape)} does not match a weight of shape {(n, k)} "
                          "(expected [K, K], or [G, K, K] with G dividing the rows)")
    if damping <= 0:
        raise ConfigError(f"damping must be positive, got {damping}")
    if not spec.supports_gptq:
        raise ConfigError(f"{spec.describe()} weights cannot be produced by GPTQ (it needs a uniform integer grid)")
    grouped = group_size is not None  # INT4: groups along the input dimension
    g = group_size if grouped else None
    w = weight2d.detach().float()
    rows = n // hs.shape[0]
    static, scalar = None, False  # scalar: one scale for the whole tensor (INT8 per-tensor)
    if not grouped or static_groups:  # INT8 per-channel/per-tensor qparams always come from the original weight
        static = spec.qparams(w, g)
        scalar = static[0].dim() == 0
        if scalar:
            static = (static[0].expand(n), static[1].expand(n))
    parts = []
    for i, h in enumerate(hs):
        sl = slice(i * rows, (i + 1) * rows)
        fixed = None if static is None else (static[0][sl], static[1][sl])
        h = h.to(w.device)
        codes_i, scale_i, zero_i = _gptq_rows(spec, w[sl], h, g, fixed, act_order=act_order, damping=damping)
        if refit_scales and not scalar:
            scale_i = refit_group_scales(w[sl], h, codes_i, scale_i, zero_i, g or k)
        parts.append((codes_i, scale_i, zero_i))
    codes, scale, zero = (torch.cat(t) for t in zip(*parts))
    if scalar:
        scale, zero = scale[:1].reshape(()), zero[:1].reshape(())
    return spec.encode(codes, scale, zero)


def _gptq_rows(
    spec: WeightSpec,
    w: torch.Tensor,
    hessian: torch.Tensor,
    g: int | None,
    static: tuple[torch.Tensor, torch.Tensor] | None,
    *,
    act_order: bool,
    damping: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ of rows ``w`` (``[M, K]``) sharing one Hessian: integer codes ``[M, K]``, scale and zero-point.

    ``static``: qparams of every row (INT8) or group (INT4) fixed up front; ``None`` (INT4 only): a group's
    qparams are chosen when its first column comes up, from the current (compensated) values of its columns.
    """
    qtype: QType = spec.weight_qtype()
    m, k = w.shape
    perm = (torch.argsort(torch.diag(hessian), descending=True, stable=True) if act_order
            else torch.arange(k, device=w.device))
    position = torch.argsort(perm)  # processing position of each stored column
    w = w[:, perm].clone()
    hinv = _inverse_cholesky(hessian[perm][:, perm], damping).float().to(w.device)
    codes = torch.empty(m, k, dtype=torch.int64, device=w.device)
    if static is not None:
        scale_all, zero_all = static
    else:
        scale_all = torch.empty(m, k // g, dtype=torch.float64, device=w.device)
        zero_all = torch.empty(m, k // g, dtype=torch.int64, device=w.device)
    chosen: set[int] = set()
    for b0 in range(0, k, BLOCK_SIZE):
        b1 = min(b0 + BLOCK_SIZE, k)
        wb, hb = w[:, b0:b1].clone(), hinv[b0:b1, b0:b1]
        errs = torch.zeros_like(wb)
        for i in range(b1 - b0):
            col = int(perm[b0 + i])
            if g is None:
                s, z = scale_all, zero_all
            else:
                slot = col // g
                if static is None and slot not in chosen:
                    # no column of this group is quantized yet: w at block start minus this block's updates so far
                    cols = position[slot * g:(slot + 1) * g]
                    current = w[:, cols] - errs[:, :i] @ hinv[b0:b0 + i, cols]
                    s, z = spec.qparams(current, g)
                    scale_all[:, slot], zero_all[:, slot] = s[:, 0], z[:, 0]
                    chosen.add(slot)
                s, z = scale_all[:, slot], zero_all[:, slot]
            q = F.quantize(wb[:, i], s, z, qtype)
            codes[:, b0 + i] = q
            err = (wb[:, i] - F.dequantize(q, s, z, torch.float64).float()) / hb[i, i]
            wb[:, i:] -= err[:, None] * hb[i, i:][None, :]
            errs[:, i] = err
        w[:, b1:] -= errs @ hinv[b0:b1, b1:]
    return codes[:, position], scale_all, zero_all


def refit_group_scales(w: torch.Tensor, hessian: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                       zero: torch.Tensor, group_size: int, chunk: int = 256) -> torch.Tensor:
    """Least-squares scales for fixed integer codes and zero-points: each row's output error ``e H e^T``.

    With codes ``q`` and zero-points ``z`` fixed, a row's dequantized weight ``s_g * (q - z_g)`` is linear in its
    group scales ``s``, so the scales minimising the row's output error on the calibration inputs solve a
    ``groups x groups`` system (``[M, K]`` weight ``w``, ``[K, K]`` Hessian; ``scale``/``zero`` are ``[M, K //
    group_size]`` or ``[M]``). Rounding picked the codes for the old scales; this fixes the scales for the codes.
    A row keeps its old scales unless the new ones are all positive and lower its error. Same shape and dtype as
    ``scale``.
    """
    m, k = w.shape
    groups = k // group_size
    w64, h64 = w.double(), hessian.double()
    old = scale.reshape(m, groups).double()
    centred = (codes.double() - zero.reshape(m, groups, 1).double().expand(m, groups, group_size).reshape(m, k))
    blocks = h64.reshape(groups, group_size, groups, group_size)
    new = old.clone()
    for r0 in range(0, m, chunk):
        d = centred[r0:r0 + chunk].reshape(-1, groups, group_size)
        gram = torch.einsum("rgi,gihj,rhj->rgh", d, blocks, d)
        rhs = (d * (w64[r0:r0 + chunk] @ h64).reshape(-1, groups, group_size)).sum(-1)
        diag = gram.diagonal(dim1=1, dim2=2)
        diag.add_(1e-12 * diag.mean(-1, keepdim=True) + 1e-300)  # dead groups: a solvable system, scale ~ 0
        sol = torch.linalg.solve(gram, rhs.unsqueeze(-1)).squeeze(-1)
        before = old[r0:r0 + chunk]
        better = torch.isfinite(sol).all(-1) & (sol > 0).all(-1)
        sol = torch.where(better[:, None], sol, before)
        errors = [_row_errors(w64[r0:r0 + chunk], (d * s.unsqueeze(-1)).reshape(-1, k), h64) for s in (sol, before)]
        new[r0:r0 + chunk] = torch.where((better & (errors[0] < errors[1]))[:, None], sol, before)
    return new.reshape(scale.shape).to(scale.dtype)


def _row_errors(w: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Each row's output error ``e H e^T`` with ``e = w - dequantized``."""
    e = w - dequantized
    return ((e @ hessian) * e).sum(-1)


def output_sqnr(weight2d: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """SQNR (dB) of ``x W^T`` vs ``x W_q^T`` over the calibration rows, exactly, from ``H = mean x^T x``.

    ``sum ||x W^T||^2 = tr(W H W^T)`` and likewise for the error ``W - W_q``; the bias cancels in the error
    and is left out of the signal. A ``[G, K, K]`` Hessian (grouped convolution) applies to ``G`` equal
    blocks of rows.
    """
    h = hessian.double() if hessian.dim() == 3 else hessian.double().unsqueeze(0)
    w = weight2d.double().reshape(h.shape[0], -1, weight2d.shape[1])
    d = w - dequantized.double().reshape(w.shape)
    # quadratic forms of a PSD matrix: a rounding-level negative value means zero
    signal = max(float(((w @ h) * w).sum()), 0.0)
    noise = max(float(((d @ h) * d).sum()), 0.0)
    return F.sqnr_from_powers(signal, noise)


@dataclass(frozen=True)
class GPTQOptions:
    """How :func:`gptq_quantize` runs for one layer (see its arguments)."""

    act_order: bool = False
    damping: float = 0.01
    static_groups: bool = False
    refit_scales: bool = False
    sequential: bool = False
    """Collect the Hessian with every layer that runs before this one already quantized (see
    :func:`monoquant.calibrate_and_freeze`); a property of the calibration run, not of :func:`gptq_quantize`."""

    @classmethod
    def of(cls, spec: WeightSpec) -> GPTQOptions:
        """The options a ``method="gptq"`` spec asks for: each of its ``act_order``, ``static_groups``,
        ``refit_scales`` and ``sequential`` when set, else that of :data:`DEFAULT_OPTIONS`; its ``damping``."""
        def option(name: str) -> bool:
            value = getattr(spec, name, None)
            return getattr(DEFAULT_OPTIONS, name) if value is None else value

        return cls(act_order=option("act_order"), damping=spec.damping, static_groups=option("static_groups"),
                   refit_scales=option("refit_scales"), sequential=option("sequential"))


DEFAULT_OPTIONS = GPTQOptions(act_order=True, static_groups=True, refit_scales=True, sequential=False)
"""What ``method="gptq"`` does when the spec leaves an option unset (measured: benchmarks/bench_accuracy.py)."""


class GPTQState(nn.Module):
    """What a GPTQ-pending :class:`QuantLinear` or ``QuantConv*`` holds until :func:`monoquant.freeze`: its float
    weight (used by ``forward`` meanwhile; not part of ``state_dict``) and the :class:`HessianObserver` of its
    inputs (for a convolution: of its input patches, one statistic per conv group, see :mod:`monoquant.im2col`)."""

    def __init__(self, weight: torch.Tensor, layer_name: str = "", options: GPTQOptions | None = None, *,
                 conv: ConvGeometry | None = None, hessian_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.layer_name = layer_name
        self.options = options or GPTQOptions()
        self.conv = conv
        self.register_buffer("weight", weight.detach(), persistent=False)
        self.hessian = HessianObserver(weight.reshape(weight.shape[0], -1).shape[1], hessian_dtype,
                                       device=weight.device, groups=conv.groups if conv is not None else 1)
        self.hessian.name = layer_name

    def observe(self, x: torch.Tensor) -> None:
        self.hessian(x if self.conv is None else conv_patches(x.detach(), self.conv))

    def quantize(self, spec: WeightSpec, group_size: int | None) -> tuple[Stored, float]:
        """Run GPTQ; returns the stored weight and the layer's output SQNR (dB) on the calibration inputs."""
        if not self.hessian.has_seen_data:
            raise CalibrationError(f"layer {self.layer_name!r} uses method='gptq' but saw no calibration data; run "
                                   "batches that reach it under `with mq.calibrate(model):` before mq.freeze")
        h = self.hessian.hessian()
        w2d = self.weight.reshape(self.weight.shape[0], -1)
        opts = self.options
        stored = gptq_quantize(spec, w2d, h, group_size, act_order=opts.act_order, damping=opts.damping,
                               static_groups=opts.static_groups, refit_scales=opts.refit_scales)
        deq = spec.dequantize(stored, w2d.shape[1], group_size, torch.float64)
        return stored, output_sqnr(w2d, deq, h)

    def extra_repr(self) -> str:
        o = self.options
        return (f"act_order={o.act_order}, damping={o.damping}, static_groups={o.static_groups}, "
                f"refit_scales={o.refit_scales}, sequential={o.sequential}"
                + ("" if self.conv is None else f", conv={self.conv}"))
