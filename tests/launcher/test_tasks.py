"""``TaskOwner``: the gateway's background tasks (probes, bring-ups, stops) have one owner. One task's
failure is logged and leaves the others running; ``close()`` ends every task, also one that swallows a
cancellation once; nothing is started after it."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from coldstart.launcher.tasks import TaskOwner


def test_a_failed_task_is_logged_the_others_go_on_and_close_ends_them_all(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        owner = TaskOwner()
        running = asyncio.Event()

        async def fails() -> None:
            raise ValueError("bring-up failed")

        async def probes() -> None:
            running.set()
            await asyncio.Event().wait()

        async def stubborn() -> None:  # swallows the first cancellation, as a wait_for race can
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()
            await asyncio.Event().wait()

        failing = owner.spawn(fails(), "bring-up r1")
        probing = owner.spawn(probes(), "probe r2")
        stopping = owner.spawn(stubborn(), "stop r3")
        await running.wait()
        await asyncio.wait([failing])
        await asyncio.sleep(0)
        assert not probing.done() and len(owner) == 2  # the failed one is gone, the others run
        await asyncio.wait_for(owner.close(), 10)
        assert probing.done() and stopping.done()
        with pytest.raises(RuntimeError, match="closed"):
            owner.spawn(probes(), "late")

    with caplog.at_level(logging.ERROR, logger="coldstart.lifecycle"):
        asyncio.run(main())
    assert any(
        "bring-up r1" in r.getMessage() and "bring-up failed" in r.getMessage() for r in caplog.records
    )
