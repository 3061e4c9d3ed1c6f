"""Observers: modules that collect statistics and turn them into scales and zero-points.

Protocol: ``forward(x)`` updates statistics held in buffers and returns ``x`` unchanged;
``calculate_qparams(qtype, granularity)`` returns ``(scale, zero_point)`` (float64, int64);
``reset()`` forgets everything; ``sync(group)`` all-reduces the statistics across ``torch.distributed`` ranks.
The framework calls ``configure(qtype, granularity)`` before the first ``forward`` so that the observer knows
how to reduce what it sees.

Inputs: empty tensors are ignored; float16/bfloat16 inputs are observed in float32; ``+-inf`` values are
ignored with a :class:`NonFiniteInputWarning` (dropped for per-tensor statistics, replaced by 0 for per-channel
and per-group ones, which never changes a range since every range includes 0); a NaN raises
:class:`~monoquant.CalibrationError` naming the layer.

Writing your own: subclass :class:`Observer`, register statistics as buffers in ``__init__``, implement
``_observe(x)`` (``x`` is float32 and finite) and ``_qparams(qtype)``, and ``_sync(group)`` for distributed use.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from . import functional as F
from . import fused
from .errors import CalibrationError, ConfigError
from .qtypes import PerChannel, PerGroup, PerTensor, QType

Granularity = PerTensor | PerChannel | PerGroup


class NonFiniteInputWarning(UserWarning):
    """An observer saw ``+-inf`` values and ignored them."""


def distributed_ready() -> bool:
    """True when ``torch.distributed`` is initialised (so ``sync`` has something to do)."""
    return dist.is_available() and dist.is_initialized()


def apply_keeping_dtypes(module: nn.Module, fn, recurse: bool = True, names: Iterable[str] | None = None) -> nn.Module:
    """``nn.Module._apply`` that moves this module's own buffers (those in ``names``, default all) to ``fn``'s
    device but never changes their dtype: ``model.half()`` must not round statistics, scales or qparams.

    A buffer on the meta device has no data to move: it becomes an uninitialised tensor on the new device,
    as ``to_empty`` does for every other tensor."""
    own = {n: module._buffers.pop(n) for n, b in list(module._buffers.items())
           if b is not None and (names is None or n in names)}
    try:
        nn.Module._apply(module, fn, recurse)
    finally:
        for name, buf in own.items():
            device = fn(buf.new_empty(0)).device
            moved = torch.empty_like(buf, device=device) if buf.is_meta else buf.to(device=device)
            module._buffers[name] = moved
    return module


class Observer(nn.Module):
    """Base class. Subclasses implement :meth:`_observe` and :meth:`_qparams`; buffers hold all state.

    ``name`` (set by :func:`monoquant.quantize_` to the layer it serves) appears in error messages.
    """

    def __init__(self) -> None:
        super().__init__()
        self.qtype: QType | None = None
        self.granularity: Granularity = PerTensor()
        self.name = ""
        self.register_buffer("seen", torch.tensor(False))
        self._batch_range: tuple[torch.Tensor, torch.Tensor] = (torch.tensor(0.0), torch.tensor(0.0))

    def configure(self, qtype: QType, granularity: Granularity | None = None) -> Observer:
        """Fix the target format and the granularity of statistics; returns ``self``."""
        self.qtype = qtype
        self.granularity = granularity or PerTensor()
        return self

    @property
    def has_seen_data(self) -> bool:
        return bool(self.seen)

    def _apply(self, fn, recurse: bool = True):
        return apply_keeping_dtypes(self, fn, recurse)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # statistics take their shape from the data (per-channel min/max...): adopt the saved shapes
        for name, buf in self._buffers.items():
            saved = state_dict.get(prefix + name)
            if buf is not None and isinstance(saved, torch.Tensor) and saved.shape != buf.shape:
                self._buffers[name] = torch.empty(saved.shape, dtype=buf.dtype, device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _where(self) -> str:
        return f"{type(self).__name__} of layer {self.name!r}" if self.name else type(self).__name__

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.numel():
            return x
        data = x.detach()
        data = data.float() if data.dtype != torch.float64 else data
        mn, mx = torch.aminmax(data)  # one pass: NaN and +-inf show up in the extremes
        if not (bool(torch.isfinite(mn)) and bool(torch.isfinite(mx))):
            data = self._drop_nonfinite(data)
            if data is None:
                return x
            mn, mx = torch.aminmax(data)
        self._batch_range = (mn, mx)
        self._observe(data)
        self.seen.fill_(True)
        return x

    def _drop_nonfinite(self, data: torch.Tensor) -> torch.Tensor | None:
        finite = torch.isfinite(data)
        if bool(torch.isnan(data).any()):
            raise CalibrationError(
                f"{self._where()} received NaN values; find where the NaN comes from (inputs, an earlier "
                "layer overflowing in float16) before calibrating"
            )
        warnings.warn(f"{self._where()} ignored {int((~finite).sum())} +-inf values", NonFiniteInputWarning,
                      stacklevel=3)
        if isinstance(self.granularity, PerTensor) and self._drops_nonfinite:
            data = data[finite]
            return data if data.numel() else None
        return torch.where(finite, data, torch.zeros((), dtype=data.dtype, device=data.device))

    _drops_nonfinite = True
    """Per-tensor observers get the finite values only (1-D); set False to get 0 in place of +-inf."""

    def calculate_qparams(
        self, qtype: QType | None = None, granularity: Granularity | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero-point for what was observed, in the configured (or given) format."""
        qtype = qtype or self.qtype
        if qtype is None:
            raise ConfigError(f"{type(self).__name__} has no qtype: call configure(qtype, granularity) first")
        if granularity is not None and granularity != self.granularity:
            raise ConfigError(
                f"{type(self).__name__} collected {self.granularity} statistics, cannot give {granularity} qparams"
            )
        if not self.has_seen_data:
            raise CalibrationError(f"{self._where()} has seen no data: run calibration batches first")
        return self._qparams(qtype)

    def reset(self) -> None:
        self.seen.fill_(False)

    def sync(self, group: dist.ProcessGroup | None = None) -> None:
        """All-reduce the statistics over ``group`` (all ranks by default) so every rank gets the same qparams.

        Collective: every rank must call it, for the same observers in the same order. A no-op when
        ``torch.distributed`` is not initialised.
        """
        if not distributed_ready():
            return
        self._sync(group)
        seen = self.seen.to(torch.int32)
        dist.all_reduce(seen, op=dist.ReduceOp.MAX, group=group)
        self.seen.fill_(bool(seen))

    def _observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def _qparams(self, qtype: QType) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _sync(self, group: dist.ProcessGroup | None) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not implement _sync(group)")

    def _require_all_seen(self, group: dist.ProcessGroup | None) -> None:
        """Per-channel/per-group statistics only have a shape once data was seen: every rank needs some."""
        seen = self.seen.to(torch.int32)
        dist.all_reduce(seen, op=dist.ReduceOp.MIN, group=group)
        if not bool(seen):
            raise CalibrationError(f"{self._where()}: some rank saw no data, so its {self.granularity} statistics "
                                   "cannot be combined; give every rank at least one calibration batch")

    def extra_repr(self) -> str:
        return f"qtype={self.qtype}, granularity={self.granularity}" if self.qtype else ""


