"""The liveness watcher: who decides a serving replica is dead.

Never one failed connection: a connection error can be a keep-alive connection the engine closed after an
error answer, and a bad request must not take a healthy replica (and its other requests) down. A replica
fails when its engine process exited, or when its liveness probe (the adapter's health probe,
``health_timeout`` each) fails ``HEALTH_FAILURES`` times in a row; probes run every ``health_interval`` and
at once after a connection error (``suspect``). A hung engine (SIGSTOP, a deadlock) is thus failed within
HEALTH_FAILURES x (interval + timeout) (10 s by default), its engine killed (which ends its in-flight
requests with an error), and demand starts a replacement.

A busy engine is not a hung one: a failed probe while the replica has requests in flight and its engine's
processes used CPU while that probe waited (``EngineHandle.cpu_seconds`` read before and after it, at
least ``BUSY_CPU_S``) is not counted. Measured around the probe, not since the previous one: an engine
stopped just after a busy stretch must not be excused for that stretch. ``transformers serve`` on a loaded
CPU host answered no /health for seconds while it generated and lost its replica, and the request with it;
a stopped or deadlocked engine uses no CPU and is still failed. An engine whose CPU time is not known
here (gVisor) is probed as before.

A probe that fails on *our* side (the launcher out of file descriptors: EMFILE/ENFILE) says nothing about the
engine and is not counted (``process.is_local_exhaustion``); it is logged at most once a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import httpx

from coldstart.launcher.process import is_local_exhaustion
from coldstart.launcher.replica import FailureKind, Replica

if TYPE_CHECKING:
    from coldstart.launcher.deployment import Deployment

log = logging.getLogger("coldstart.lifecycle")

HEALTH_FAILURES = 2  # consecutive failed liveness probes that fail a replica
BUSY_CPU_S = 0.05  # CPU seconds an engine used during a probe it missed to count as busy, not hung
_LOG_EVERY_S = 60.0


class _LocalProbeError(Exception):
    """The probe could not be sent for a reason of ours, not the engine's."""


def _check_own_descriptors() -> None:
    """Raise ``_LocalProbeError`` when this process cannot open a socket (out of descriptors or memory)."""
    try:
        socket.socket().close()
    except OSError as exc:
        if is_local_exhaustion(exc):
            raise _LocalProbeError(str(exc)) from exc
        raise


