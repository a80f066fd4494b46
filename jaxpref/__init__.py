"""jaxpref: preference post-training (DPO, IPO, KTO, ORPO, SimPO, CPO) with LoRA in JAX."""
from __future__ import annotations

import os as _os


def _keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process (one arena, no mmap'd blocks, no trimming).

    XLA:CPU allocates each execution's temporaries with malloc (about 0.9 GB for one quickstart
    micro-batch: the scan's stacked residuals and the LM head's logits). glibc serves blocks that
    large with a fresh mmap and unmaps them on free, so every step page-faulted ~220k zeroed pages:
    0.4-0.65 s of kernel time per micro-batch, 7-10% of the step's CPU time (docs/performance.md).
    With these settings the next step reuses the same pages. The cost: the process keeps its peak
    heap until it exits, and glibc's fragmentation can add up to twice the temporaries to it (+0 to +1.4 GiB on the
    quickstart). On this project's shared 2-core machine the saved kernel time did not show in the
    wall time, so it is opt-in: JAXPREF_MALLOC_TUNING=1 (read when jaxpref is first imported, which
    must precede the first XLA computation). Returns whether the settings were applied."""
    if _os.environ.get("JAXPREF_MALLOC_TUNING", "0") != "1":
        return False
    from jaxpref.host_memory import glibc

    libc = glibc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
    ok = libc.mallopt(m_arena_max, 1) == 1
    ok &= libc.mallopt(m_mmap_max, 0) == 1
    ok &= libc.mallopt(m_trim_threshold, 2**31 - 1) == 1
    return bool(ok)


MALLOC_TUNED = _keep_freed_memory()
