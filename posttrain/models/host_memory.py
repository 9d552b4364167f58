"""Freed host memory stays in the process (glibc malloc), so every training step, and every generate call's
oneDNN weight copies, reuse resident pages.

A training step allocates and frees the same large tensors again and again (activations, their
gradients, logits chunks, bf16 casts of weights). With glibc's defaults an allocation above the
dynamic mmap threshold (128 KB, rising to at most 32 MB) is a fresh mmap returned to the kernel
when freed, and a free block at the top of the heap above the trim threshold is handed back too:
the next step's tensors then land on new pages, and each 4 KB page costs a page fault (zeroing,
and under a hypervisor an exit) on first touch. Measured on the one-row SFT-LoRA step of
SmolLM2-135M (benchmarks/README.md): 26-34 thousand minor faults per step in fp32 and 73-78
thousand under bf16 autocast; with these settings ~1.3 thousand, and the same peak RSS. A generate
call packs oneDNN copies of the linear weights and frees them after (models/onednn_linear.py): swapping
SmolLM2-135M in took 170-230 ms a call with glibc's defaults, 70-80 ms with these settings (a batch-8
call is ~1.5 s), so `swap_in` applies them too.

`mallopt(M_MMAP_MAX, 0)` serves every allocation from the heap (glibc still falls back to mmap if
the heap cannot grow) and `M_TRIM_THRESHOLD` at 2 GiB keeps freed memory for reuse. jemalloc or
tcmalloc (Intel's launcher preloads one) would do the same job but are system libraries that must be
preloaded with LD_PRELOAD before the process starts; mallopt works in-process on the glibc that every
Linux torch wheel runs on. Nothing is changed when the user set any MALLOC_*_ environment
variable (their settings win), POSTTRAIN_KEEP_FREED=0, a training config's `keep_freed_memory: false`
(for the rest of the process), or the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("posttrain")
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h>
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest it accepts
ENV = "POSTTRAIN_KEEP_FREED"  # "0": glibc's defaults
_choice: bool | None = None  # a training config's keep_freed_memory, once one was given
_applied = False


def retain_freed_memory(enabled: bool | None = None) -> bool:
    """Apply the settings above to this process (once); True when they are in place. `enabled=False` (a training
    config's choice) keeps glibc's defaults, also for later calls that do not say."""
    global _choice, _applied
    if enabled is not None:
        _choice = enabled
    if _choice is False or os.environ.get(ENV) == "0":
        return False
    if _applied:
        return True
    if any(key.startswith("MALLOC_") and key.endswith("_") for key in os.environ):
        log.debug("MALLOC_*_ set in the environment: glibc malloc left as configured there")
        return False
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only (musl and macOS have no mallopt of this meaning)
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _applied = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
