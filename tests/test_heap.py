"""The worker gives freed heap memory back to the OS (heap.trim_loop, glibc): memory freed
between blocks that stay alive leaves RSS only through malloc_trim."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from pgnotify_worker.heap import trimmer

SCRIPT = textwrap.dedent(
    """
    import asyncio, re
    from pgnotify_worker.heap import trim_loop

    def rss():
        status = open("/proc/self/status").read()
        return int(re.search(r"VmRSS:\\s+(\\d+)", status).group(1)) // 1024

    blocks = [bytes(2000) for _ in range(50_000)]  # ~100 MB from malloc's heap
    kept = blocks[::32]  # every 32nd stays alive: the freed ones between cannot go by themselves
    del blocks
    before = rss()

    async def main():
        task = asyncio.create_task(trim_loop(0.05))
        await asyncio.sleep(0.3)
        task.cancel()

    asyncio.run(main())
    print(before, rss(), len(kept))
    """
)


@pytest.mark.skipif(trimmer() is None, reason="no malloc_trim here (not glibc)")
def test_the_trim_loop_returns_freed_heap_pages() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True
    )
    before, after, _ = (int(v) for v in done.stdout.split())
    assert before > 80, before  # the freed blocks were still resident
    assert after < before - 50, (before, after)
