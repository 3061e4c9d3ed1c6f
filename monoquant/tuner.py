"""Kernel choice by measurement: time the eligible kernels once per situation, remember the choice.

A *situation* is (kernel family, device, layer shape, row bucket, input dtype, compute dtype): the family is
the layer's scheme (``int4-g128-asym`` ...) plus how its input is quantized; the row bucket is the input row
count rounded up to a power of two (capped at 4096). At the first call in a new situation every eligible
candidate runs once to warm up (packed layouts are built, the compiled kernel is loaded) and is then timed on the
real input in two passes (:func:`decide`):

1. the first pass: rounds through all candidates, the fastest of ``TIMED_RUNS`` calls each (stopping early past
   ``TIME_BUDGET_S`` per candidate);
2. the second pass: the two fastest, and any other within ``RETIME_WITHIN`` of the fastest, timed again in
   alternating rounds (``RETIME_RUNS`` calls each, at least ``RETIME_MIN_RUNS``, stopping early past
   ``RETIME_BUDGET_S`` per contender), and the *median* call counts: a kernel with two speeds does not win by an
   occasional fast call, and the decision rests on ten calls rather than one.

On the second pass's medians :func:`fastest` decides: a candidate must beat the baseline -- the plain
dequantize + float path, always a candidate (with INT8 activations: the float layer on its float input,
``float_acts``) -- by more than ``MARGIN``, so a tuned choice is never slower than float as measured; among
those that do, the first in the candidates' order (the static table's preference) within ``MARGIN`` of the
fastest wins, so two kernels of the same speed do not take turns by timing noise. Candidates that are the
baseline plus extra work are never offered (``act_sim``, ``act_sim_conv``: the input's fake quantization in
front of the baseline's own kernel). Candidates that raise are dropped. What each choice was based on is kept
(:func:`measurements`).

Measured (``benchmarks/tuner_noise.py``, AMD EPYC Zen 4, 2 threads, ten fresh processes, the bf16 encoder's
nine layer situations): choices still differ between processes where two kernels run within a few percent of
each other in a long alternating measurement (the per-process spread of such a ratio is about +-2%, more calls
do not narrow it); the first calls cost about 1.5x the old single pass's timing. For the same choices in every
process, keep them in a file (``MONOQUANT_KERNEL_CACHE``, below).

Controls (all documented in the README):

- ``MONOQUANT_KERNEL=<name>`` or ``with mq.kernels.pin("<name>"):`` -- use that kernel wherever it is
  eligible (elsewhere the usual choice); ``pin("dequant")`` runs everything through the float path.
- ``MONOQUANT_TUNE=0`` or ``with mq.kernels.tuning(False):`` -- no timing: the static capability table of
  :mod:`monoquant.kernels` decides, which is deterministic. Inputs that need a gradient, and layers smaller
  than ``TUNE_MIN_WEIGHTS`` that keep no float weight (:func:`monoquant.kernels.kept_float_bytes`), always use
  the static table.
- ``MONOQUANT_KERNEL_CACHE=<path>`` (or ``default`` for ``~/.cache/monoquant/kernel_choices.json``) --
  also keep the choices in a small JSON file, under a key made of the CPU model and flags, the torch
  version and the monoquant version, so a later process on the same machine skips the timing. Off unless
  set. Delete the file, or call :func:`clear`, after changing hardware settings.

``MONOQUANT_KERNEL`` and ``MONOQUANT_TUNE`` are read once, when this module is imported (reading ``os.environ`` on
every layer call cost 2-4 us, as much as a small layer's matmul); after changing them in a running process, call
:func:`reload_environment` (``mq.kernels.reload_environment()``). The ``with`` forms need no reload.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from . import fused

TIMED_RUNS = 3
"""First pass: rounds of timed calls (the fastest call of each candidate counts), after one warm-up call each."""
TIME_BUDGET_S = 0.1
"""The first pass stops after the round that took it past this many seconds per candidate (large inputs:
one round)."""
RETIME_WITHIN = 0.08
"""The two fastest candidates of the first pass, and any other within this fraction of the fastest time, are
timed again (the second pass)."""
RETIME_RUNS = 10
"""Second pass: rounds of timed calls of the contenders (the median call of each counts)."""
RETIME_MIN_RUNS = 3
"""Second pass: rounds run whatever the budget."""
RETIME_BUDGET_S = 0.1
"""The second pass stops after the round (past ``RETIME_MIN_RUNS``) that took it past this many seconds per
contender."""
MARGIN = 0.03
"""A candidate replaces the baseline only when it is faster by more than this fraction, and another candidate
only when faster by more than this fraction than the first of them in order (the static preference)."""
TUNE_MIN_WEIGHTS = 1 << 16
"""Layers with fewer weights than this (256 x 256) keep their dequantized float weight where it fits
``kernels.FLOAT_WEIGHT_CACHE_BYTES`` and are timed against ``F.linear`` on it; those that keep none are not
timed: the static table decides."""
DEFAULT_CACHE = Path.home() / ".cache" / "monoquant" / "kernel_choices.json"

_STATE = threading.local()
_ENV: dict[str, object] = {}
"""``MONOQUANT_KERNEL`` (``"kernel"``: name or ``None``) and ``MONOQUANT_TUNE`` (``"tune"``: bool) as
:func:`reload_environment` last read them."""
measured_everywhere = True
"""Measured choices apply in every thread: neither variable overrides them and no :func:`pin` or :func:`tuning`
block is open in any thread (kept current by them; read, not written, elsewhere). While it holds, :func:`measured`
is one read, and a layer's call plan (:mod:`monoquant.call_plans`) need not ask it."""
_OPEN_BLOCKS = [0]
""":func:`pin` and :func:`tuning` blocks open now, in all threads."""
_LOCK = threading.RLock()
_CHOICES: dict[str, str] = {}
_MEASURED: dict[str, Measurement] = {}
"""Situation key -> what its choice in this process was based on (:func:`measurements`)."""
_FILE_LOADED: set[str] = set()


