"""glibc's malloc, tuned for tensor work on the CPU.

By default glibc serves allocations over a (dynamic) threshold with fresh `mmap`s and returns freed
memory at the top of the heap to the system. A UNet step allocates and frees activations of a few
megabytes over and over, so each new tensor is fresh memory that page-faults on first touch:
measured here, a small conv model (benchmarks.samplers' stand-in UNet) ran 27-35 ms a call by
default and 17.6-18.2 ms with freed memory kept for reuse; the full `sd15` UNet at 256 px showed no
difference beyond noise (3.0 s a call either way). Raising both thresholds keeps it; the cost is
that the process holds on to up to `trim_threshold` of freed heap. The same can be had without code
through the MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ environment variables, which win when set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MIB = 1 << 20


def keep_freed_memory(mmap_threshold: int = 64 * MIB, trim_threshold: int = 256 * MIB) -> bool:
    """Apply the thresholds (glibc on Linux only); True when they took effect."""
    if not sys.platform.startswith("linux"):
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False  # the user chose
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
