"""Timing shared by the benchmarks: several callables timed alternately in the same rounds."""

from __future__ import annotations

import random
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
