"""Kernel choice by measurement: time the eligible kernels once per situation, remember the fastest.

A *situation* is (kernel family, device, layer shape, row bucket, input dtype, compute dtype): the family is
the layer's scheme (``int4-g128-asym`` ...) plus how its input is quantized; the row bucket is the input row
count rounded up to a power of two (capped at 4096). At the first call in a new situation every eligible
candidate runs once to warm up (packed layouts are built, the compiled kernel is loaded) and is then timed
on the real input, in rounds through all candidates (the best of ``TIMED_RUNS`` calls each, stopping early
past ``TIME_BUDGET_S``); the fastest wins if it beats the baseline -- the plain dequantize + float path,
always a candidate (with INT8 activations: the float layer on its float input, ``float_acts``) -- by more than
``MARGIN``, otherwise the baseline runs, so a tuned choice is never slower than float as measured. Candidates
that raise are dropped.

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
import importlib.metadata
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from . import fused

TIMED_RUNS = 5
"""Rounds of timed calls (the fastest call of each candidate counts), after one warm-up call each."""
TIME_BUDGET_S = 0.1
"""Timing stops after the round that took the rounds past this many seconds per candidate (large inputs:
one round)."""
MARGIN = 0.05
"""A candidate replaces the baseline only when it is faster by more than this fraction."""
TUNE_MIN_WEIGHTS = 1 << 16
"""Layers with fewer weights than this (256 x 256) keep their dequantized float weight where it fits
``kernels.FLOAT_WEIGHT_CACHE_BYTES`` and are timed against ``F.linear`` on it; those that keep none are not
timed: the static table decides."""
DEFAULT_CACHE = Path.home() / ".cache" / "monoquant" / "kernel_choices.json"

_STATE = threading.local()
_ENV: dict[str, object] = {}
"""``MONOQUANT_KERNEL`` (``"kernel"``: name or ``None``) and ``MONOQUANT_TUNE`` (``"tune"``: bool) as
:func:`reload_environment` last read them."""
_LOCK = threading.RLock()
_CHOICES: dict[str, str] = {}
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
    try:
        yield
    finally:
        stack.pop()


def clear() -> None:
    """Forget every measured choice in this process (the cache file, if any, is left alone)."""
    with _LOCK:
        _CHOICES.clear()


def choices() -> dict[str, str]:
    """A copy of the measured choices of this process: situation key -> kernel name."""
    with _LOCK:
        return dict(_CHOICES)


# ---- choosing -----------------------------------------------------------------------------------------
def fastest(timings: dict[str, float], baseline: str) -> str:
    """The candidate with the smallest time if it beats ``baseline`` by more than ``MARGIN``, else ``baseline``
    (a tie, or a win within timing noise, is not worth a different code path)."""
    best = min(timings, key=timings.__getitem__)
    if best != baseline and timings[best] < timings[baseline] * (1 - MARGIN):
        return best
    return baseline


def time_call(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(candidates: dict[str, Callable[[], object]], baseline: str,
            timer: Callable[[Callable[[], object]], float]) -> dict[str, float]:
    """Fastest of up to ``TIMED_RUNS`` timed calls per candidate, after one warm-up call each.

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
    start = time.perf_counter()
    for _ in range(TIMED_RUNS):
        for name, call in live.items():
            best[name] = min(best[name], timer(call))
        if time.perf_counter() - start > TIME_BUDGET_S * len(live):
            break
    return best


def choose(key: str, candidates: dict[str, Callable[[], object]], baseline: str,
           timer: Callable[[Callable[[], object]], float] | None = None) -> str:
    """The remembered choice for ``key``, else time ``candidates`` (name -> call) and remember the fastest.

    ``baseline`` must be among the candidates; ``timer`` (one call -> seconds; default :func:`time_call`)
    is injectable for tests.
    """
    with _LOCK:
        _load_file()
        if key in _CHOICES and _CHOICES[key] in candidates:
            return _CHOICES[key]
        if len(candidates) == 1:
            return baseline
        _CHOICES[key] = choice = fastest(measure(candidates, baseline, timer or time_call), baseline)
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
