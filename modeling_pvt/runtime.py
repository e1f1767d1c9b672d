"""Process-wide settings that make PVT (and PyTorch CPU work in general) faster; nothing here runs on import.

The memory allocator
--------------------
glibc's `malloc` hands every freed block larger than its mmap threshold (at most 32 MiB with the default dynamic
threshold) straight back to the kernel, and trims the heap when more than the trim threshold is free at its top. A PVT
forward pass at batch 16 through stock transformers allocates and frees several such blocks (each stage-1 MLP
activation of PVT-small is 16 x 3136 x 512 floats = 98 MiB), so every call maps fresh pages and the kernel zero-fills
about 1 GiB of them again. Raising both thresholds keeps freed blocks in the process for the next call
(`scripts/benchmark.py` runs every model with these settings, so that no comparison comes from the allocator alone).
The price: memory freed by PyTorch is not returned to the operating system while the process lives (its resident size
stays at its high-water mark), which suits a training or inference process and is why this is an explicit call rather
than something `import modeling_pvt` does.

Three equivalent ways to get it, most to least convenient:

1. Call `configure_allocator()` at the start of your program (our command-line scripts do), before the large
   allocations you want to keep. It uses `mallopt`, so it only acts on glibc (Linux); elsewhere it does nothing and
   returns False.
2. Set the environment of the process before it starts: `allocator_environment()` gives the variables
   (`MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_`, read by glibc at start-up), e.g.
   `MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824 python your_script.py`.
3. Preload another allocator that caches large blocks itself, e.g.
   `LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 python your_script.py` (Debian package `libjemalloc2`) or
   tcmalloc (`libtcmalloc-minimal4`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

logger = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# Blocks up to this size stay in the heap after `free`; the heap keeps up to this much free memory at its top.
DEFAULT_ALLOCATOR_THRESHOLD_BYTES = 1 << 30

_applied: dict[str, int] = {}


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def configure_allocator(
    mmap_threshold: int = DEFAULT_ALLOCATOR_THRESHOLD_BYTES, trim_threshold: int = DEFAULT_ALLOCATOR_THRESHOLD_BYTES
) -> bool:
    """Keep freed blocks up to `mmap_threshold` bytes in the process (glibc `mallopt`), so large tensors that are
    allocated and freed on every forward pass are not re-mapped and zero-filled by the kernel each time.

    Affects the whole process from the call on (allocations made before it keep their placement). Returns True when
    both settings were applied, False where the C library is not glibc or refused them. Calling it again with other
    values replaces the earlier ones.
    """
    libc = _glibc()
    if libc is None:
        logger.info("configure_allocator: not a glibc system; allocator left as it is.")
        return False
    applied = bool(libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, int(trim_threshold))
    )
    if applied:
        _applied.update(mmap_threshold=int(mmap_threshold), trim_threshold=int(trim_threshold))
        logger.info("glibc allocator: mmap threshold %d B, trim threshold %d B.", mmap_threshold, trim_threshold)
    else:
        logger.warning("glibc refused mallopt(%d, %d); allocator left as it is.", M_MMAP_THRESHOLD, mmap_threshold)
    return applied


def allocator_environment(threshold: int = DEFAULT_ALLOCATOR_THRESHOLD_BYTES) -> dict[str, str]:
    """Environment variables that give a new process the same allocator settings from its start (glibc)."""
    return {"MALLOC_MMAP_THRESHOLD_": str(int(threshold)), "MALLOC_TRIM_THRESHOLD_": str(int(threshold))}


def allocator_settings() -> dict[str, object]:
    """What this process runs with: thresholds set by `configure_allocator`, the glibc environment variables and any
    preloaded library (for benchmark records)."""
    names = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD")
    return {
        "libc": "-".join(platform.libc_ver()),
        "configured_by_mallopt": dict(_applied),
        "environment": {name: os.environ[name] for name in names if name in os.environ},
    }


__all__ = [
    "DEFAULT_ALLOCATOR_THRESHOLD_BYTES",
    "allocator_environment",
    "allocator_settings",
    "configure_allocator",
]