def row_bucket(rows: int) -> int:
    """``rows`` rounded up to a power of two, capped at 4096 (choices are shared within a bucket)."""
    return min(4096, 1 << max(0, rows - 1).bit_length())


# ---- controls -----------------------------------------------------------------------------------------
def reload_environment() -> None:
    """Read ``MONOQUANT_KERNEL`` and ``MONOQUANT_TUNE`` again (they are read once, at import: call this after
    changing them in a running process)."""
    _ENV["kernel"] = os.environ.get("MONOQUANT_KERNEL") or None
    _ENV["tune"] = os.environ.get("MONOQUANT_TUNE", "1").strip().lower() not in ("0", "false", "off", "no")
    _refresh_everywhere()


def _refresh_everywhere() -> None:
    global measured_everywhere
    with _LOCK:
        measured_everywhere = _ENV["kernel"] is None and bool(_ENV["tune"]) and not _OPEN_BLOCKS[0]


reload_environment()


def pinned() -> str | None:
    """The kernel pinned by :func:`pin` (innermost) or ``MONOQUANT_KERNEL``; ``None`` when nothing is pinned."""
    stack = _STATE.__dict__.get("pins")  # this thread's; getattr with a default raised inside: 0.43 -> 0.07 us
    if stack:
        return stack[-1]
    return _ENV["kernel"]  # type: ignore[return-value]


@contextlib.contextmanager
def pin(name: str | None) -> Iterator[None]:
    """Run kernel ``name`` wherever it is eligible inside the ``with`` block (``None``: unpin).

    Checked against :data:`monoquant.kernels.KERNELS` by the caller (:func:`monoquant.kernels.pin`).
    """
    with _pushed("pins", name):
        yield


def tuning_enabled() -> bool:
    """Whether kernels are chosen by measurement (default) or by the static table (``MONOQUANT_TUNE=0``)."""
    stack = _STATE.__dict__.get("tuning")  # this thread's; getattr with a default raised inside: 0.43 -> 0.07 us
    if stack:
        return stack[-1]
    return bool(_ENV["tune"])


def measured() -> bool:
    """Whether measured choices apply now: nothing pinned and tuning on (:func:`pinned` and :func:`tuning_enabled`
    in one call, for the per-call fast paths of the dispatch)."""
    if measured_everywhere:
        return True
    return pinned() is None and tuning_enabled()


