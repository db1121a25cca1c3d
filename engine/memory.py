"""The C allocator's thresholds, pinned once per process so that a scan costs the same in every process.

glibc serves a request of at least its mmap threshold with fresh pages of its own mapping, and a
fresh page costs a page fault (the kernel zeroes it) on first touch. The threshold starts at
128 KiB and rises to the size of each mapped block freed (up to 32 MiB), and freed heap memory
above the trim threshold (twice the mmap threshold once it moved) goes back to the kernel. So the
same operator costs what the process's allocation history says: a convolution scan's 2 MiB output
blocks (storage/layers/conv.py) fault on every block in a process that never freed a larger
mapped block and reuse heap memory in one that did. Measured on VGG16 conv1's batch_average (3 -> 64
channels at 32 x 32, 8-sample blocks, one thread): 230-300 us per sample with 470 page faults per
block in a fresh process, 77-85 us and no fault after one convolution backward (a capture's
training step frees larger blocks), or with the thresholds pinned. The cost model's calibration and
a query ran in processes with different histories (the benchmark's PRAGMA right after a capture, a
user's query in a new process), so conv1's estimate came out up to 5x off its measurement.

`pin_thresholds` sets the state glibc itself reaches after freeing one 32 MiB mapped block (mmap
threshold 32 MiB, trim threshold 64 MiB, no dynamic change afterwards) at the first connect, so
calibration and queries see one regime from their first allocation on. A process keeps up to
MMAP_THRESHOLD x 2 of freed heap memory instead of returning it. Not done where the allocator is
not glibc, where the user set either threshold (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_,
GLIBC_TUNABLES), or with METAQL_PIN_MALLOC=0.
"""
from __future__ import annotations

import ctypes
import os
import threading

ENV_KEY = "METAQL_PIN_MALLOC"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3        # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 * 2 ** 20       # glibc's own ceiling for the dynamic threshold (64-bit)
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD     # what glibc sets with it when the threshold moves

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}      # "pinned": True / the reason it was not


def pin_thresholds() -> bool:
    """Pins glibc's mmap and trim thresholds (module docstring) once per process; True when they
    are pinned (now or before), False where it is not done (`why_not` says why)."""
    with _LOCK:
        if "pinned" not in _STATE:
            reason = _reason_not()
            if not reason:
                libc = _glibc()
                ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and \
                    libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
                reason = "" if ok else "mallopt refused the thresholds"
            _STATE["pinned"] = not reason
            _STATE["why"] = reason
        return bool(_STATE["pinned"])


def why_not() -> str:
    """Why the thresholds were not pinned ('' when they were or pin_thresholds was not called)."""
    return str(_STATE.get("why", ""))


def _reason_not() -> str:
    if os.environ.get(ENV_KEY, "1").strip().lower() in ("0", "false", "off", "no"):
        return f"{ENV_KEY}=0"
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")) or \
            "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "the user set the allocator's thresholds"
    if _glibc() is None:
        return "the C allocator is not glibc's"
    return ""


def _glibc():
    """The process's C library when it is glibc (it has gnu_get_libc_version and mallopt), else
    None: the symbols already loaded (dlopen of the program itself), no library search."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version, libc.mallopt     # noqa: B018 - AttributeError where not glibc
    except (OSError, AttributeError, TypeError):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc
