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
* Ranges come from the method's weight observer. For ``method="gptq"`` the default is the
  :class:`~monoquant.MSEObserver` clipping search, run on each group's current (compensated) values when
  groups are chosen on the fly; pass ``observer=mq.MinMaxObserver()`` for plain min/max ranges.
* INT8 per-channel / per-tensor: qparams come from the original weight, codes from the GPTQ pass.
* Dead inputs (``diag(H) == 0``: the input was always zero) get ``H_ii = 1``: their column is rounded to
  nearest and spreads no error. With ``H = I`` no error is spread at all and, with min/max ranges, the result
  equals RTN exactly.

What ``method="gptq"`` uses when a format's method config leaves these unset is :data:`DEFAULT_OPTIONS` (measured in
``benchmarks/bench_accuracy.py``).

Speed and precision: the weight is processed transposed (a column is a contiguous row), errors are spread by
rank-one updates only inside a :data:`SUB_BLOCK_SIZE`-column sub-block, by matrix products to the rest of the
:data:`BLOCK_SIZE`-column block and, once per block, to the columns after it (the paper's lazy batch updates).
A sub-block's per-column loop (round, error, rank-one updates) is one call of the compiled
:func:`monoquant.fused.gptq_columns` on CPU when the extension is built, else :func:`_quantize_columns` (the
same arithmetic as PyTorch ops, bit for bit). The damped Hessian's Cholesky factorisation runs in float32, again
in float64 where float32 rounding breaks positive definiteness (output SQNR of a 4096x4096 layer: the same to
2e-4 dB as float64's); the inverse factor, the updates, the refit's Gram matrices and the output SQNR's
products in float32 (sums of the latter in float64). Codes and qparams are computed in float64 exactly as
round-to-nearest computes them. ``tests/_gptq_reference.py`` keeps 0.2's
implementation, which the tests compare against (output SQNR within 0.05 dB).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from . import functional as F
from . import fused
from .errors import CalibrationError, ConfigError
from .formats import Stored, WeightSpec, method_of
from .im2col import ConvGeometry
from .observers import Observer
from .qtypes import QType

BLOCK_SIZE = 128
"""Columns quantized between two lazy (matrix-multiply) error updates of the remaining weight."""

SUB_BLOCK_SIZE = 16
"""Columns inside a block between two matrix-multiply updates of the rest of the block: each column's
rank-one update touches at most this many columns (kept in cache), the rest is updated once per sub-block."""


class HessianObserver(Observer):
    """Accumulates ``sum x^T x`` and the row count for inputs of ``in_features`` columns, in ``dtype``.

    With ``groups > 1`` (grouped and depthwise convolutions) it keeps one statistic per group and takes inputs
    of shape ``[groups, rows, in_features]`` (see :func:`monoquant.im2col.conv_patches`); otherwise any
    ``[..., in_features]`` tensor. ``sync`` sums both over ranks. Gives a Hessian (:meth:`hessian`), not qparams.

    The ``[groups, in, in]`` statistic is allocated when the first input arrives and handed back by
    :meth:`reset`, so a model whose layers all wait for GPTQ holds only the Hessians of the layers being
    calibrated (see :func:`monoquant.calibrate_and_freeze`), not one per layer from the moment it is built.
    """

    _drops_nonfinite = False

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32, device=None, *, groups: int = 1) -> None:
        super().__init__()
        if dtype not in (torch.float32, torch.float64):
            raise ConfigError(f"HessianObserver dtype must be torch.float32 or torch.float64, got {dtype}")
        if groups < 1:
            raise ConfigError(f"HessianObserver groups must be >= 1, got {groups}")
        self.in_features, self.groups = in_features, groups
        self.register_buffer("xtx", torch.zeros(groups, 0, 0, dtype=dtype, device=device))  # allocated on use
        self.register_buffer("rows", torch.zeros((), dtype=torch.int64, device=device))

    @property
    def statistic_bytes(self) -> int:
        """Bytes of the ``[groups, in, in]`` statistic once allocated (what calibrating this layer holds)."""
        return self.groups * self.in_features ** 2 * self.xtx.element_size()

    def _allocate(self) -> None:
        if self.xtx.shape[-1] != self.in_features:
            self.xtx = torch.zeros(self.groups, self.in_features, self.in_features, dtype=self.xtx.dtype,
                                   device=self.xtx.device)

    def _observe(self, x: torch.Tensor) -> None:
        grouped = self.groups > 1
        if x.shape[-1] != self.in_features or (grouped and (x.dim() != 3 or x.shape[0] != self.groups)):
            want = f"[{self.groups}, rows, {self.in_features}]" if grouped else f"[..., {self.in_features}]"
            raise ConfigError(f"{self._where()} expects inputs of shape {want}, got {tuple(x.shape)}")
        self._allocate()
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
        self._allocate()  # a rank that saw no data adds zeros
        dist.all_reduce(self.xtx, group=group)
        dist.all_reduce(self.rows, group=group)

    def reset(self) -> None:
        """Forget everything and hand the statistic's memory back."""
        super().reset()
        self.xtx = torch.zeros(self.groups, 0, 0, dtype=self.xtx.dtype, device=self.xtx.device)
        self.rows.zero_()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, groups={self.groups}"


def working_bytes(rows: int, cols: int) -> int:
    """About how many bytes of temporaries freezing one GPTQ layer of ``[rows, cols]`` allocates besides its Hessian
    (the float64 Hessian copies and Cholesky factor, the float32 inverse factor, the transposed weight, codes,
    and the float64 products of the output SQNR): ``24 cols^2 + 24 rows cols``, a little under what a
    ``Linear(2048, 2048)`` measured (``benchmarks/bench_quantize.py``: about 240 MB above its Hessian)."""
    return 24 * cols * cols + 24 * rows * cols


def _inverse_cholesky(h: torch.Tensor, damping: float, order: torch.Tensor | None = None) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H' + damping * mean(diag H') * I)^-1`` (``U^T U``), float32, where ``H'`` is
    ``h`` with rows and columns in processing ``order`` (``h[order][:, order]``; ``None``: as stored).

    With ``J`` the reversal permutation, ``J H' J = L L^T`` (one Cholesky factorisation) gives ``H'^-1 = U^T U``
    for the upper triangular ``U = J L^-1 J``: one factorisation and one triangular inverse, instead of forming the
    inverse (``cholesky_inverse``) and factorising it again. ``J H' J`` is gathered from ``h`` in one indexing pass.
    The factorisation runs in float32 when that succeeds (the precision GPTQ uses ``U`` in; the damped Hessian is
    well conditioned) and again in float64 when float32 rounding breaks positive definiteness; the triangular
    inverse (:func:`_lower_inverse`) runs in float32.
    """
    k = h.shape[0]
    order = torch.arange(k, device=h.device) if order is None else order
    reversed_order = order.flip(0)
    h = h[reversed_order[:, None], reversed_order]  # J H' J, a fresh copy
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damping * float(torch.diag(h).double().mean()))
    lower, info = torch.linalg.cholesky_ex(h.float())
    if int(info) != 0:
        lower = torch.linalg.cholesky(h.double()).float()
    return _lower_inverse(lower).flip(0, 1)


INVERSE_LEAF = 256
"""Largest triangle :func:`_lower_inverse` inverts with one triangular solve against the identity."""


def _lower_inverse(lower: torch.Tensor) -> torch.Tensor:
    """``L^-1`` of a lower triangular ``L``, blocked as LAPACK's ``trtri``: with ``L = [[A, 0], [C, D]]``,
    ``L^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]]``, the corner from one matrix product and one triangular solve.
    Half the arithmetic of solving against the identity (``n^3 / 4`` multiply-adds instead of ``n^3 / 2``: the
    solve does not know that most of the identity's columns start with zeros), mostly in matrix products."""
    n = lower.shape[0]
    if n <= INVERSE_LEAF:
        eye = torch.eye(n, dtype=lower.dtype, device=lower.device)
        return torch.linalg.solve_triangular(lower, eye, upper=False)
    half = n // 2
    out = torch.zeros_like(lower)
    a_inv = _lower_inverse(lower[:half, :half])
    out[:half, :half] = a_inv
    out[half:, half:] = _lower_inverse(lower[half:, half:])
    out[half:, :half] = torch.linalg.solve_triangular(lower[half:, half:], lower[half:, :half] @ a_inv,
                                                      upper=False).neg_()
    return out


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
    """GPTQ-quantize a ``[N, K]`` float weight into the format's stored buffers.

    ``hessian`` is ``[K, K]``, or ``[G, K, K]`` for a grouped convolution: rows are split into ``G`` equal
    blocks and block ``g`` is compensated with ``hessian[g]``. ``act_order``: process columns by decreasing
    ``diag(H)``. ``static_groups`` (INT4): every group's qparams come from the original weight up front, else
    each group's come from its error-compensated weights when its first column is reached. Ranges are chosen by
    the method's weight observer. ``refit_scales``: afterwards, :func:`refit_group_scales` (not for one scale per
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
    # one Hessian (every Linear): its rows' results as they are, no copy of the int64 codes
    codes, scale, zero = parts[0] if len(parts) == 1 else (torch.cat(t) for t in zip(*parts))
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
    order = perm.tolist()
    # transposed, in processing order: column j of the weight is the contiguous row wt[j]
    wt = w.t().contiguous().index_select(0, perm)  # one transpose, then whole rows gathered
    hinv = _inverse_cholesky(hessian, damping, perm).to(w.device)
    codes_t = torch.empty(k, m, dtype=torch.int16, device=w.device)
    if static is not None:
        scale_all, zero_all = static
        scale_t, zero_t = scale_all.double().t().contiguous(), zero_all.double().t().contiguous()
    else:
        scale_all = torch.empty(m, k // g, dtype=torch.float64, device=w.device)
        zero_all = torch.empty(m, k // g, dtype=torch.int64, device=w.device)
        scale_t = torch.empty(k // g, m, dtype=torch.float64, device=w.device)
        zero_t = torch.empty(k // g, m, dtype=torch.float64, device=w.device)
    if g is None:  # one qparam row for every column
        scale_t, zero_t = scale_t.reshape(1, m), zero_t.reshape(1, m)
        slot_of = torch.zeros(k, dtype=torch.int64, device=w.device)
    else:
        slot_of = (perm // g).to(w.device)  # the group (row of scale_t) of each column, in processing order
    compiled = _compiled_columns(w)
    chosen: set[int] = set()
    for b0 in range(0, k, BLOCK_SIZE):
        b1 = min(b0 + BLOCK_SIZE, k)
        wb, hb = wt[b0:b1].clone(), hinv[b0:b1, b0:b1]
        errs = torch.zeros_like(wb)
        slots = slot_of[b0:b1].contiguous()
        for s0 in range(0, b1 - b0, SUB_BLOCK_SIZE):
            s1 = min(s0 + SUB_BLOCK_SIZE, b1 - b0)
            i = s0
            while i < s1:
                if static is None:
                    slot = order[b0 + i] // g
                    if slot not in chosen:
                        # no column of this group is quantized yet: w at block start minus this block's updates
                        cols = position[slot * g:(slot + 1) * g]
                        current = wt[cols] - hinv[b0:b0 + i, cols].t() @ errs[:i]
                        sc, zc = spec.qparams(current.t(), g)
                        scale_all[:, slot], zero_all[:, slot] = sc[:, 0], zc[:, 0]
                        scale_t[slot], zero_t[slot] = sc[:, 0], zc[:, 0]
                        chosen.add(slot)
                # the run of columns from i whose qparams are known (all of the sub-block when they are static)
                end = i + 1
                while end < s1 and (static is not None or order[b0 + end] // g in chosen):
                    end += 1
                args = (wb, hb, errs, codes_t[b0:b1], scale_t, zero_t, slots, i, end, s1, qtype.qmin, qtype.qmax)
                if compiled:
                    fused.gptq_columns(*args)
                else:
                    _quantize_columns(*args)
                i = end
            # in place: the same float32 sums as subtracting the product, without writing and reading it back
            wb[s1:].addmm_(hb[s0:s1, s1:].t(), errs[s0:s1], alpha=-1)
        wt[b1:].addmm_(hinv[b0:b1, b1:].t(), errs, alpha=-1)
    # row-major [M, K] (the refit's products and the format's packing read rows): gather and transpose the int16
    # codes, then widen
    return codes_t.index_select(0, position).t().contiguous().to(torch.int64), scale_all, zero_all


def _compiled_columns(w: torch.Tensor) -> bool:
    """Whether :func:`monoquant.fused.gptq_columns` runs GPTQ's column loop (CPU, extension built), else
    :func:`_quantize_columns` (the same arithmetic as PyTorch ops, one column at a time)."""
    return w.device.type == "cpu" and fused.available()


def _quantize_columns(wb: torch.Tensor, hb: torch.Tensor, errs: torch.Tensor, codes: torch.Tensor,
                      scale: torch.Tensor, zero: torch.Tensor, slots: torch.Tensor, i0: int, i1: int, s1: int,
                      qmin: int, qmax: int) -> None:
    """GPTQ's per-column loop for columns ``i0 <= i < i1`` of a block, in place: column ``i`` (the row ``wb[i]`` of
    the block's transposed weight) is rounded with the qparams ``scale[slots[i]]``, ``zero[slots[i]]`` into
    ``codes[i]``, its error divided by ``hb[i, i]`` goes to ``errs[i]`` and is spread over the columns up to
    ``s1`` (rank-one updates). :func:`monoquant.fused.gptq_columns` is the same arithmetic in one call."""
    for i in range(i0, i1):
        slot = int(slots[i])
        s, z = scale[slot], zero[slot]
        # F.quantize then F.dequantize, in float64 as they compute it, without their conversions
        x = wb[i]
        q = torch.round(x.double() / s).add_(z).clamp_(qmin, qmax)
        codes[i] = q
        err = (x - q.sub_(z).mul_(s).float()).div_(hb[i, i])
        wb[i + 1:s1] -= hb[i, i + 1:s1, None] * err[None, :]
        errs[i] = err


def refit_group_scales(w: torch.Tensor, hessian: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                       zero: torch.Tensor, group_size: int, chunk: int = 128) -> torch.Tensor:
    """Least-squares scales for fixed integer codes and zero-points: each row's output error ``e H e^T``.

    With codes ``q`` and zero-points ``z`` fixed, a row's dequantized weight ``s_g * (q - z_g)`` is linear in its
    group scales ``s``, so the scales minimising the row's output error on the calibration inputs solve a
    ``groups x groups`` system (``[M, K]`` weight ``w``, ``[K, K]`` Hessian; ``scale``/``zero`` are ``[M, K //
    group_size]`` or ``[M]``). Rounding picked the codes for the old scales; this fixes the scales for the codes.
    A row keeps its old scales unless the new ones are all positive and lower its error. Same shape and dtype as
    ``scale``.

    The systems come from :func:`_refit_systems` (``chunk`` rows at a time), solved in float64.
    """
    m, k = w.shape
    groups = k // group_size
    old = scale.reshape(m, groups).double()
    zeros = zero.reshape(m, groups, 1).float().expand(m, groups, group_size).reshape(m, k)
    centred = (codes.float() - zeros).contiguous()  # row-major: the products read rows of each group
    new = old.clone()
    for r0, gram, rhs in _refit_systems(w, hessian, centred, group_size, chunk):
        r1 = r0 + gram.shape[0]
        diag = gram.diagonal(dim1=1, dim2=2)
        diag.add_(1e-12 * diag.mean(-1, keepdim=True) + 1e-300)  # dead groups: a solvable system, scale ~ 0
        sol = torch.linalg.solve(gram, rhs.unsqueeze(-1)).squeeze(-1)
        before = old[r0:r1]
        better = torch.isfinite(sol).all(-1) & (sol > 0).all(-1)
        sol = torch.where(better[:, None], sol, before)
        # a row's error for scales s is w H w^T - 2 s . rhs + s^T gram s; the first term is the same for both
        errors = [((gram @ v.unsqueeze(-1)).squeeze(-1) * v).sum(-1) - 2 * (v * rhs).sum(-1) for v in (sol, before)]
        new[r0:r1] = torch.where((better & (errors[0] < errors[1]))[:, None], sol, before)
    return new.reshape(scale.shape).to(scale.dtype)


def _refit_systems(w: torch.Tensor, hessian: torch.Tensor, centred: torch.Tensor, group_size: int, chunk: int):
    """The refit's least-squares systems, ``chunk`` rows at a time: yields ``(r0, gram, rhs)`` in float64 with
    ``gram[r, g, h] = d_rg . H_gh . d_rh`` and ``rhs[r, g] = d_rg . (w_r H)_g`` for the rows ``r0 <= r < r0 +
    len(gram)`` (``d``: the ``[M, K]`` centred codes ``q - z``, ``d_rg`` its row ``r``'s group ``g``).

    Per chunk and group ``g`` one float32 product ``P = d_:g H_g:`` (``[chunk, K]``: the group's rows of ``H``
    times each row's codes of the group) gives the Gram's row ``g`` (``P``'s groups dotted with ``d``'s) and
    ``rhs[:, g]`` (``P . w``, ``H`` being symmetric): ``M K^2`` multiply-adds in all, as one batched product of all
    groups would do, but each product stays in cache (``chunk x K``, 2 MB) instead of a ``[groups, chunk, K]``
    array written to memory and read back (the refit of a 4096x4096 layer, timed alternately with the batched
    product on 2 Zen 4 cores: 2.17 -> 1.27 s). Sums in float32 as the products, then float64."""
    m, k = w.shape
    groups = k // group_size
    h_rows = hessian.float().reshape(groups, group_size, k)
    w32 = w.float()
    product = torch.empty(min(chunk, m), k, dtype=torch.float32, device=w.device)
    scratch = torch.empty_like(product)
    gram = torch.empty(groups, product.shape[0], groups, dtype=torch.float32, device=w.device)
    rhs = torch.empty(groups, product.shape[0], dtype=torch.float32, device=w.device)
    for r0 in range(0, m, chunk):
        d, wr = centred[r0:r0 + chunk], w32[r0:r0 + chunk]
        r = d.shape[0]
        p, t = product[:r], scratch[:r]
        for g in range(groups):
            torch.mm(d[:, g * group_size:(g + 1) * group_size], h_rows[g], out=p)
            torch.sum(torch.mul(p, d, out=t).view(r, groups, group_size), -1, out=gram[g, :r])
            torch.linalg.vecdot(p, wr, out=rhs[g, :r])
        yield r0, gram[:, :r].transpose(0, 1).double(), rhs[:, :r].t().double()


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
    h = hessian.float() if hessian.dim() == 3 else hessian.float().unsqueeze(0)
    w = weight2d.float().reshape(h.shape[0], -1, weight2d.shape[1])
    d = (dequantized.double().reshape(w.shape) - w).float()  # the error's sign does not change its square
    # quadratic forms of a PSD matrix: a rounding-level negative value means zero
    signal = max(_quadratic_trace(w, h), 0.0)
    noise = max(_quadratic_trace(d, h), 0.0)
    return F.sqnr_from_powers(signal, noise)


TRACE_BLOCK = 512
"""Columns of ``A^T A`` per product in :func:`_quadratic_trace`."""


def _quadratic_trace(a: torch.Tensor, h: torch.Tensor) -> float:
    """``sum_g tr(a_g h_g a_g^T)`` for ``[G, rows, K]`` ``a`` and symmetric ``[G, K, K]`` ``h``, as ``<h, a^T a>``
    from the blocks of ``a^T a`` on and above the diagonal (:data:`TRACE_BLOCK` columns at a time): half the
    multiply-adds of ``(a h) . a`` (a 4096x4096 layer's output SQNR: two products of 137 GFLOP each before).
    Products in float32 (relative error ~1e-6, far below what a dB figure shows), sums in float64."""
    k = a.shape[-1]
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for c0 in range(0, k, TRACE_BLOCK):
        c1 = min(c0 + TRACE_BLOCK, k)
        gram = a[:, :, c0:c1].transpose(1, 2) @ a[:, :, c0:]  # [G, block, K - c0]
        products = gram.mul_(h[:, c0:c1, c0:])
        total += products[:, :, :c1 - c0].sum(dtype=torch.float64) + 2 * products[:, :, c1 - c0:].sum(
            dtype=torch.float64)
    return float(total)


def _gptq_flattened(spec: WeightSpec, w2d: torch.Tensor, hessian: torch.Tensor, group_size: int,
                    opts: GPTQOptions) -> Stored | None:
    """GPTQ of all ``N K`` weights of ``w2d`` as one row of ``N K`` (row-major, so its groups are the rows' groups)
    with a ``[N K, N K]`` ``hessian`` that couples the rows (``G (x) H``); the stored buffers reshaped back to ``N``
    rows, or ``None`` when the format's buffers for one long row are not those of ``N`` rows laid end to end (INT4
    rows of odd length are padded). With ``G = I`` the codes are those of :func:`gptq_quantize` on the rows (the
    Hessian is block diagonal)."""
    n, k = w2d.shape
    shapes = [None if t is None else t.shape for t in spec.empty_buffers(n, k, group_size, device="meta")]
    flat = [None if t is None else t.numel() for t in spec.empty_buffers(1, n * k, group_size, device="meta")]
    if [None if t is None else t.numel() for t in shapes] != flat:
        return None
    stored = gptq_quantize(spec, w2d.reshape(1, n * k), hessian, group_size, **opts.rounding())
    return type(stored)(*(None if t is None else t.reshape(shape) for t, shape in zip(stored, shapes)))


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
    output_aware: bool = False
    """Round a small layer against the model output's error (:mod:`monoquant.output_aware`: ``quantize_`` sets
    :attr:`GPTQState.output_gram`); a property of the calibration run, not of :func:`gptq_quantize`."""

    def rounding(self) -> dict[str, bool | float]:
        """The keyword arguments of :func:`gptq_quantize` these options set (all but ``sequential`` and
        ``output_aware``)."""
        return {"act_order": self.act_order, "damping": self.damping, "static_groups": self.static_groups,
                "refit_scales": self.refit_scales}

    @classmethod
    def of(cls, spec: WeightSpec) -> GPTQOptions:
        """The options a ``method="gptq"`` spec's method config asks for: each of its ``act_order``,
        ``static_groups``, ``refit_scales``, ``sequential`` and ``output_aware`` when set, else that of
        :data:`DEFAULT_OPTIONS`; its ``damping``."""
        method = method_of(spec)

        def option(name: str) -> bool:
            value = getattr(method, name)
            return getattr(DEFAULT_OPTIONS, name) if value is None else value

        return cls(act_order=option("act_order"), damping=method.damping, static_groups=option("static_groups"),
                   refit_scales=option("refit_scales"), sequential=option("sequential"),
                   output_aware=option("output_aware"))


DEFAULT_OPTIONS = GPTQOptions(act_order=True, static_groups=True, refit_scales=True, sequential=False,
                              output_aware=True)
"""What ``method="gptq"`` does when the method config leaves an option unset (measured:
benchmarks/bench_accuracy.py). ``output_aware``: on the transformer stack (AMD EPYC Zen 4) it takes ``gptq`` from
32.53 to 38.77 dB end to end at INT4-g128 (its 16-input ``embed`` layer; the Llama-style model has no layer small
enough, so it changes nothing there)."""


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
        self.output_gram: torch.Tensor | None = None
        """``[N, N]`` ``E[g^T g]`` of the gradients at this layer's output (set by ``quantize_`` for small layers
        when :attr:`GPTQOptions.output_aware`, :func:`monoquant.output_aware.output_grams`): GPTQ then minimises
        the model output's error (see :meth:`quantize`)."""
        self.hessian = HessianObserver(weight.reshape(weight.shape[0], -1).shape[1], hessian_dtype,
                                       device=weight.device, groups=conv.groups if conv is not None else 1)
        self.hessian.name = layer_name

    def observe(self, x: torch.Tensor) -> None:
        self.hessian(x if self.conv is None else self.conv.patches(x.detach()))

    def quantize(self, spec: WeightSpec, group_size: int | None) -> tuple[Stored, float]:
        """Run GPTQ; returns the stored weight and the layer's output SQNR (dB) on the calibration inputs."""
        if not self.hessian.has_seen_data:
            raise CalibrationError(f"layer {self.layer_name!r} uses method='gptq' but saw no calibration data; run "
                                   "batches that reach it under `with mq.calibrate(model):` before mq.freeze")
        h = self.hessian.hessian()
        w2d = self.weight.reshape(self.weight.shape[0], -1)
        opts = self.options
        stored = None
        if self.output_gram is not None and group_size is not None and h.dim() == 2:
            stored = _gptq_flattened(spec, w2d, torch.kron(self.output_gram.to(h), h), group_size, opts)
        if stored is None:
            stored = gptq_quantize(spec, w2d, h, group_size, **opts.rounding())
        deq = spec.dequantize(stored, w2d.shape[1], group_size, torch.float64)
        return stored, output_sqnr(w2d, deq, h)

    def extra_repr(self) -> str:
        o = self.options
        return (f"act_order={o.act_order}, damping={o.damping}, static_groups={o.static_groups}, "
                f"refit_scales={o.refit_scales}, sequential={o.sequential}"
                + ("" if self.conv is None else f", conv={self.conv}"))