@contextlib.contextmanager
def tuning(enabled: bool) -> Iterator[None]:
    """Turn measurement on or off inside the ``with`` block (off: the deterministic static table)."""
    with _pushed("tuning", enabled):
        yield


@contextlib.contextmanager
def _pushed(stack_name: str, value: object) -> Iterator[None]:
    """``value`` on top of this thread's stack ``stack_name`` for the ``with`` block."""
    stack = _STATE.__dict__.setdefault(stack_name, [])
    stack.append(value)
    global measured_everywhere
    with _LOCK:
        _OPEN_BLOCKS[0] += 1
        measured_everywhere = False
    try:
        yield
    finally:
        stack.pop()
        with _LOCK:
            _OPEN_BLOCKS[0] -= 1
        _refresh_everywhere()


def clear() -> None:
    """Forget every measured choice in this process (the cache file, if any, is left alone)."""
    with _LOCK:
        _CHOICES.clear()
        _MEASURED.clear()


def choices() -> dict[str, str]:
    """A copy of the measured choices of this process: situation key -> kernel name."""
    with _LOCK:
        return dict(_CHOICES)


def measurements() -> dict[str, Measurement]:
    """What each choice made in this process was based on: situation key -> :class:`Measurement` (choices read
    from the cache file have none)."""
    with _LOCK:
        return dict(_MEASURED)


# ---- choosing -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Measurement:
    """What one choice was based on (seconds per candidate, in the candidates' order)."""

    first: dict[str, float]
    """The first pass: the fastest of up to ``TIMED_RUNS`` calls of every candidate that ran."""
    retimed: dict[str, float]
    """The second pass: the median call of each of the first pass's :func:`contenders`, timed alternately; empty
    when one candidate ran."""


def fastest(timings: dict[str, float], baseline: str, margin: float | None = None) -> str:
    """The choice among ``timings`` (name -> seconds, in the order of preference: the static table's).

    A candidate qualifies only when it beats ``baseline`` by more than ``margin`` (default ``MARGIN``: a win within
    timing noise is not worth a different code path); among those that qualify, the first in order whose time is
    within ``margin`` of the fastest of them wins, so near-ties go to the static preference rather than to the
    noise. None qualifies: ``baseline``. A baseline missing from ``timings`` (clearly slower, not timed again)
    qualifies everything."""
    margin = MARGIN if margin is None else margin
    base = timings.get(baseline, float("inf"))
    qualified = [name for name, t in timings.items() if name != baseline and t < base * (1 - margin)]
    if not qualified:
        return baseline
    best = min(timings[name] for name in qualified)
    return next(name for name in qualified if timings[name] <= best * (1 + margin))


def contenders(first: dict[str, float]) -> list[str]:
    """The candidates a first pass leaves in question, in order: the two fastest, and any other within
    ``RETIME_WITHIN`` of the fastest time. The runner-up always: a kernel with two speeds can be fastest in a few
    calls (a first pass once had ``w8a8_int_mm`` 11% ahead of ``w8a8_vnni``, whose median it trails by 40%)."""
    ranked = sorted(first, key=first.__getitem__)
    best = first[ranked[0]]
    keep = {*ranked[:2], *(name for name, t in first.items() if t <= best * (1 + RETIME_WITHIN))}
    return [name for name in first if name in keep]


_clock = time.perf_counter
"""The clock the time budgets are read from (replaced in tests, with the timer)."""


