"""What a format's kernels see and declare: the layer's :class:`QuantWeight` and the :class:`KernelCandidate`.

A format lists the low-bit kernels that can run its stored layout in :meth:`WeightSpec.kernel_candidates`
(torchao's ``implements``, in one method): each candidate says when it applies (``eligible``, asked with a
:class:`KernelQuery`: shape, group, rows, device, compute dtype, gradient; the CPU features come from
:mod:`monoquant.hardware`), which repacked layouts it caches on the weight (``layouts``) and how it computes
(``run``, one callable). :mod:`monoquant.kernels` adds the shared candidates every format has (dequantize +
matmul), the tuner times whatever is eligible, and nothing outside the format knows its layout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .base import Stored, WeightSpec


@dataclass(frozen=True)
class KernelQuery:
    """The situation a kernel candidate is asked about."""

    n: int
    """Output features (rows of the ``[N, K]`` weight)."""
    k: int
    """Input features."""
    group_size: int | None
    device: torch.device
    rows: int
    """Input rows of this call (``x.numel() // K``)."""
    compute_dtype: torch.dtype | None
    """The dtype the layer was asked to compute in (``None``: the kernel's natural one)."""
    needs_grad: bool
    """The input requires a gradient (only the differentiable dequantize paths apply)."""
    input_dtype: torch.dtype | None = None
    """The input's dtype where the dispatcher knows it (``None``: unknown, e.g. the report's static guess)."""

    @property
    def low_bit_ok(self) -> bool:
        """Whether a kernel that computes in bf16 may run: no other compute dtype forced, no gradient wanted."""
        return self.compute_dtype in (None, torch.bfloat16) and not self.needs_grad


@dataclass(eq=False)
class KernelCandidate:
    """One low-bit kernel a format can run (see the module docstring).

    ``run(weight, x2d)`` takes the layer's :class:`QuantWeight` and the input as ``[rows, K]`` and returns the
    ``[rows, N]`` product without the bias (any float dtype; the dispatcher adds the bias and casts).
    Candidates with ``int8_inputs=True`` run on INT8 input codes instead: ``run(weight, x2d, act, bias)``
    quantizes ``x2d`` with the layer's activation quantizer ``act`` and returns the finished ``[rows, N]``
    output, bias included. Candidates with ``fuses_bias=True`` take the layer's bias too, ``run(weight, x2d,
    bias)`` (``None`` when the layer has none), and add it before their output's rounding. ``fallback``
    candidates (an exact but slow reference) are only offered when no other INT8-input candidate is eligible, and
    are then used without timing. The row limits are plain attributes, so a benchmark may move them
    (``bench_linear.py --crossover``).
    """

    name: str
    run: Callable[..., torch.Tensor]
    eligible: Callable[[QuantWeight, KernelQuery], bool]
    max_rows: int | None = None
    """Largest row count the static table (tuning off) sends to it; ``None``: any."""
    tune_max_rows: int | None = None
    """Largest row count at which it is timed as a candidate (its time grows with rows); ``None``: any."""
    layouts: tuple[str, ...] = ()
    """Keys of the repacked weights it caches on the :class:`QuantWeight` (freed when it runs nowhere)."""
    int8_inputs: bool = False
    fuses_bias: bool = False
    fallback: bool = False
    bind: Callable[[QuantWeight], Callable[..., torch.Tensor]] | None = None
    """Optionally, for a ``fuses_bias`` or ``int8_inputs`` candidate: ``bind(weight)`` returns ``call(x2d, bias)``
    (``call(x2d, act, bias)``), the same output as ``run(weight, x2d, bias)`` (``run(weight, x2d, act, bias)``)
    for a contiguous float32 ``x2d`` and a contiguous float32 ``bias`` (or ``None``), with what ``run`` looks up
    on every call (the compiled function, the buffers, layouts derived from them) looked up once. What a
    remembered call plan (:mod:`monoquant.call_plans`) runs: a 1-row call of a small layer is a few
    microseconds, and ``run``'s conversions and lookups cost as much again."""


class QuantWeight:
    """A quantized layer's weight as its kernels see it: format, resolved group size, ``[N, K]`` shape, the
    stored buffers (read on each use from the layer's buffer dict, ``buffers``, so ``state_dict``, ``.to()`` and
    loading keep working) and everything derived from them -- dequantization parameters per dtype, repacked kernel
    layouts, tuned choices (``cache``), call plans (``plan``) -- plus what the kernels recorded: ``last_kernel`` and
    ``ran`` (row bucket -> the kernel ``forward`` last ran there). The layer owns exactly one; nothing else writes
    kernel state onto the layer.
    """

    def __init__(self, fmt: WeightSpec, group_size: int | None, shape2d: tuple[int, int],
                 buffers: Mapping[str, torch.Tensor | None]) -> None:
        self.format = fmt
        self.group_size = group_size
        self.shape2d = shape2d
        self.buffers = buffers
        """The layer's buffers by name (its ``_buffers`` dict, read live: what a bound kernel reads per call)."""
        self.cache: dict[Any, Any] = {}
        self.plan: Any = None
        """The call plan last made or run (:mod:`monoquant.call_plans`), checked before the others in ``cache``."""
        self._last_kernel: str | None = None
        self.ran: dict[int, str] = {}
        self.recorded: Any = None
        """The call plan whose run :attr:`last_kernel` and :attr:`ran` show now (:mod:`monoquant.call_plans`
        records a plan's run once, not on every call); any other record clears it."""

    @property
    def last_kernel(self) -> str | None:
        """The kernel the layer's last ``forward`` ran."""
        return self._last_kernel

    @last_kernel.setter
    def last_kernel(self, name: str | None) -> None:
        self._last_kernel = name
        self.recorded = None

    def record_run(self, name: str, bucket: int | None) -> None:
        """Record that kernel ``name`` ran: as :attr:`last_kernel`, and in :attr:`ran` under ``bucket`` (a row or
        batch bucket of :func:`monoquant.tuner.row_bucket`; ``None`` for a calibration pass, which is not what the
        layer runs once frozen)."""
        self.last_kernel = name
        if bucket is not None:
            self.ran[bucket] = name

    @property
    def stored(self) -> Stored:
        """The stored buffers (the format's ``stored_type``)."""
        buffers = self.buffers
        stored_type = self.format.stored_type
        return stored_type._make([buffers[name] for name in stored_type._fields])

    @property
    def device(self) -> torch.device:
        return self.stored.qweight.device

    def cached(self, key: Any, make: Callable[[], Any]) -> Any:
        """The cached value for ``key`` (a repacked layout, parameters...), built by ``make`` at first use."""
        cache = self.cache
        if key not in cache:
            with torch.inference_mode(False), torch.no_grad():
                cache[key] = make()
        return cache[key]

    def clear_cache(self) -> None:
        """Forget everything derived from the buffers (they changed or moved)."""
        self.cache.clear()
        self.plan = self.recorded = None

    def __getstate__(self) -> dict[str, Any]:
        """A copy or pickle (``copy.deepcopy(model)``, ``torch.save(model)``) keeps the measured choices and what
        ran, not what is derived from the buffers: repacked layouts and kept float weights are rebuilt at first
        use, and the per-input call plans (functions that hold this weight's tensors) are left out. Copied with
        them, a copy's plans ran the original's weights after the original was loaded with new ones, and a
        pickle failed on them."""
        state = self.__dict__.copy()
        state["cache"] = {key: value for key, value in self.cache.items() if isinstance(value, str)}
        state["plan"] = state["recorded"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Load a copy or pickle, also one written before ``recorded`` existed (``last_kernel`` was a plain
        attribute then)."""
        state = dict(state)
        state.setdefault("_last_kernel", state.pop("last_kernel", None))
        state.setdefault("recorded", None)
        self.__dict__.update(state)

    def candidates(self) -> tuple[KernelCandidate, ...]:
        """The low-bit kernels this weight's format registered."""
        return self.format.kernel_candidates()

    # ---- dequantization ---------------------------------------------------------------------------------
    def dequant_params(self, dtype: torch.dtype) -> tuple:
        """The format's dequantization parameters in ``dtype``, computed once per dtype and cached."""
        return self.cached(("dequant", dtype), lambda: self.format.dequant_params(self.stored, dtype))

    def output_scale(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The per-output-row scale in ``dtype`` that ``dequantize_into(..., scaled=False)`` leaves out, or
        ``None`` when the format has none."""
        return self.format.output_scale(self.dequant_params(dtype))

    def dequantize_into(self, out: torch.Tensor, row_start: int = 0, scratch: torch.Tensor | None = None,
                        *, scaled: bool = True) -> torch.Tensor:
        """Write output rows ``row_start : row_start + len(out)`` of the ``[N, K]`` weight into ``out``: the
        format's compiled path when it has one for this output (:meth:`WeightSpec.compiled_dequantize_into`),
        else its one dequantization (:meth:`WeightSpec.dequantize_into`)."""
        stored = self.stored
        done = self.format.compiled_dequantize_into(out, stored, row_start, self.group_size, scaled)
        if done is not None:
            return done
        return self.format.dequantize_into(out, stored, row_start, self.dequant_params(out.dtype),
                                           self.group_size, scratch, scaled=scaled)

    def dequantize_rows(self, dtype: torch.dtype, rows: slice | None = None) -> torch.Tensor:
        """Output rows ``rows`` (all by default) of the float ``[N, K]`` weight in ``dtype``, freshly allocated."""
        n, k = self.shape2d
        rows = rows or slice(None)
        n_rows = len(range(*rows.indices(n)))
        out = torch.empty(n_rows, k, dtype=dtype, device=self.device)
        return self.dequantize_into(out, rows.start or 0)


def flat(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[rows, K]`` (a 2-D ``x`` itself: a reshape is a dispatch on every small layer's call)."""
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def bf16_rows(x2d: torch.Tensor) -> torch.Tensor:
    """``[rows, K]`` activations as contiguous bf16, what the packed kernels take."""
    return x2d.to(torch.bfloat16).contiguous()
