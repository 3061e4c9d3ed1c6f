"""GPTQ: calibration-driven weight quantization with error compensation (Frantar et al., 2022).

During calibration a :class:`HessianObserver` accumulates ``H = sum_x x^T x`` over the rows ``x`` of a
Linear layer's inputs (averaged by the number of rows when read). At freeze, :func:`gptq_quantize` quantizes
the weight one input column at a time and spreads each column's rounding error over the columns not yet
quantized through the upper Cholesky factor of ``(H + damping * mean(diag H) * I)^-1``, which minimises the
layer's output error ``||(W - W_q) X||^2`` on the calibration inputs column by column.

Storage and kernels are unchanged: only the integer codes and scales differ from round-to-nearest.

* INT4 group-wise: without activation order, each group's scale/zero-point is chosen (by the spec's weight
  observer) from the already error-compensated weights when its first column is reached; with
  ``act_order=True`` columns are processed by decreasing ``diag(H)`` and each column uses the qparams of the
  group it is *stored* in, computed up front from the original weight (so the stored layout is unchanged).
* INT8 per-channel / per-tensor: qparams come from the original weight, codes from the GPTQ pass.
* Dead inputs (``diag(H) == 0``: the input was always zero) get ``H_ii = 1``: their column is rounded to
  nearest and spreads no error. With ``H = I`` no error is spread at all and the result equals RTN exactly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from . import functional as F
from . import schemes
from .config import Int4, WeightSpec
from .errors import CalibrationError, ConfigError
from .observers import Observer
from .qtypes import PerTensor, QType

BLOCK_SIZE = 128
"""Columns quantized between two lazy (matrix-multiply) error updates of the remaining weight."""


class HessianObserver(Observer):
    """Accumulates ``sum x^T x`` and the row count for inputs of ``in_features`` columns, in ``dtype``.

    ``sync`` sums both over ranks. Gives a Hessian (:meth:`hessian`), not qparams.
    """

    _drops_nonfinite = False

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        if dtype not in (torch.float32, torch.float64):
            raise ConfigError(f"HessianObserver dtype must be torch.float32 or torch.float64, got {dtype}")
        self.in_features = in_features
        self.register_buffer("xtx", torch.zeros(in_features, in_features, dtype=dtype, device=device))
        self.register_buffer("rows", torch.zeros((), dtype=torch.int64, device=device))

    def _observe(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ConfigError(f"{self._where()} expects inputs with {self.in_features} features, got {x.shape}")
        x2d = x.reshape(-1, self.in_features).to(self.xtx.dtype)
        self.xtx.addmm_(x2d.T, x2d)
        self.rows += x2d.shape[0]

    def hessian(self) -> torch.Tensor:
        """``sum x^T x / rows`` (the mean over calibration rows)."""
        if not self.has_seen_data:
            raise CalibrationError(f"{self._where()} has seen no data: run calibration batches first")
        return self.xtx / self.rows.clamp_min(1)

    def calculate_qparams(self, qtype=None, granularity=None):
        raise ConfigError("HessianObserver collects GPTQ statistics, not qparams: read .hessian()")

    def _sync(self, group: dist.ProcessGroup | None) -> None:
        dist.all_reduce(self.xtx, group=group)
        dist.all_reduce(self.rows, group=group)

    def reset(self) -> None:
        super().reset()
        self.xtx.zero_()
        self.rows.zero_()


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
) -> schemes.Stored:
    """GPTQ-quantize a ``[N, K]`` float weight with input Hessian ``[K, K]`` into the spec's stored buffers."""
    n, k = weight2d.shape
    if hessian.shape != (k, k):
        raise ConfigError(f"Hessian of shape {tuple(hessian.shape)} does not match a weight with {k} inputs")
    if damping <= 0:
        raise ConfigError(f"damping must be positive, got {damping}")
    qtype: QType = schemes.weight_qtype(spec)
    w = weight2d.detach().float().clone()
    grouped = isinstance(spec, Int4)
    g = group_size if grouped else None
    perm = torch.argsort(torch.diag(hessian), descending=True, stable=True) if act_order else None

    # static qparams: INT8 (per-channel/tensor) always, INT4 groups when columns are reordered
    static = not grouped or act_order
    if static:
        scale_all, zero_all = schemes.qparams_for(spec, w, g)
        if not grouped and scale_all.dim() == 0:
            scale_all, zero_all = scale_all.expand(n), zero_all.expand(n)
    else:
        scale_all = torch.empty(n, k // g, dtype=torch.float64, device=w.device)
        zero_all = torch.empty(n, k // g, dtype=torch.int64, device=w.device)
    if perm is not None:
        w, hessian = w[:, perm], hessian[perm][:, perm]
    col_index = perm if perm is not None else torch.arange(k, device=w.device)

    hinv = _inverse_cholesky(hessian, damping).float().to(w.device)
    codes = torch.empty(n, k, dtype=torch.int64, device=w.device)
    block = g if (grouped and not act_order) else BLOCK_SIZE
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb, hb = w[:, b0:b1].clone(), hinv[b0:b1, b0:b1]
        errs = torch.zeros_like(wb)
        if not static:  # b0 starts a group; its weights already hold every earlier column's compensation
            s, z = schemes.qparams_for(spec, wb, g)
            scale_all[:, b0 // g], zero_all[:, b0 // g] = s[:, 0], z[:, 0]
        for i in range(b1 - b0):
            col = int(col_index[b0 + i])
            slot = col // g if grouped else slice(None)
            s = scale_all[:, slot] if grouped else scale_all
            z = zero_all[:, slot] if grouped else zero_all
            q = F.quantize(wb[:, i], s, z, qtype)
            codes[:, b0 + i] = q
            err = (wb[:, i] - F.dequantize(q, s, z, torch.float64).float()) / hb[i, i]
            wb[:, i:] -= err[:, None] * hb[i, i:][None, :]
            errs[:, i] = err
        w[:, b1:] -= errs @ hinv[b0:b1, b1:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    if not grouped and schemes.weight_granularity(spec, None) == PerTensor():
        scale_all, zero_all = scale_all[:1].reshape(()), zero_all[:1].reshape(())
    return schemes.encode_codes(spec, codes, scale_all, zero_all)


def output_sqnr(weight2d: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """SQNR (dB) of ``x W^T`` vs ``x W_q^T`` over the calibration rows, exactly, from ``H = mean x^T x``.

    ``sum ||x W^T||^2 = tr(W H W^T)`` and likewise for the error ``W - W_q``; the bias cancels in the error
    and is left out of the signal.
    """
    h = hessian.double()
    w = weight2d.double()
    d = w - dequantized.double()
    # quadratic forms of a PSD matrix: a rounding-level negative value means zero
    signal = max(float(((w @ h) * w).sum()), 0.0)
    noise = max(float(((d @ h) * d).sum()), 0.0)
    return F.sqnr_from_powers(signal, noise)


class GPTQState(nn.Module):
    """What a GPTQ-pending :class:`QuantLinear` holds until :func:`monoquant.freeze`: its float weight (used by
    ``forward`` meanwhile; not part of ``state_dict``) and the :class:`HessianObserver` of its inputs."""

    def __init__(self, weight: torch.Tensor, layer_name: str = "", *, act_order: bool = False,
                 damping: float = 0.01, hessian_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.layer_name = layer_name
        self.act_order, self.damping = act_order, damping
        self.register_buffer("weight", weight.detach(), persistent=False)
        self.hessian = HessianObserver(weight.reshape(weight.shape[0], -1).shape[1], hessian_dtype,
                                       device=weight.device)
        self.hessian.name = layer_name

    def observe(self, x: torch.Tensor) -> None:
        self.hessian(x)

    def quantize(self, spec: WeightSpec, group_size: int | None) -> tuple[schemes.Stored, float]:
        """Run GPTQ; returns the stored weight and the layer's output SQNR (dB) on the calibration inputs."""
        if not self.hessian.has_seen_data:
            raise CalibrationError(f"layer {self.layer_name!r} uses method='gptq' but saw no calibration data; run "
                                   "batches that reach it under `with mq.calibrate(model):` before mq.freeze")
        h = self.hessian.hessian()
        w2d = self.weight.reshape(self.weight.shape[0], -1)
        stored = gptq_quantize(spec, w2d, h, group_size, act_order=self.act_order, damping=self.damping)
        deq = schemes.dequantize_weight(spec, stored, w2d.shape[1], group_size, torch.float64)
        return stored, output_sqnr(w2d, deq, h)

    def extra_repr(self) -> str:
        return f"act_order={self.act_order}, damping={self.damping}"