def time_call(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(candidates: dict[str, Callable[[], object]], baseline: str,
            timer: Callable[[Callable[[], object]], float]) -> dict[str, float]:
    """The first pass: the fastest of up to ``TIMED_RUNS`` timed calls per candidate, after one warm-up call each.

    Rounds go through all candidates in turn, so that a burst of load from other processes slows them alike;
    they stop early once they took ``TIME_BUDGET_S`` per candidate. A candidate whose warm-up raises is
    dropped (the baseline's error propagates: it is what would run anyway)."""
    live: dict[str, Callable[[], object]] = {}
    for name, call in candidates.items():
        try:
            call()
        except Exception:
            if name == baseline:
                raise
            continue
        live[name] = call
    best = dict.fromkeys(live, float("inf"))
    start = _clock()
    for _ in range(TIMED_RUNS):
        for name, call in live.items():
            best[name] = min(best[name], timer(call))
        if _clock() - start > TIME_BUDGET_S * len(live):
            break
    return best


def retime(candidates: dict[str, Callable[[], object]], timer: Callable[[Callable[[], object]], float]
           ) -> dict[str, float]:
    """The second pass: the median of up to ``RETIME_RUNS`` timed calls per candidate (at least
    ``RETIME_MIN_RUNS``), one call of each per round, each round starting one candidate later so that none always
    runs after the same other (whose caches it would inherit); stops early past ``RETIME_BUDGET_S`` per
    candidate. A median, not a minimum: a kernel with two speeds (a fast call now and then) counts as the speed
    it usually runs at."""
    names = list(candidates)
    samples: dict[str, list[float]] = {name: [] for name in names}
    start = _clock()
    for r in range(RETIME_RUNS):
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(timer(candidates[name]))
        if r + 1 >= RETIME_MIN_RUNS and _clock() - start > RETIME_BUDGET_S * len(names):
            break
    return {name: statistics.median(ts) for name, ts in samples.items()}


def decide(candidates: dict[str, Callable[[], object]], baseline: str,
           timer: Callable[[Callable[[], object]], float]) -> tuple[str, Measurement]:
    """Time ``candidates`` (the first pass), time its :func:`contenders` again (the second pass) and choose with
    :func:`fastest` on the second pass's medians; returns the choice and what it was based on."""
    first = measure(candidates, baseline, timer)
    near = contenders(first)
    if len(near) == 1:  # the others raised
        return fastest(first, baseline), Measurement(first, {})
    retimed = retime({name: candidates[name] for name in near}, timer)
    return fastest(retimed, baseline), Measurement(first, retimed)


def choose(key: str, candidates: dict[str, Callable[[], object]], baseline: str,
           timer: Callable[[Callable[[], object]], float] | None = None) -> str:
    """The remembered choice for ``key``, else time ``candidates`` (name -> call, in the order of preference,
    ``baseline`` among them) with :func:`decide` and remember the choice.

    ``timer`` (one call -> seconds; default :func:`time_call`) is injectable for tests.
    """
    with _LOCK:
        _load_file()
        if key in _CHOICES and _CHOICES[key] in candidates:
            return _CHOICES[key]
        if len(candidates) == 1:
            return baseline
        choice, _MEASURED[key] = decide(candidates, baseline, timer or time_call)
        _CHOICES[key] = choice
        _save_file()
        return choice


# ---- the optional cache file --------------------------------------------------------------------------
def cache_path() -> Path | None:
    """The JSON file choices are kept in (``MONOQUANT_KERNEL_CACHE``), or ``None`` when not set."""
    value = os.environ.get("MONOQUANT_KERNEL_CACHE", "").strip()
    if value in ("", "0", "off"):
        return None
    return DEFAULT_CACHE if value == "default" else Path(value).expanduser()


def machine_key() -> str:
    """What measured choices depend on besides the situation: CPU model and flags, torch and monoquant."""
    try:
        version = importlib.metadata.version("monoquant")
    except importlib.metadata.PackageNotFoundError:  # a source checkout on PYTHONPATH
        version = "source"
    return f"{fused.cpu_identity()} | torch {torch.__version__} | monoquant {version}"


def _load_file() -> None:
    path = cache_path()
    if path is None or str(path) in _FILE_LOADED:
        return
    _FILE_LOADED.add(str(path))
    try:
        data = json.loads(path.read_text())
        saved = data.get(machine_key(), {})
    except (OSError, ValueError, AttributeError):
        return  # no file yet, or not ours: it is rewritten on the next choice
    _CHOICES.update({k: v for k, v in saved.items() if isinstance(k, str) and isinstance(v, str)})


def _save_file() -> None:
    path = cache_path()
    if path is None:
        return
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data[machine_key()] = dict(sorted(_CHOICES.items()))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home directory costs a re-measurement next time, nothing else
