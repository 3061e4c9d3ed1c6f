"""Timing shared by the benchmarks: several callables timed alternately in the same rounds."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable


def alternating_seconds(*fns: Callable[[], object], reps: int, shuffled: bool = False) -> list[list[float]]:
    """Seconds of ``reps`` calls of each of ``fns``, after two warm-up calls each, timed alternately (one call of
    each per round) so that a load burst on a shared machine hits them alike.

    ``shuffled=True`` calls them in a new order each round (a fixed seed), so that each follows each of the others
    about equally often: a call that leaves the caches cold for the next one (a bf16 model's oneDNN kernels did, by
    25 us on a 160 us model at batch 1) then slows them all alike, not whichever always came after it."""
    for f in (*fns, *fns):
        f()
    times: list[list[float]] = [[] for _ in fns]
    order = list(range(len(fns)))
    rng = random.Random(0)
    for _ in range(reps):
        if shuffled:
            rng.shuffle(order)
        for i in order:
            t0 = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - t0)
    return times


def alternating_blocks(*fns: Callable[[], object], calls: int, blocks: int) -> list[float]:
    """Seconds per call of each of ``fns`` called ``calls`` times in a row (its code and data warm, as a model
    served in a loop), the median of each block's median over ``blocks`` blocks, the functions' blocks alternating
    (in reversed order every other block) so that a load burst hits them alike. :func:`alternating_seconds`
    measures each call right after the others' instead (several models served in turn)."""
    for f in fns:
        f()
    medians: list[list[float]] = [[] for _ in fns]
    order = list(range(len(fns)))
    for b in range(blocks):
        for i in (order if b % 2 == 0 else order[::-1]):
            times = []
            for _ in range(calls):
                t0 = time.perf_counter()
                fns[i]()
                times.append(time.perf_counter() - t0)
            medians[i].append(statistics.median(times))
    return [statistics.median(m) for m in medians]
