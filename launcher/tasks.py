"""``TaskOwner``: every background task of the gateway has this owner, and ``close()`` ends them all.

asyncio's ``TaskGroup`` would cancel every sibling when one task fails, which is wrong for independent
replicas (one failed bring-up must not stop another deployment's probes), so this is the equivalent owner
with per-task failure: a task's exception is logged, the others go on; ``close()`` cancels and awaits each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("coldstart.lifecycle")


class TaskOwner:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self.closed = False

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        if self.closed:
            coro.close()
            raise RuntimeError(f"cannot start {name!r}: its owner is closed")
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("task %s failed: %r", task.get_name(), exc, exc_info=exc)

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        """Cancel every task and wait for each to end."""
        self.closed = True
        for task in list(self._tasks):
            # Cancelled until done: Python 3.11's wait_for swallows a cancellation that arrives as its
            # inner future completes (gh-86296), and a task that goes on must not hang the shutdown.
            while not task.done():
                task.cancel()
                await asyncio.wait([task], timeout=1.0)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                task.result()
