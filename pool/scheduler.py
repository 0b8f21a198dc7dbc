"""The pool: a buffer of idle, health-checked units, and the acquire/release API the launcher uses.

``Pool.acquire`` hands out the fastest unit there is: an idle healthy one from the buffer; when the buffer is
empty it asks the provider for one more and waits (up to ``timeout``). ``Pool.release`` takes a unit back:
it is re-checked and returned to the buffer, or handed back to the provider when the buffer is already at
its target, or dropped when it failed. The pool keeps the buffer at ``target_idle`` in the background
(``set_target`` changes it, e.g. from the LP in ``sizing.py``).

Every background task (bring-ups, the monitor) belongs to the pool and is cancelled and awaited by
``close()``; a bring-up that fails leaves its unit FAILED then RELEASED, never lost. Health checks are
blocking NVML calls and run in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from coldstart.pool.errors import (
    AcquireTimeoutError,
    CapacityError,
    IllegalTransitionError,
    PoolClosedError,
    PoolError,
)
from coldstart.pool.inventory import Inventory, Unit
from coldstart.pool.providers.base import Provider
from coldstart.pool.states import UnitState

log = logging.getLogger("coldstart.pool")

S = UnitState
_COMING = (S.REQUESTED, S.BOOTING, S.HEALTH_CHECKING)


class Pool:
    def __init__(
        self,
        provider: Provider,
        *,
        target_idle: int = 1,
        type_name: str | None = None,
        monitor_every_s: float = 5.0,
        deep_check_every_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.provider = provider
        self.type_name = type_name or provider.default_type()
        self.target_idle = max(0, target_idle)
        self.monitor_every_s = monitor_every_s
        self.deep_check_every_s = deep_check_every_s
        self.inventory = Inventory(clock)
        self._clock = clock
        self._idle: list[Unit] = []  # FIFO of healthy idle units: the buffer
        self._checked_at: dict[str, float] = {}
        self._waiting = 0
        self._out_of_capacity = False
        self._cond: asyncio.Condition | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._monitor: asyncio.Task[None] | None = None
        self._closed = False
        # Called with (unit, reason) when passive monitoring fails an ASSIGNED unit: stop that replica.
        self.on_failure: list[Callable[[Unit, str], None]] = []

    @property
    def kind(self) -> str:
        """'gpu' or 'cpu': what replicas placed on this pool's units run on."""
        return self.provider.kind

    # -- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._cond = asyncio.Condition()
        self._monitor = asyncio.get_running_loop().create_task(self._monitor_loop(), name="pool-monitor")
        self._grow()

    async def __aenter__(self) -> Pool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Cancel and await every task, hand every unit back, close the provider. Idempotent."""
        if self._closed:
            return
        self._closed = True
        tasks = list(self._tasks) + ([self._monitor] if self._monitor else [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for unit in list(self.inventory.units.values()):
            if unit.state is S.ASSIGNED:
                self.inventory.move(unit, S.DRAINING, "pool closing")
            if unit.state in (S.REQUESTED, S.BOOTING, S.HEALTH_CHECKING):
                self.inventory.move(unit, S.FAILED, "pool closed during bring-up")
            if unit.state is not S.RELEASED:
                await self._hand_back(unit, "pool closed")
        self._idle.clear()
        self.provider.close()

    # -- the scheduler API ---------------------------------------------------------------------------------
    async def acquire(self, timeout: float | None = None) -> Unit:
        """An idle healthy unit, now if the buffer has one; else wait for a new or released one."""
        cond = self._require_open()
        start = self._clock()
        async with cond:
            self._waiting += 1
            try:
                self._grow()
                try:
                    async with asyncio.timeout(timeout):
                        await cond.wait_for(lambda: bool(self._idle) or self._closed)
                except TimeoutError:
                    raise AcquireTimeoutError(self._timeout_message(timeout)) from None
                if self._closed:
                    raise PoolClosedError("the pool was closed while waiting for a unit")
                unit = self._idle.pop(0)
                self.inventory.move(unit, S.ASSIGNED, f"acquired after {self._clock() - start:.3f}s")
            finally:
                self._waiting -= 1
        self._grow()  # refill the buffer behind us
        return unit

    async def release(self, unit: Unit, *, failed: str | None = None) -> None:
        """Take a unit back from a replica that stopped. ``failed``: the replica saw the GPU break."""
        cond = self._require_open()
        if unit.state is S.ASSIGNED:
            self.inventory.move(unit, S.DRAINING, "replica stopped")
        if failed and unit.state is not S.FAILED:
            self.inventory.move(unit, S.FAILED, failed)
        if unit.state is S.FAILED:
            await self._hand_back(unit, "failed")
        elif unit.state is not S.DRAINING:
            raise IllegalTransitionError(f"cannot release unit {unit.id} in state {unit.state.value}")
        elif len(self._idle) >= self.target_idle + self._waiting:
            await self._hand_back(unit, "buffer at target")
        else:
            self.inventory.move(unit, S.HEALTH_CHECKING, "back from a replica")
            if await self._check(unit, deep=False):
                async with cond:
                    self._idle.append(unit)
                    cond.notify_all()
        self._grow()

    def set_target(self, target_idle: int) -> None:
        """Change the buffer size (e.g. to the LP's plan); extra idle units are handed back."""
        self.target_idle = max(0, target_idle)
        self._out_of_capacity = False
        self._grow()
        self._spawn(self._trim(), "pool-trim")

    def counts(self) -> dict[str, int]:
        return {state.value: n for state, n in self.inventory.counts().items()}

    # -- internals -------------------------------------------------------------------------------------
    def _require_open(self) -> asyncio.Condition:
        if self._closed or self._cond is None:
            raise PoolClosedError("the pool is not running; use 'async with Pool(...)' or await start()")
        return self._cond

    def _timeout_message(self, timeout: float | None) -> str:
        c = self.inventory.counts()
        return (
            f"no healthy {self.provider.name} unit within {timeout}s ({c[S.ASSIGNED]} assigned, "
            f"{sum(c[s] for s in _COMING)} coming up, {c[S.FAILED]} failed, capacity "
            f"{self.provider.capacity()}); raise the timeout, the buffer target or the capacity"
        )

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _grow(self) -> None:
        """Request units until idle + coming up covers the target plus the acquirers waiting."""
        if self._closed or self._cond is None or self._out_of_capacity:
            return
        coming = len(self.inventory.in_state(*_COMING))
        want = self.target_idle + self._waiting - len(self._idle) - coming
        capacity = self.provider.capacity()
        if capacity is not None:
            live = len(self.inventory.units) - len(self.inventory.in_state(S.RELEASED, S.FAILED))
            want = min(want, capacity - live)
        for _ in range(max(0, want)):
            unit = self.inventory.add(self.provider.name, self.type_name)
            self._spawn(self._bring_up(unit), f"pool-bring-up-{unit.id}")

    async def _bring_up(self, unit: Unit) -> None:
        try:
            self.inventory.move(unit, S.BOOTING, "allocating")
            unit.device = await self.provider.allocate(self.type_name)
            self.inventory.move(unit, S.HEALTH_CHECKING, f"booted {unit.device.label}")
            if await self._check(unit, deep=False):
                assert self._cond is not None  # started before any bring-up
                async with self._cond:
                    self._idle.append(unit)
                    self._cond.notify_all()
                await self._trim()
        except CapacityError as exc:
            self._out_of_capacity = True  # until a unit comes back or the target changes
            self.inventory.move(unit, S.FAILED, str(exc))
            await self._hand_back(unit, "no capacity")
        except PoolError as exc:
            log.warning("unit %s bring-up failed: %s", unit.id, exc)
            if unit.state is not S.FAILED:
                self.inventory.move(unit, S.FAILED, str(exc))
            await self._hand_back(unit, "bring-up failed")
        except asyncio.CancelledError:
            if unit.state not in (S.FAILED, S.RELEASED, S.IDLE):
                self.inventory.move(unit, S.FAILED, "cancelled during bring-up")
            if unit.state is S.FAILED:
                await self._hand_back(unit, "cancelled")
            raise
        self._grow()  # a failed unit is replaced

    async def _check(self, unit: Unit, deep: bool) -> bool:
        """HEALTH_CHECKING -> IDLE (True) or FAILED -> RELEASED (False)."""
        assert unit.device is not None  # only booted units are checked
        report = await asyncio.to_thread(self.provider.check, unit.device, deep)
        unit.last_health = report.summary()
        self._checked_at[unit.id] = self._clock()
        if report.ok:
            self.inventory.move(unit, S.IDLE, unit.last_health)
            return True
        self.inventory.move(unit, S.FAILED, unit.last_health)
        await self._hand_back(unit, "failed health check")
        return False

    async def _hand_back(self, unit: Unit, reason: str) -> None:
        if unit.device is not None:
            with contextlib.suppress(PoolError):
                await self.provider.free(unit.device)
        if unit.state is not S.RELEASED:
            self.inventory.move(unit, S.RELEASED, reason)
        self._out_of_capacity = False

    async def _trim(self) -> None:
        """Hand back idle units above the target (newest first: the oldest have the longest health record)."""
        while len(self._idle) > self.target_idle + self._waiting:  # waiting acquirers take the rest
            unit = self._idle.pop()
            await self._hand_back(unit, f"buffer above target {self.target_idle}")

    async def _monitor_loop(self) -> None:
        while True:
            await asyncio.sleep(self.monitor_every_s)
            await self.monitor_once()

    async def monitor_once(self) -> None:
        """Passive XID monitoring of assigned and idle units, and deep checks of idle ones when due."""
        watched = [u for u in self.inventory.in_state(S.ASSIGNED, S.IDLE) if u.device is not None]
        broken = self.provider.poll_failures([u.device for u in watched if u.device is not None])
        for unit in watched:
            reason = broken.get(unit.device.id) if unit.device is not None else None
            if reason is None:
                continue
            was_assigned = unit.state is S.ASSIGNED
            if unit in self._idle:
                self._idle.remove(unit)
            self.inventory.move(unit, S.FAILED, reason)
            if was_assigned:  # the replica's owner stops it, then calls release(unit)
                for callback in self.on_failure:
                    callback(unit, reason)
            else:
                await self._hand_back(unit, "failed while idle")
        if self.deep_check_every_s is not None:
            now = self._clock()
            for unit in list(self._idle):
                if now - self._checked_at.get(unit.id, now) >= self.deep_check_every_s:
                    self._idle.remove(unit)
                    self.inventory.move(unit, S.HEALTH_CHECKING, "deep check due")
                    if await self._check(unit, deep=True) and self._cond is not None:
                        async with self._cond:
                            self._idle.append(unit)
                            self._cond.notify_all()
        self._grow()