class MinMaxObserver(Observer):
    """Running minimum and maximum (per tensor, channel or group as configured).

    ``sync`` takes the minimum of the minima and the maximum of the maxima over ranks.
    """

    _drops_nonfinite = False

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self._slot_range: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel and per-group statistics: the slots' extremes first, and the tensor's (and the NaN/+-inf
        check) from them, instead of one more pass over ``x``; anything non-finite takes the general path."""
        if isinstance(self.granularity, PerTensor) or not x.numel() or x.dim() < 2:
            return super().forward(x)
        data = x.detach()
        data = data.float() if data.dtype != torch.float64 else data
        mn, mx = F.minmax(data, self.granularity)
        lo, hi = mn.amin(), mx.amax()
        if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
            return super().forward(x)  # raises on NaN, replaces +-inf by 0 with a warning
        self._batch_range, self._slot_range = (lo, hi), (mn, mx)
        try:
            self._observe(data)
        finally:
            self._slot_range = None
        self.seen.fill_(True)
        return x

    def _batch_minmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.granularity, PerTensor):
            return self._batch_range  # computed once by forward()
        if self._slot_range is not None:
            return self._slot_range  # computed once by forward()
        return F.minmax(x, self.granularity)

    def _observe(self, x: torch.Tensor) -> None:
        mn, mx = self._batch_minmax(x)
        if not self.has_seen_data or self.min_val.shape != mn.shape:
            self.min_val = mn.clone()
            self.max_val = mx.clone()
        else:
            torch.minimum(self.min_val, mn, out=self.min_val)
            torch.maximum(self.max_val, mx, out=self.max_val)

    def _qparams(self, qtype: QType) -> tuple[torch.Tensor, torch.Tensor]:
        return F.qparams_from_minmax(self.min_val, self.max_val, qtype)

    def _sync(self, group: dist.ProcessGroup | None) -> None:
        if not isinstance(self.granularity, PerTensor):
            self._require_all_seen(group)
        dist.all_reduce(self.min_val, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(self.max_val, op=dist.ReduceOp.MAX, group=group)

    def reset(self) -> None:
        super().reset()
        self.min_val = torch.tensor(float("inf"), device=self.min_val.device)
        self.max_val = torch.tensor(float("-inf"), device=self.max_val.device)


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of each batch's min and max: ``m <- m + c * (batch_m - m)``.

    The first batch initialises the averages. ``averaging_constant`` (``c``, default 0.01) must be in (0, 1].
    ``sync`` replaces every rank's averages by their mean over the ranks that saw data (each rank's average
    already summarises its own batches; the mean weighs ranks equally).
    """

    def __init__(self, averaging_constant: float = 0.01) -> None:
        super().__init__()
        if not 0.0 < averaging_constant <= 1.0:
            raise ConfigError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        self.averaging_constant = averaging_constant

    def _observe(self, x: torch.Tensor) -> None:
        mn, mx = self._batch_minmax(x)
        if not self.has_seen_data or self.min_val.shape != mn.shape:
            self.min_val, self.max_val = mn.clone(), mx.clone()
            return
        c = self.averaging_constant
        self.min_val.add_(c * (mn - self.min_val))
        self.max_val.add_(c * (mx - self.max_val))

    def _sync(self, group: dist.ProcessGroup | None) -> None:
        if not isinstance(self.granularity, PerTensor):
            self._require_all_seen(group)
        seen = float(self.has_seen_data)
        stats = torch.stack([torch.where(self.seen, self.min_val, 0.0).double().reshape(-1),
                             torch.where(self.seen, self.max_val, 0.0).double().reshape(-1)])
        weight = torch.tensor([seen], dtype=torch.float64, device=stats.device)
        dist.all_reduce(stats, group=group)
        dist.all_reduce(weight, group=group)
        if weight.item() > 0:
            shape = self.min_val.shape
            self.min_val = (stats[0] / weight).reshape(shape).to(self.min_val.dtype)
            self.max_val = (stats[1] / weight).reshape(shape).to(self.max_val.dtype)

    def extra_repr(self) -> str:
        return f"averaging_constant={self.averaging_constant}, " + super().extra_repr()


