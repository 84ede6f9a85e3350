"""The server process's memory: give glibc's freed heap back to the system between turns.

A turn allocates and frees many short-lived buffers (audio, features, logits, spectrograms) from
whichever thread runs it. glibc keeps freed memory in per-thread arenas (up to eight per core) and
returns little of it, so a long-running app's resident memory climbs in steps as new threads and
larger prompts come along, although nothing leaks. Capping the arenas and trimming after each turn
keeps it flat. Both are no-ops where the C library is not glibc (macOS, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # mallopt's parameter number for the arena cap (glibc's malloc.h)
SERVER_ARENAS = 2  # arenas for the app's process: turns run on a handful of worker threads


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None  # glibc only


def limit_arenas(n: int = SERVER_ARENAS) -> bool:
    """Cap glibc's malloc arenas at `n` for the rest of the process; True when it took effect."""
    libc = _glibc()
    ok = libc is not None and libc.mallopt(M_ARENA_MAX, n) == 1
    log.debug("malloc arenas capped at %d: %s", n, ok)
    return ok


def release_freed() -> bool:
    """Return freed heap pages of every arena to the system (glibc's malloc_trim); True if any were."""
    libc = _glibc()
    return libc is not None and libc.malloc_trim(0) == 1