class Liveness:
    def __init__(
        self,
        http: httpx.AsyncClient,
        on_dead: Callable[[Deployment, Replica, str, FailureKind], None],
    ) -> None:
        self.http = http
        self.on_dead = on_dead
        self._poke: dict[str, asyncio.Event] = {}
        self._logged_at: dict[str, float] = {}  # when each kind of uncounted probe was last logged
        self.local_errors = 0  # probes that could not be sent for a reason of ours (not counted as misses)
        self.busy_misses = 0  # probes an engine busy with requests did not answer (not counted)

    def suspect(self, replica: Replica, why: str) -> None:
        """A request saw trouble reaching the replica (connection error, read timeout): probe it now."""
        log.info(
            "replica %s: %s; probing its health",
            replica.id,
            why,
            extra={"event": "suspect", "replica": replica.id, "model": replica.deployment},
        )
        if (event := self._poke.get(replica.id)) is not None:
            event.set()

    async def watch(self, deployment: Deployment, replica: Replica, watched: Callable[[], bool]) -> None:
        """Probe ``replica`` while ``watched()``; call ``on_dead`` once when it is not alive."""
        poke = self._poke.setdefault(replica.id, asyncio.Event())
        policy = deployment.policy
        failures = 0
        try:
            while watched():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(poke.wait(), policy.health_interval)
                poke.clear()
                if not watched():
                    return
                # The engine's CPU time around the probe: did it work while it did not answer? Read only
                # while requests are in flight (only then is a miss excused): an idle probe costs no query.
                before = await self._cpu(replica) if replica.in_flight > 0 else None
                try:
                    why = await self.probe(deployment, replica)
                except _LocalProbeError as exc:
                    self._log_local(replica, exc)
                    continue
                if why is None:
                    failures = 0
                    continue
                cpu = await self._cpu(replica) if before is not None else None
                sandbox = replica.sandbox
                exited = sandbox is not None and sandbox.exit_code() is not None
                if not watched():
                    return  # its stop began while the probe ran
                used = cpu - before if cpu is not None and before is not None else 0.0
                if not exited and replica.in_flight > 0 and used >= BUSY_CPU_S:
                    self._log_busy(replica, why, used)
                    continue
                failures += 1
                if exited or failures >= HEALTH_FAILURES:
                    # What the busy rule saw, so that a busy engine failed anyway can be told from a hung one.
                    seen = "unknown" if cpu is None or before is None else f"{used:.2f} s"
                    log.warning(
                        "replica %s is not alive: %s (%d in flight; engine CPU during the last probe: %s)",
                        replica.id,
                        why,
                        replica.in_flight,
                        seen,
                        extra={"event": "replica_dead", "replica": replica.id, "model": replica.deployment},
                    )
                    self.on_dead(
                        deployment, replica, why, FailureKind.EXITED if exited else FailureKind.UNRESPONSIVE
                    )
                    return
        finally:
            self._poke.pop(replica.id, None)

    async def probe(self, deployment: Deployment, replica: Replica) -> str | None:
        """None when alive, else why not. Raises ``_LocalProbeError`` when the launcher itself could not
        probe (out of file descriptors)."""
        sandbox = replica.sandbox
        if sandbox is None:
            return "no sandbox"
        if (code := sandbox.exit_code()) is not None:
            return f"engine exited with status {code}"
        timeout = deployment.policy.health_timeout
        try:
            healthy = await asyncio.wait_for(sandbox.is_healthy(deployment.adapter, self.http), timeout)
        except TimeoutError:
            return f"health probe got no answer within {timeout:.0f} s (engine hung?)"
        except Exception as exc:  # an adapter's probe that raises says why it is not alive
            if is_local_exhaustion(exc):
                raise _LocalProbeError(str(exc)) from exc
            return f"health probe failed: {exc}"
        if (code := sandbox.exit_code()) is not None:
            return f"engine exited with status {code}"
        if healthy:
            return None
        _check_own_descriptors()  # adapters map a connect error to False: was it ours?
        return "health probe failed"

    @staticmethod
    async def _cpu(replica: Replica) -> float | None:
        """The engine's CPU seconds so far (None: not known). Read before and after a probe sent while
        requests are in flight: an engine that used CPU during the probe it missed is busy, one stopped or
        deadlocked since (however busy before) is not."""
        sandbox = replica.sandbox
        return None if sandbox is None else await sandbox.cpu_seconds()

    def _due(self, kind: str) -> bool:
        """True at most once a minute for each kind of uncounted probe (the rest are counted, not logged)."""
        now = time.monotonic()
        if now - self._logged_at.get(kind, -_LOG_EVERY_S) < _LOG_EVERY_S:
            return False
        self._logged_at[kind] = now
        return True

    def _log_busy(self, replica: Replica, why: str, used: float) -> None:
        self.busy_misses += 1
        if self._due("busy"):
            log.info(
                "replica %s: %s, but it is busy (%d in flight, %.2f CPU s since the last probe); not counted",
                replica.id,
                why,
                replica.in_flight,
                used,
                extra={"event": "probe_busy", "replica": replica.id, "model": replica.deployment},
            )

    def _log_local(self, replica: Replica, exc: Exception) -> None:
        self.local_errors += 1
        if self._due("local"):
            log.warning(
                "cannot probe replica %s: %s (the launcher's own limit, not the engine's; not counted)",
                replica.id,
                exc,
                extra={"event": "probe_local_error", "replica": replica.id},
            )