def _exponent_for(lo: float, hi: float, bins: int, at_least: int | None = None) -> int:
    """Smallest ``e`` (>= ``at_least``) such that ``bins`` bins of width ``2**e`` aligned on multiples of it
    cover ``[lo, hi]``."""
    if hi > lo:
        e = math.ceil(math.log2((hi - lo) / bins))
    else:  # a single value: a width far below its magnitude (float32 data needs no finer)
        e = max(math.frexp(abs(lo))[1] - 40, -100)
    if at_least is not None:
        e = max(e, at_least)
    while math.floor(hi / 2.0**e) - math.floor(lo / 2.0**e) + 1 > bins:
        e += 1
    return e


def _regrid(hist: torch.Tensor, exponent: int, origin: int, new_exponent: int, new_origin: int) -> torch.Tensor:
    """Exact re-binning of aligned bins onto a coarser (or equal) aligned grid.

    Bin ``i`` of ``hist`` is ``[(origin + i) * 2**exponent, (origin + i + 1) * 2**exponent)``. Each new bin of
    width ``2**new_exponent`` is the union of whole old bins, so counts are moved, never split or smeared.
    """
    shift = new_exponent - exponent
    index = ((torch.arange(hist.numel(), device=hist.device) + origin) >> shift) - new_origin
    keep = hist != 0
    if bool(((index < 0) | (index >= hist.numel()))[keep].any()):
        raise CalibrationError("internal error: histogram re-binning target does not cover the data")
    out = torch.zeros_like(hist)
    return out.index_add_(0, index[keep], hist[keep])


HISTOGRAM_MODES = ("mse", "percentile", "entropy", "exact")


