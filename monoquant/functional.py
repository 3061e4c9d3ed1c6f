"""Pure tensor math for quantization: one place for every formula, no modules, no state.

Conventions (used everywhere in monoquant):

* ``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` and ``x_hat = (q - zero_point) * scale``.
* Symmetric qtypes: ``scale = absmax / qmax`` and ``zero_point = 0``.
* Affine qtypes: the range is widened to include 0, ``scale = (max - min) / (qmax - qmin)`` and
  ``zero_point = clamp(round(qmin - min / scale), qmin, qmax)`` so that 0.0 is exactly representable.
* Scales are computed in float64 and never smaller than ``SCALE_EPS``; rounding is half-to-even.
* Group-wise tensors are viewed as ``[rows, cols // group, group]`` with qparams of shape ``[rows, cols // group]``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import weakref
from collections.abc import Iterator

import torch

from .errors import ConfigError, NonFiniteWeightError
from .qtypes import PerChannel, PerGroup, PerTensor, QType

SCALE_EPS = torch.finfo(torch.float32).eps
"""Smallest scale produced (float32 machine epsilon, as in ``torch.ao.quantization``)."""


def qparams_from_minmax(
    min_val: torch.Tensor, max_val: torch.Tensor, qtype: QType
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float64) and zero-point (int64) that cover ``[min_val, max_val]`` elementwise."""
    min_val = min_val.double()
    max_val = max_val.double()
    if qtype.symmetric:
        absmax = torch.maximum(min_val.abs(), max_val.abs())
        scale = (absmax / qtype.qmax).clamp_min(SCALE_EPS)
        return scale, torch.zeros_like(scale, dtype=torch.int64)
    lo = torch.clamp(min_val, max=0.0)
    hi = torch.clamp(max_val, min=0.0)
    scale = ((hi - lo) / (qtype.qmax - qtype.qmin)).clamp_min(SCALE_EPS)
    zero = torch.clamp(torch.round(qtype.qmin - lo / scale), qtype.qmin, qtype.qmax).to(torch.int64)
    return scale, zero


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int, qtype: QType
) -> torch.Tensor:
    """Integer codes (int64 values in ``[qmin, qmax]``) of ``x``; qparams broadcast against ``x``."""
    q = torch.round(x.double() / scale.double())
    if isinstance(zero_point, torch.Tensor) or zero_point != 0:
        q = q + zero_point
    return q.clamp_(qtype.qmin, qtype.qmax).to(torch.int64)


QUANTIZE_CHUNK = 1 << 18
"""Most weight values :func:`quantize_rows` converts at once: its float64 scratch (2 MiB) is made once per call
and stays in cache, instead of temporaries the size of the weight."""


