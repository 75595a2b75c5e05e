"""Process-level settings that make CPU tensor work fast without changing any number.

glibc's malloc hands blocks above a dynamic threshold (128 KiB at start) back to the kernel
with munmap, and trims the heap top whenever more than twice that is free. PyTorch's CPU
allocator sits on malloc, so a forward pass whose activations are a few MB gets fresh
zero-filled pages from the kernel at every call: one page fault per 4 KiB, each time. In a
fresh process that made the reference CNN's forward over 100 images 3x slower (1.06 s vs
0.36 s for 100 forwards, `benchmarks/allocator.py`), and the penalty comes and goes with
whatever the process allocated before, which also makes timings irreproducible.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 128 << 20
_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_tuned: bool | None = None


def tune_allocator(
    mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD
) -> bool:
    """Let freed tensor memory up to `mmap_threshold` bytes be reused instead of returned to
    the kernel; True when glibc took the settings.

    The CLI calls this once at start; Python users call it once before heavy work. The cost
    is memory: up to `trim_threshold` bytes of freed heap stay with the process. Nothing is
    changed when the user already set glibc's own MALLOC_MMAP_THRESHOLD_ or
    MALLOC_TRIM_THRESHOLD_ (their choice wins), or off glibc (macOS, Windows, musl).
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _ENV):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # the trim threshold first: setting it also freezes glibc's dynamic mmap threshold
    ok = mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    ok = mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 and ok
    _tuned = ok
    return ok
