"""monoquant 0.2's GPTQ and MSE clipping search, verbatim (commit bb00fc7): the reference the fast versions in
``monoquant/gptq.py`` and ``monoquant/observers.py`` are tested against (equal choices on fixed seeds, output
SQNR within 0.05 dB). Not part of the library; kept here so the comparison can always be rerun.
"""

from __future__ import annotations

import torch

from monoquant import functional as F
from monoquant.errors import ConfigError
from monoquant.formats import Stored, WeightSpec
from monoquant.observers import MSEObserver
from monoquant.qtypes import PerTensor, QType

BLOCK_SIZE = 128


class ReferenceMSEObserver(MSEObserver):
    """The MSE clipping search as 0.2 ran it: one full fake-quantize pass over the tensor per candidate."""

    def _observe(self, x: torch.Tensor) -> None:
        super(MSEObserver, self)._observe(x)  # MinMaxObserver: the running min/max
        view = F.group_view(x if x.dim() >= 2 else x.reshape(1, -1), self.granularity).double()
        if isinstance(self.granularity, PerTensor):
            view = view.reshape(1, 1, -1)
        elif view.dim() == 2:
            view = view.unsqueeze(1)
        lo = self.min_val.double().reshape(view.shape[:2])
        hi = self.max_val.double().reshape(view.shape[:2])
        errs = torch.empty((self.grid, *view.shape[:2]), dtype=torch.float64, device=view.device)
        for i, r in enumerate(self._ratios().tolist()):
            scale, zero = F.qparams_from_minmax(lo * r, hi * r, self.qtype)
            approx = F.fake_quantize(view, scale.float().double().unsqueeze(-1), zero.unsqueeze(-1), self.qtype)
            errs[i] = (view - approx).pow(2).sum(-1)
        errs = errs.reshape(self.grid, *self.min_val.shape)
        self.errors = errs if self.errors.shape != errs.shape else self.errors + errs


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
