"""A deployment's router: which READY replica takes a request, and the bounded queue while none can.

Routing while capacity is coming: a replica at ``target_concurrency`` takes no more requests while another
replica of the deployment is starting; the waiters stay queued here and spread over every replica as it
becomes ready (a burst from zero would otherwise bind every waiter to the first ready replica, leave the
second idle, and the idle timer would stop it). With nothing starting, the least-busy replica takes the
request -- unless deployments share too few units for all of them: then requests beyond the target wait
in this queue, so a replica asked to yield its unit finishes only its ``target_concurrency`` requests, not
a flood queued inside its engine (raise ``target_concurrency`` for engines that batch many). DRAINING
replicas (scaled down, evicted for another deployment, or yielding their unit under contention) take none.

The queue is bounded (``max_queue``: 503 ``queue_full``) and so is each wait (``queue_timeout``: 503
``queue_timeout``). Waiters re-evaluate whenever ``wake()`` is called (a replica became ready, got room,
or went away) and at least once a second (a back-off ends without an event).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Iterable, Iterator

from coldstart.launcher.autoscaler import ScalingPolicy
from coldstart.launcher.errors import QueueFull
from coldstart.launcher.replica import Replica, ReplicaState

STARTING = (ReplicaState.NEW, ReplicaState.BOOTING, ReplicaState.RESTORING, ReplicaState.SNAPSHOTTING)


def pick(
    replicas: Iterable[Replica],
    policy: ScalingPolicy,
    avoid: Replica | None = None,
    *,
    overcommit: bool = True,
) -> Replica | None:
    """The READY replica with the fewest requests in flight, other than ``avoid`` where there is another;
    None when every one is at its target while another replica is starting (wait for that one), or when
    ``overcommit`` is off (other deployments wait for a unit: requests beyond the target wait here, where
    a yield does not have to finish them, instead of in the engine's own queue)."""
    replicas = list(replicas)
    ready = [r for r in replicas if r.state is ReplicaState.READY]
    if avoid is not None and len(ready) > 1:
        ready = [r for r in ready if r is not avoid]
    if not ready:
        return None
    best = min(ready, key=lambda r: r.in_flight)
    if best.in_flight < policy.target_concurrency:
        return best
    if not overcommit:
        return None
    return None if any(r.state in STARTING for r in replicas) else best


class Router:
    def __init__(self, name: str, policy: ScalingPolicy) -> None:
        self.name = name
        self.policy = policy
        self._changed = asyncio.Event()
        self._arrivals: dict[int, float] = {}  # waiter -> when it started waiting (monotonic)
        self._tokens = itertools.count()

    @property
    def waiting(self) -> int:
        return len(self._arrivals)

    def oldest_wait(self, now: float) -> float:
        """Seconds the longest-waiting request has waited (0 when none waits)."""
        return now - min(self._arrivals.values(), default=now)

    def wake(self) -> None:
        """Waiters re-evaluate: a replica became ready, got room, went away, or a boot failed."""
        self._changed.set()
        self._changed = asyncio.Event()

    @contextlib.contextmanager
    def queued(self) -> Iterator[None]:
        """Count one waiter for the time of the block; refuse beyond ``max_queue``."""
        if self.waiting >= self.policy.max_queue:
            raise QueueFull(
                f"{self.waiting} requests for {self.name!r} already wait for a replica; retry later"
            )
        token = next(self._tokens)
        self._arrivals[token] = time.monotonic()
        try:
            yield
        finally:
            del self._arrivals[token]

    async def changed(self, timeout: float) -> None:
        """Until the next ``wake()`` or ``timeout`` seconds."""
        event = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)
