"""Timing shared by the benchmarks: several callables timed alternately in the same rounds."""

from __future__ import annotations

import time
from collections.abc import Callable


def alternating_seconds(*fns: Callable[[], object], reps: int) -> list[list[float]]:
    """Seconds of ``reps`` calls of each of ``fns``, after two warm-up calls each, timed alternately (one call of
    each per round) so that a load burst on a shared machine hits them alike."""
    for f in (*fns, *fns):
        f()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for f, out in zip(fns, times):
            t0 = time.perf_counter()
            f()
            out.append(time.perf_counter() - t0)
    return times
