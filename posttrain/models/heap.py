"""Keep the memory of one generate call's oneDNN weight copies for the next call (glibc's malloc, Linux).

Why: `onednn_linear.onednn_linears` packs copies of a model's linear weights for each generate call and frees them
after. glibc hands freed memory at the top of its heap back to the system once it passes M_TRIM_THRESHOLD (64 MB once
its dynamic thresholds settle), so the next call's copies fault in every page afresh: for SmolLM2-135M's 480 MB of
copies, swapping in took 170-230 ms a call on the project's 2-core VM, 70-80 ms with the memory kept (a batch-8
generate call is ~1.5 s). `keep_freed(n)` raises the trim threshold by the copies' size, so the process keeps that
much freed memory for the next call, and pins the mmap threshold at 32 MB, where glibc's dynamic rule ends anyway
(setting either turns that rule off; chunks above it, such as a 113 MB LM head copy, are still mapped and unmapped
each call). Peak memory is unchanged (the copies lived during the call); between calls the process holds up to n
bytes more. Other C libraries (macOS, musl) are left alone; POSTTRAIN_KEEP_FREED=0 keeps glibc's defaults. No
library sets this for a process from inside, hence this module.
"""

from __future__ import annotations

import ctypes
import os

ENV = "POSTTRAIN_KEEP_FREED"  # "0": leave glibc's malloc settings alone
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
MMAP_THRESHOLD = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: where glibc's dynamic threshold stops
TRIM_BASE = 2 * MMAP_THRESHOLD  # glibc's dynamic trim threshold at that point
_INT_MAX = 2 ** 31 - 1  # mallopt takes an int

_kept = 0  # bytes this process already keeps


def _glibc():
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def keep_freed(nbytes: int) -> bool:
    """Let the process keep `nbytes` more of freed heap memory than glibc would (once: the largest asked for).
    True when the settings are (now) in place."""
    global _kept
    if os.environ.get(ENV, "1") == "0":
        return False
    if nbytes <= _kept:
        return True
    libc = _glibc()
    if libc is None:
        return False
    trim = min(TRIM_BASE + nbytes, _INT_MAX)
    if not (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, trim)):
        return False
    _kept = nbytes
    return True