def quantize_rows(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qtype: QType,
    granularity: PerTensor | PerChannel | PerGroup, dtype: torch.dtype = torch.int16,
) -> torch.Tensor:
    """Codes of a 2-D ``x`` (``[rows, cols]``) as ``dtype``, equal to :func:`quantize` of its :func:`group_view`.

    ``granularity`` is per tensor, per output row (``PerChannel(0)``) or per group along the row; ``scale`` and
    ``zero_point`` have its qparam shape. The same float64 operations as :func:`quantize` run on row chunks of
    at most :data:`QUANTIZE_CHUNK` values in one reused scratch buffer: no temporary the size of ``x`` (a
    fresh float64 copy of a 64 MB layer cost more in page faults than the arithmetic), same codes.
    """
    if isinstance(granularity, PerChannel) and granularity.axis != 0:
        raise ConfigError("quantize_rows takes per-tensor, per-row (PerChannel(0)) or per-group qparams")
    rows_total, cols = x.shape
    codes = torch.empty(rows_total, cols, dtype=dtype, device=x.device)
    if not codes.numel():
        return codes
    rows = max(1, QUANTIZE_CHUNK // cols)
    scratch = torch.empty(min(rows, rows_total), cols, dtype=torch.float64, device=x.device)
    per_tensor = isinstance(granularity, PerTensor)
    scale = scale.double()
    zero_point = None if qtype.symmetric else zero_point.double()  # symmetric: always 0, nothing to add
    for r0 in range(0, rows_total, rows):
        buf = scratch[:min(rows, rows_total - r0)]
        part = x[r0:r0 + rows]
        if per_tensor:
            s, z, view, xs = scale, zero_point, buf, part
        else:
            s = expand_qparam(scale[r0:r0 + rows], granularity)
            z = None if zero_point is None else expand_qparam(zero_point[r0:r0 + rows], granularity)
            view, xs = group_view(buf, granularity), group_view(part, granularity)
        torch.div(xs, s, out=view)  # x promoted to float64 element by element: x.double() / scale, as quantize()
        buf.round_()
        if z is not None:
            view.add_(z)
        buf.clamp_(qtype.qmin, qtype.qmax)
        codes[r0:r0 + rows].copy_(buf)
    return codes


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int | None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``(q - zero_point) * scale`` in ``dtype``; qparams broadcast against ``q``."""
    x = q.to(dtype)
    if zero_point is not None and (isinstance(zero_point, torch.Tensor) or zero_point != 0):
        x = x - torch.as_tensor(zero_point, device=q.device).to(dtype)
    return x * scale.to(dtype)


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int, qtype: QType
) -> torch.Tensor:
    """Quantize then dequantize, returning ``x``'s dtype: the values a quantized tensor really holds."""
    return dequantize(quantize(x, scale, zero_point, qtype), scale, zero_point, torch.float64).to(x.dtype)


def group_view(x: torch.Tensor, granularity: PerTensor | PerChannel | PerGroup) -> torch.Tensor:
    """View a 2-D tensor so that reducing over the last dim gives one value per qparam.

    Per-tensor -> ``[1, numel]``; per-channel (axis 0) -> ``[rows, cols]``; per-group -> ``[rows, cols//g, g]``.
    """
    if isinstance(granularity, PerTensor):
        return x.reshape(1, -1)
    # explicit sizes, not -1: a reshape with -1 is ambiguous (and raises) when there are no rows
    if isinstance(granularity, PerChannel):
        moved = x.movedim(granularity.axis, 0)
        return moved.reshape(moved.shape[0], math.prod(moved.shape[1:]))
    rows, cols = x.shape[0], math.prod(x.shape[1:])
    return x.reshape(rows, cols // granularity.size, granularity.size)


def minmax(x: torch.Tensor, granularity: PerTensor | PerChannel | PerGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``x`` per qparam slot (see :func:`group_view` for the shapes)."""
    view = group_view(x, granularity)
    # two reductions, not torch.aminmax(dim=-1): same values, but aminmax along a dim measured ~35x slower
    # (7.8 ms vs 0.2 ms for 2048 x 1536 on 2 threads, torch 2.13 CPU) and it sits on every dynamic-activation call
    mn, mx = view.amin(dim=-1), view.amax(dim=-1)
    if isinstance(granularity, PerTensor):
        return mn.reshape(()), mx.reshape(())
    return mn, mx


def expand_qparam(p: torch.Tensor, granularity: PerTensor | PerChannel | PerGroup) -> torch.Tensor:
    """Reshape a qparam tensor so it broadcasts against :func:`group_view` of its tensor."""
    if isinstance(granularity, PerTensor):
        return p.reshape(1, 1)
    return p.unsqueeze(-1)


def sqnr_from_powers(signal: float | torch.Tensor, noise: float | torch.Tensor) -> float:
    """SQNR in dB from summed signal power ``sum(ref^2)`` and noise power ``sum((ref - approx)^2)``.

    Lets callers accumulate the two sums over many batches and convert once. ``inf`` when ``noise`` is 0;
    ``-inf`` when ``signal`` is 0 but ``noise`` is not.
    """
    signal, noise = float(signal), float(noise)
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return 10.0 * math.log10(signal / noise)


def signal_noise_powers(reference: torch.Tensor, approximation: torch.Tensor) -> tuple[float, float]:
    """``(sum(ref^2), sum((ref - approx)^2))`` in float64, the two terms of :func:`sqnr`."""
    ref = reference.detach().double()
    noise = (ref - approximation.detach().double()).pow(2).sum()
    return float(ref.pow(2).sum()), float(noise)


def sqnr(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum(ref^2) / sum((ref - approx)^2))``.

    ``inf`` when the two are identical; ``-inf`` when the reference is all zeros but the approximation is not.
    """
    return sqnr_from_powers(*signal_noise_powers(reference, approximation))


def top1_matches(reference: torch.Tensor, approximation: torch.Tensor) -> tuple[int, int]:
    """``(agreeing, total)``: how many rows have the same arg-max over the last dim in both tensors.

    Every leading position counts as one prediction (``[batch, classes]`` -> batch predictions,
    ``[batch, tokens, vocab]`` -> batch * tokens). Ties resolve to the first maximum in both.
    """
    if reference.shape != approximation.shape:
        raise ConfigError(f"top-1 agreement needs outputs of the same shape, got {tuple(reference.shape)} and "
                          f"{tuple(approximation.shape)}: compare a model with its own quantized copy")
    agree = reference.argmax(dim=-1) == approximation.argmax(dim=-1)
    return int(agree.sum()), agree.numel()


def top1_agreement(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Fraction of predictions (arg-max over the last dim) on which the two tensors agree, in ``[0, 1]``."""
    agree, total = top1_matches(reference, approximation)
    return agree / total if total else float("nan")


_FINITE_MEMO: contextvars.ContextVar[dict[int, tuple[weakref.ref, tuple]] | None] = contextvars.ContextVar(
    "monoquant_finite_memo", default=None)
"""Inside :func:`remembering_finite_checks`: ``id(t)`` -> (a weak reference to ``t``, its fingerprint) of the
tensors :func:`all_finite` found finite."""


def _fingerprint(t: torch.Tensor) -> tuple:
    """What changes when a tensor's values may have: its storage, version counter and view."""
    return (t.data_ptr(), t._version, t.dtype, tuple(t.shape), t.stride(), t.device)


@contextlib.contextmanager
def remembering_finite_checks(memo: dict | None = None) -> Iterator[dict]:
    """Inside, :func:`all_finite` remembers each tensor it found finite (with its storage, version counter and
    view) in ``memo`` (a new dict by default; pass the same one to several blocks) and does not scan it again:
    ``quantize_`` checks every weight while planning and ``from_float`` checks it again while building.

    Only around code of monoquant's own: a write through ``tensor.data`` does not move the version counter, so a
    NaN written that way between two checks would go unseen; outside this context every call scans."""
    token = _FINITE_MEMO.set({} if memo is None else memo)
    try:
        yield _FINITE_MEMO.get()
    finally:
        _FINITE_MEMO.reset(token)


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN and no +-inf: one read (``aminmax``, whose extremes NaN and +-inf reach) and no
    temporary the size of ``t`` (``isfinite(t).all()`` made a bool copy: 200 ms for a 4096x4096 float32 weight
    on 2 busy threads, against 12 ms). Inside :func:`remembering_finite_checks` a tensor found finite is not
    scanned again while its storage, version counter and view stay the same."""
    if not t.is_floating_point() or not t.numel():
        return True
    memo = _FINITE_MEMO.get()
    known = None if memo is None else memo.get(id(t))
    if known is not None and known[0]() is t and known[1] == _fingerprint(t):
        return True
    lo, hi = torch.aminmax(t.detach())
    finite = bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))
    if finite and memo is not None and not t.is_inference():  # inference tensors have no version counter
        memo[id(t)] = (weakref.ref(t), _fingerprint(t))
    return finite


def check_finite_weight(weight: torch.Tensor, layer: str, remedy: str) -> None:
    """Raise :class:`NonFiniteWeightError` naming ``layer`` when ``weight`` (or a slice of it) holds NaN or Inf.

    The one check shared by :func:`monoquant.quantize_` and ``monoquant quantize``; ``remedy`` says how to
    keep the layer in float with the caller's own options.
    """
    if not all_finite(weight):
        raise NonFiniteWeightError(f"layer {layer!r} has NaN or Inf in its weight; {remedy}")
