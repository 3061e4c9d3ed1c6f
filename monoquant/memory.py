"""Handing freed memory back to the operating system between layers.

glibc's ``malloc`` serves a large block from ``mmap`` (returned to the system by ``free``) until a block of that
size is freed; it then raises its mmap threshold to that size (up to 32 MiB), and later blocks up to it come from
the heap, where freed pages stay in the process. Quantizing layer after layer, each layer's temporaries (tens of
MB) are freed into the heap between the quantized buffers of the layers kept, and the process's resident size
grows with every layer although nothing is leaked (measured: 16 ``Linear(2048, 2048)`` with RTN peaked 347 MB
above the float model for 36 MB of output; with the freed pages returned, 167 MB, i.e. one layer's temporaries +
the output). :func:`release_freed_memory` returns them (``malloc_trim(0)``, a few milliseconds) where glibc is the
allocator, and does nothing elsewhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to do
        return None


def release_freed_memory() -> None:
    """Give the pages ``malloc`` holds free back to the operating system (glibc ``malloc_trim(0)``; else a no-op)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