class HistogramObserver(Observer):
    """Per-tensor histogram of the values seen; ``mode`` decides how the range is chosen from it.

    Modes (when to use which):

    - ``"mse"`` (default): the range minimising the squared quantization error over the calibration values,
      after setting aside isolated extremes: on each side, the largest group of at most ``max_isolated``
      values (default 4, and at most 0.1% of all values) whose nearest member is more than ``isolation``
      (default 4) times as far from the median as every other value. A glitch (one value of 400 among 262144
      N(0,1) activations) then cannot decide the range, while a real heavy tail, whose extremes come in a
      continuum and recur at inference, keeps the range it needs: with no isolated group this is exactly
      ``"exact"``. Use it unless you have a reason not to.
    - ``"percentile"``: ``[q_low, q_high]`` with ``q_high`` the ``percentile``-th percentile of the values and
      ``q_low`` the ``(100 - percentile)``-th (symmetric qtypes: the ``percentile``-th percentile of ``|x|``),
      interpolated inside the bin; ``percentile=100`` is min/max. Simple and predictable: right when you know
      what fraction of the values may be clipped. It clips that fraction whatever it holds (with 0.1% of the
      values as outlier features, 99.99 clips a fifth of them) and never looks at the error, so on clean data
      it is a little below ``"mse"``.
    - ``"entropy"``: TensorRT-style KL calibration. For each candidate range, ``P`` is the histogram with the
      clipped counts added to the first/last bin inside the range and ``Q`` is the histogram as the quantizer
      sees it (the counts of the bins that share a code, spread over that code's non-empty bins; empty
      expected bins smoothed to 1e-4 count); the range minimising ``KL(P || Q)`` wins. It keeps the shape of
      the bulk and clips whatever mass the bulk's resolution does not need, so it suits networks whose rare
      large activations carry little (it clips real outlier features too: use ``"mse"`` for transformers
      with outlier channels). It can only judge ranges whose code step is at least one bin (TensorRT's
      128-bin floor), so when a few far values stretch the histogram it clips them only down to one bin per
      code: give it more ``bins`` then.
    - ``"exact"``: the squared error over the calibration values, nothing set aside (0.1.0's behaviour). Right
      when the calibration set's extremes recur at inference at the same rate; a single value can hold the
      range open (one 400 among 262144 N(0,1) values: scale 1.18 where ``"mse"`` gives 0.031).

    ``bins`` (default 2048) bins of width ``2**exponent`` sit on a fixed grid (bin ``i`` starts at
    ``(origin + i) * 2**exponent``); the width is the smallest power of two for which ``bins`` bins cover
    the running ``[min, max]``. A batch that widens the range first re-bins the existing counts onto the
    coarser common grid (merging whole bins: exact, no smearing), then adds its own counts over the same
    edges. So the histogram, and the qparams, depend only on the values seen, not on their order or on how
    they were split into batches or ranks; the range is resolved to at least ``bins / 2`` bins. The mode only
    changes ``calculate_qparams``: the state (buffers, ``state_dict``, ``sync``) is the same for every mode.

    The searching modes (``"mse"``, ``"exact"``, ``"entropy"``) evaluate candidate ranges: each end clipped by
    ratios on a geometric grid of ``candidates`` values, then refined between the best candidate's
    neighbours; for affine qtypes the two ends are searched alternately. The squared error is that of the
    actual quantizer (scale and zero-point rounding, clamping), integrated exactly over each bin with the
    bin's count spread uniformly across it, so code steps finer than a bin are judged correctly.
    ``sync`` re-bins every rank's histogram onto the grid of the union of the ranges and sums the counts:
    the result is identical to one process observing all the data.
    """

    def __init__(self, bins: int = 2048, candidates: int = 128, *, mode: str = "mse", percentile: float = 99.99,
                 max_isolated: int = 4, isolation: float = 4.0) -> None:
        super().__init__()
        if bins < 16 or candidates < 8:
            raise ConfigError(f"need bins >= 16 and candidates >= 8; got {bins}, {candidates}")
        if mode not in HISTOGRAM_MODES:
            raise ConfigError(f"HistogramObserver mode must be one of {HISTOGRAM_MODES}, got {mode!r}")
        if not 50.0 < percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {percentile}")
        if max_isolated < 0 or not isolation > 1.0:
            raise ConfigError(f"need max_isolated >= 0 and isolation > 1, got {max_isolated}, {isolation}")
        self.bins, self.candidates = bins, candidates
        self.mode, self.percentile = mode, float(percentile)
        self.max_isolated, self.isolation = int(max_isolated), float(isolation)
        self.register_buffer("histogram", torch.zeros(bins, dtype=torch.float64))
        self.register_buffer("min_val", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("max_val", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("exponent", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("origin", torch.tensor(0, dtype=torch.int64))

    def configure(self, qtype: QType, granularity: Granularity | None = None) -> HistogramObserver:
        if granularity is not None and not isinstance(granularity, PerTensor):
            raise ConfigError(f"HistogramObserver keeps per-tensor statistics, got {granularity}; use "
                              "MinMaxObserver or MSEObserver for per-channel or per-group qparams")
        super().configure(qtype, granularity)
        return self

    @property
    def bin_width(self) -> float:
        return 2.0 ** int(self.exponent)

    def _move_to(self, lo: float, hi: float, at_least: int | None) -> None:
        """Re-grid the histogram so it covers ``[lo, hi]`` (a superset of what it holds)."""
        e = _exponent_for(lo, hi, self.bins, at_least)
        origin = math.floor(lo / 2.0**e)
        if self.has_seen_data:
            self.histogram.copy_(_regrid(self.histogram, int(self.exponent), int(self.origin), e, origin))
        self.exponent.fill_(e)
        self.origin.fill_(origin)
        self.min_val.fill_(lo)
        self.max_val.fill_(hi)

    def _observe(self, x: torch.Tensor) -> None:
        x = x.reshape(-1)
        mn, mx = (float(v) for v in self._batch_range)
        if self.has_seen_data:
            self._move_to(min(mn, float(self.min_val)), max(mx, float(self.max_val)), int(self.exponent))
        else:
            self._move_to(mn, mx, None)
        # x * 2**-exponent is exact in x's dtype, so each value's bin depends on the value alone
        idx = torch.floor_(x * (1.0 / self.bin_width)).to(torch.int32).sub_(int(self.origin)).clamp_(0, self.bins - 1)
        self.histogram += torch.bincount(idx, minlength=self.bins).to(torch.float64)

    def _starts(self) -> torch.Tensor:
        """Left edge of every bin (float64, on the CPU)."""
        return self.bin_width * (torch.arange(self.bins, dtype=torch.float64) + int(self.origin))

    def _l2_objective(self, qtype: QType, keep: torch.Tensor):
        """``err(lo, hi)``: squared error of each candidate range over the bins in ``keep``, integrated exactly
        over every bin with the bin's count spread uniformly across it (the actual quantizer: rounding to the
        stored scale and zero-point, clamping to the codes)."""
        counts = self.histogram.cpu()
        width = self.bin_width
        starts = self._starts()[keep]
        density = counts[keep] / width

        def err(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
            scale, zero = F.qparams_from_minmax(lo, hi, qtype)
            s = scale.float().double()[:, None]  # evaluate with the scale that will be stored
            first, last = (qtype.qmin - zero[:, None]) * s, (qtype.qmax - zero[:, None]) * s
            low_edge, high_edge = first - s / 2, last + s / 2  # beyond these, values are clipped

            def rounding(x: torch.Tensor) -> torch.Tensor:  # an antiderivative of (x - s * round(x / s))**2
                n = torch.floor(x / s + 0.5)
                return s.pow(3) / 12 * n + ((x - s * n).pow(3) + s.pow(3) / 8) / 3

            def clipped(x: torch.Tensor) -> torch.Tensor:  # of the error past either edge, 0 between them
                above = (torch.maximum(x, high_edge) - last).pow(3)
                below = (first - torch.minimum(x, low_edge)).pow(3)
                return (above - below) / 3

            ends = starts + width
            inside = (rounding(torch.clamp(ends, low_edge, high_edge))
                      - rounding(torch.clamp(starts, low_edge, high_edge)))
            return (density * (inside + clipped(ends) - clipped(starts))).sum(-1)

        return err

    def _isolated(self) -> torch.Tensor:
        """Bins (a bool mask) of the extremes that ``"mse"`` sets aside: on each side, the largest group of at
        most ``max_isolated`` values (and at most 0.1% of all values) whose nearest member is more than
        ``isolation`` times as far from the median as every value not in the group."""
        counts, starts, width = self.histogram.cpu(), self._starts(), self.bin_width
        mask = torch.zeros(self.bins, dtype=torch.bool)
        limit = min(self.max_isolated, 1e-3 * float(counts.sum()))
        median = _quantile(counts, starts, width, 0.5)
        nonzero = counts.nonzero().flatten()
        for upper, outward in ((True, nonzero.flip(0)), (False, nonzero)):  # bin indices from that end inwards
            # distance from the median of each bin's edge nearest to it and of its edge farthest from it
            near = starts - median if upper else median - (starts + width)
            far = starts + width - median if upper else median - starts
            total, group = 0.0, 0
            for k in range(outward.numel() - 1):
                total += float(counts[outward[k]])
                if total > limit:
                    break
                inner = float(far[outward[k + 1]])  # every value not in the group is at most this far
                if inner > 0 and float(near[outward[k]]) > self.isolation * inner:
                    group = k + 1
            mask[outward[:group]] = True
        return mask

    def _entropy_objective(self, qtype: QType):
        """``err(lo, hi)``: TensorRT-style ``KL(P || Q)`` of each candidate range (``+inf`` where a code step
        is finer than a bin, which the histogram cannot judge)."""
        counts = self.histogram.cpu()
        keep = counts > 0
        centers = (self._starts() + 0.5 * self.bin_width)[keep]
        counts = counts[keep]
        total = float(counts.sum())
        levels = qtype.qmax - qtype.qmin + 1

        def err(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
            scale, zero = F.qparams_from_minmax(lo, hi, qtype)
            scale = scale.float().double()
            code = torch.round(centers / scale[:, None]) + zero[:, None]
            inside = (code >= qtype.qmin) & (code <= qtype.qmax)  # contiguous: codes grow with the bin
            p = torch.where(inside, counts, 0.0)
            first = inside.double().argmax(1, keepdim=True)
            last = counts.numel() - 1 - inside.flip(1).double().argmax(1, keepdim=True)
            p.scatter_add_(1, first, (counts * (code < qtype.qmin)).sum(1, keepdim=True))  # clipped counts land
            p.scatter_add_(1, last, (counts * (code > qtype.qmax)).sum(1, keepdim=True))  # on the edge bins
            slot = (code.clamp(qtype.qmin, qtype.qmax) - qtype.qmin).long()
            mass = torch.zeros(lo.numel(), levels, dtype=torch.float64).scatter_add_(1, slot, torch.where(
                inside, counts, 0.0))
            nonzero = torch.zeros_like(mass).scatter_add_(1, slot, (p > 0).double())
            q = mass.gather(1, slot) / nonzero.gather(1, slot).clamp_min(1.0) / mass.sum(1, keepdim=True)
            p = p / total
            q = torch.where(q > 0, q, 1e-4 / total)  # TensorRT's smoothing of empty expected bins
            kl = torch.where(p > 0, p * (p / q).log(), 0.0).sum(1)
            feasible = (scale >= self.bin_width) & inside.any(1)
            return torch.where(feasible, kl, float("inf"))

        return err

    def _percentile_range(self, qtype: QType) -> tuple[torch.Tensor, torch.Tensor]:
        counts, starts, width = self.histogram.cpu(), self._starts(), self.bin_width
        frac = self.percentile / 100.0
        if qtype.symmetric:  # 0 is a bin edge, so |x| folds bins onto bins exactly
            index = torch.arange(self.bins) + int(self.origin)
            folded = torch.where(index >= 0, index, -index - 1)
            counts = torch.zeros(int(folded.max()) + 1, dtype=torch.float64).index_add_(0, folded, counts)
            top = _quantile(counts, width * torch.arange(counts.numel(), dtype=torch.float64), width, frac)
            top = min(top, max(-float(self.min_val), float(self.max_val)))
            return torch.tensor(-top, dtype=torch.float64), torch.tensor(top, dtype=torch.float64)
        lo = max(_quantile(counts, starts, width, 1.0 - frac), float(self.min_val))
        hi = min(_quantile(counts, starts, width, frac), float(self.max_val))
        return torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)

    @staticmethod
    def _search(values: torch.Tensor, error_of) -> torch.Tensor:
        """The candidate (from ``values``, monotonic) with the lowest ``error_of``, refined on a 64-step grid
        between its two neighbours so the result is resolved finer than one histogram bin."""
        i = int(error_of(values).argmin())
        fine = torch.linspace(float(values[max(i - 1, 0)]), float(values[min(i + 1, values.numel() - 1)]), 65,
                              dtype=torch.float64)
        return fine[int(error_of(fine).argmin())]

    def _search_range(self, err, qtype: QType, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The range within ``[lo, hi]`` with the lowest ``err``."""
        ratios = torch.logspace(0, -3, self.candidates, dtype=torch.float64)
        if qtype.symmetric:
            best = self._search(max(abs(lo), abs(hi)) * ratios, lambda a: err(-a, a))
            return -best, best
        lo0, hi0 = min(lo, 0.0), max(hi, 0.0)
        best_lo, best_hi = torch.tensor(lo0, dtype=torch.float64), torch.tensor(hi0, dtype=torch.float64)
        for _ in range(2):  # coordinate search: the upper end, then the lower end, twice
            best_hi = self._search(hi0 * ratios, lambda h, lo_=best_lo: err(lo_.expand_as(h), h))
            best_lo = self._search(lo0 * ratios, lambda v, hi_=best_hi: err(v, hi_.expand_as(v)))
        return best_lo, best_hi

    def _qparams(self, qtype: QType) -> tuple[torch.Tensor, torch.Tensor]:
        if float(self.max_val) <= float(self.min_val):
            return F.qparams_from_minmax(self.min_val.cpu(), self.max_val.cpu(), qtype)
        if self.mode == "percentile":
            lo, hi = self._percentile_range(qtype)
        elif self.mode == "entropy":
            lo, hi = self._search_range(self._entropy_objective(qtype), qtype, float(self.min_val),
                                        float(self.max_val))
        else:
            keep = self.histogram.cpu() > 0
            lo, hi = float(self.min_val), float(self.max_val)
            if self.mode == "mse":
                keep &= ~self._isolated()
                kept = keep.nonzero().flatten()
                starts = self._starts()
                lo = max(lo, float(starts[kept[0]]))
                hi = min(hi, float(starts[kept[-1]]) + self.bin_width)
            lo, hi = self._search_range(self._l2_objective(qtype, keep), qtype, lo, hi)
        return F.qparams_from_minmax(lo.reshape(()), hi.reshape(()), qtype)

    def _sync(self, group: dist.ProcessGroup | None) -> None:
        seen = self.has_seen_data
        neg_inf = float("-inf")
        stats = torch.tensor([-float(self.min_val) if seen else neg_inf, float(self.max_val) if seen else neg_inf,
                              float(self.exponent) if seen else neg_inf], dtype=torch.float64,
                             device=self.histogram.device)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=group)
        lo, hi, e = -float(stats[0]), float(stats[1]), float(stats[2])
        if e == neg_inf:  # no rank saw data
            return
        self._move_to(lo, hi, int(e))  # an empty histogram (unseen rank) just takes the common grid
        dist.all_reduce(self.histogram, group=group)

    def reset(self) -> None:
        super().reset()
        self.histogram.zero_()
        for buf in (self.min_val, self.max_val, self.exponent, self.origin):
            buf.zero_()

    def extra_repr(self) -> str:
        mode = {"percentile": f"percentile={self.percentile}",
                "mse": f"max_isolated={self.max_isolated}, isolation={self.isolation}"}
        details = f", {mode[self.mode]}" if self.mode in mode else ""
        return f"bins={self.bins}, mode={self.mode!r}{details}, " + super().extra_repr()


def _quantile(counts: torch.Tensor, starts: torch.Tensor, width: float, frac: float) -> float:
    """The value below which ``frac`` of the histogram's counts lie, interpolated linearly inside its bin."""
    cum = counts.cumsum(0)
    target = frac * float(cum[-1])
    i = min(int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64))[0]), counts.numel() - 1)
    before = float(cum[i - 1]) if i else 0.0
    inside = (target - before) / float(counts[i]) if float(counts[i]) > 0 else 0.0
    return float(starts[i]) + width * min(max(inside, 0.0), 1.0)


CLIP_SEARCH_ELEMENTS = 1 << 22
"""Most ``candidates x values`` the PyTorch clipping search holds at once (float64: 32 MiB per temporary); the
compiled search converts at most this many values to float64 at once."""


def clip_errors(slots: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, ratios: torch.Tensor,
                qtype: QType) -> torch.Tensor:
    """float64 ``[C, S]``: the summed squared error of fake-quantizing each row of ``slots`` (``[S, L]``) with
    the qparams of ``[r * lo, r * hi]`` for each of the ``C`` ``ratios`` (``lo``/``hi``: ``[S]``).

    The compiled kernel (:func:`monoquant.fused.mse_clip_errors`, one pass per slot and candidate) runs on CPU
    when it is built; else the PyTorch ops do, vectorised over slots and candidates in chunks of at most
    :data:`CLIP_SEARCH_ELEMENTS`. Both compute every element's error with the float64 formulas of
    :mod:`monoquant.functional`; only the summation order differs.
    """
    s, width = slots.shape
    errs = torch.empty(ratios.numel(), s, dtype=torch.float64, device=slots.device)
    if slots.device.type == "cpu" and fused.available():
        rows, ratios = max(1, CLIP_SEARCH_ELEMENTS // max(width, 1)), ratios.double().contiguous()
        for r0 in range(0, s, rows):  # float64 copies of at most CLIP_SEARCH_ELEMENTS values at a time
            errs[:, r0:r0 + rows] = fused.mse_clip_errors(
                slots[r0:r0 + rows].double().contiguous(), lo[r0:r0 + rows].contiguous(),
                hi[r0:r0 + rows].contiguous(), ratios, qtype.qmin, qtype.qmax, qtype.symmetric, F.SCALE_EPS)
        return errs
    slots = slots.double()
    rows = max(1, CLIP_SEARCH_ELEMENTS // max(width * ratios.numel(), 1))
    cands = ratios.numel() if rows > 1 else max(1, CLIP_SEARCH_ELEMENTS // max(width, 1))
    for r0 in range(0, s, rows):
        x = slots[r0:r0 + rows]
        for c0 in range(0, ratios.numel(), cands):
            r = ratios[c0:c0 + cands].reshape(-1, 1)
            scale, zero = F.qparams_from_minmax(lo[r0:r0 + rows] * r, hi[r0:r0 + rows] * r, qtype)
            approx = F.fake_quantize(x, scale.float().double().unsqueeze(-1), zero.unsqueeze(-1), qtype)
            errs[c0:c0 + cands, r0:r0 + rows] = (x - approx).pow_(2).sum(-1)
    return errs


class MSEObserver(MinMaxObserver):
    """Searches a clipping ratio per qparam slot (tensor, channel or group) minimising the squared error.

    For each of ``grid`` ratios ``r`` evenly spaced in ``[1 - max_shrink, 1]``, the candidate range is
    ``[r * min, r * max]`` of the running min/max; each batch adds, for every slot and candidate, the squared
    reconstruction error of quantizing that batch with those qparams. ``calculate_qparams`` returns the best
    candidate per slot. Meant for weights (one tensor: the search is exact); for activations the error of
    every batch is judged against the running range at that time.
    """

    def __init__(self, grid: int = 64, max_shrink: float = 0.6) -> None:
        super().__init__()
        if grid < 2 or not 0.0 < max_shrink < 1.0:
            raise ConfigError(f"need grid >= 2 and 0 < max_shrink < 1, got {grid}, {max_shrink}")
        self.grid, self.max_shrink = grid, max_shrink
        self.register_buffer("errors", torch.zeros(0, dtype=torch.float64))

    def _ratios(self) -> torch.Tensor:
        return torch.linspace(1.0, 1.0 - self.max_shrink, self.grid, dtype=torch.float64)

    def _observe(self, x: torch.Tensor) -> None:
        super()._observe(x)
        if self.qtype is None:
            raise ConfigError(f"{type(self).__name__} needs configure(qtype, granularity) before it sees data")
        view = F.group_view(x if x.dim() >= 2 else x.reshape(1, -1), self.granularity).double()
        if isinstance(self.granularity, PerTensor):
            view = view.reshape(1, 1, -1)
        elif view.dim() == 2:
            view = view.unsqueeze(1)
        slots = view.reshape(-1, view.shape[-1])
        lo, hi = self.min_val.double().reshape(-1), self.max_val.double().reshape(-1)
        errs = clip_errors(slots, lo, hi, self._ratios().to(view.device), self.qtype)
        errs = errs.reshape(self.grid, *self.min_val.shape)
        self.errors = errs if self.errors.shape != errs.shape else self.errors + errs

    def _qparams(self, qtype: QType) -> tuple[torch.Tensor, torch.Tensor]:
        if qtype != self.qtype:
            raise ConfigError(f"MSEObserver searched for {self.qtype}, cannot give {qtype} qparams")
        best = self._ratios().to(self.errors.device)[self.errors.argmin(0)]
        return F.qparams_from_minmax(self.min_val.double() * best, self.max_val.double() * best, qtype)

    def _sync(self, group: dist.ProcessGroup | None) -> None:
        super()._sync(group)
        dist.all_reduce(self.errors, group=group)

    def reset(self) -> None:
        super().reset()
        self.errors = torch.zeros(0, dtype=torch.float64, device=self.errors.device)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, max_shrink={self.max_shrink}, " + super().extra_repr()
