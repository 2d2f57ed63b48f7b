"""Fixed thread pools: ThreadPoolExecutors whose threads all start at once."""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Callable, Optional


def start_thread_pool(count: int, prefix: str, loop: Optional[Callable[[], None]] = None
                      ) -> concurrent.futures.ThreadPoolExecutor:
    """A ThreadPoolExecutor with all its threads started now, so the count stays fixed;
    with loop, each thread then runs loop() for its whole life."""
    executor = concurrent.futures.ThreadPoolExecutor(count, thread_name_prefix=prefix)
    barrier = threading.Barrier(count + 1)

    def started() -> None:
        barrier.wait(10)
        if loop is not None:
            loop()

    for _ in range(count):
        executor.submit(started)
    barrier.wait(10)
    return executor
