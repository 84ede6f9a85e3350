"""memory.py: freed heap goes back to the system after a turn, as the app's soak needs."""

from __future__ import annotations

import threading
from pathlib import Path

from speechgpt_app import memory

BLOCK = 4096  # bytes: malloc'd from an arena (below the mmap threshold), not by Python's small-object allocator
BLOCKS = 40_000  # about 160 MB


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _fragment_a_thread_arena() -> list[bytes]:
    """Allocate ~160 MB in a worker thread (its own arena, as a turn's is) and free all but every
    100th block, so the freed memory sits between live blocks and no heap top can shrink."""
    kept: list[bytes] = []

    def work() -> None:
        blocks = [bytes(BLOCK) + bytes([i % 251]) for i in range(BLOCKS)]
        kept.extend(blocks[::100])
        del blocks

    t = threading.Thread(target=work)
    t.start()
    t.join()
    return kept


def test_release_freed_returns_a_fragmented_arena_to_the_system() -> None:
    before = _rss_mib()
    kept = _fragment_a_thread_arena()
    held = _rss_mib() - before
    assert held > 80, f"the freed blocks should still be resident before trimming (+{held:.0f} MiB)"
    assert memory.release_freed()
    after = _rss_mib() - before
    assert after < held / 3, f"resident memory after trimming: +{after:.0f} MiB of +{held:.0f} MiB"
    assert len(kept) == BLOCKS // 100


def test_arena_cap_takes_effect() -> None:
    assert memory.limit_arenas(memory.SERVER_ARENAS)
