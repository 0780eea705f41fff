"""Freed memory kept for reuse: the CPU's cost of fresh pages for every large tensor, removed.

glibc's ``malloc`` serves an allocation above its mmap threshold (at most 32 MiB) with pages of its own, mapped
for that allocation and unmapped when it is freed. On the CPU an eager attention layer of a batch of 16 prompts of
about 600 tokens makes several probability tensors of hundreds of MiB, so every layer of every forward maps them
again, and the kernel zero-fills each page on first touch: measured on `pope`'s batches, about 40% of the process's
CPU time was the kernel's (some 600,000 page faults a batch). :func:`reuse_freed_memory` asks glibc (``mallopt``)
to serve every allocation from its heap and to keep freed memory (the heap's free top is given back only above
2 GiB), so a tensor freed by one layer is reused by the next: the same batch then took about half its wall time,
with the same numbers (only where memory comes from changes, not any arithmetic). The process keeps about its peak
memory until it ends instead of returning it between layers.

The command line calls it once at start (``mclcbf-diag``), as do the benchmarks and the tests; a notebook may call
it in its first cell. Where the C library is not glibc (macOS, musl) it does nothing. The environment variables
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<bytes>`` do the same for any process started with them.
"""

from __future__ import annotations

import ctypes
import functools

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt's parameters (glibc's malloc.h)
NEVER_TRIM = 2**31 - 1  # the largest threshold mallopt's int takes: keep what is freed (up to 2 GiB at the top)


@functools.cache
def reuse_freed_memory() -> bool:
    """Serve every allocation from the heap and keep freed memory for reuse (glibc); see the module docstring.

    Returns:
        True when glibc accepted both settings; False where the C library has no ``mallopt`` (not glibc).
    """
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded in this process, the C library's among them
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: musl has a mallopt that ignores these
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
