"""glibc's allocator, where the process has one: handing freed heap memory back to the OS."""
from __future__ import annotations

import ctypes
import os
import platform
import sys


def glibc():
    """The C library as a ctypes handle on glibc Linux, else None."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def release_free_memory() -> bool:
    """Hand the heap memory freed so far back to the operating system (glibc `malloc_trim`).

    XLA's compiler frees a few hundred MB when it finishes, but glibc keeps them in the process;
    the step's own temporaries then come on top. Trimming between the two lowers the peak RSS of a
    quickstart run by about 0.2 GB. Returns whether anything was done (glibc Linux only)."""
    libc = glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


MALLOC_TUNED = False  # whether `tune_malloc` applied its settings in this process


def tune_malloc() -> bool:
    """Make glibc keep freed memory in the process (one arena, no mmap'd blocks, no trimming).

    XLA:CPU allocates each execution's temporaries with malloc (about 0.9 GB for one quickstart
    micro-batch: the scan's stacked residuals and the LM head's logits). glibc serves blocks that
    large with a fresh mmap and unmaps them on free, so every step page-faulted ~220k zeroed pages:
    0.4-0.65 s of kernel time per micro-batch, 7-10% of the step's CPU time (docs/performance.md).
    With these settings the next step reuses the same pages. The cost: the process keeps its peak
    heap until it exits, and glibc's fragmentation can add up to twice the temporaries to it (+0 to +1.4 GiB on the
    quickstart). On this project's shared 2-core machine the saved kernel time did not show in the
    wall time, so it is opt-in: JAXPREF_MALLOC_TUNING=1 (read by the command lines before any XLA
    computation; call it first in a script of your own). Returns whether the settings were applied."""
    global MALLOC_TUNED
    if MALLOC_TUNED:
        return True
    if os.environ.get("JAXPREF_MALLOC_TUNING", "0") != "1":
        return False
    libc = glibc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
    ok = libc.mallopt(m_arena_max, 1) == 1
    ok &= libc.mallopt(m_mmap_max, 0) == 1
    ok &= libc.mallopt(m_trim_threshold, 2**31 - 1) == 1
    MALLOC_TUNED = bool(ok)
    return MALLOC_TUNED
