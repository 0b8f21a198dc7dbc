"""The autoscaler: a pure function from demand, policy and state to the replicas a deployment wants.

No processes, no clock of its own, no I/O: the gateway calls it on every change and every tick, and tests
call it with plain numbers. What it does not decide: *where* a replica runs and whom it displaces (that is
``placement.py``), and whether a failing deployment may try again yet (the deployment's back-off).

    desired = ceil((in flight + waiting + about to arrive) / target_concurrency), within [min, max]
    stop    = idle READY replicas, least recently used first, idle for idle_timeout, down to min_replicas,
              never while a request of the deployment waits
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ScalingPolicy:
    min_replicas: int = 0
    max_replicas: int = 1
    initial_replicas: int = 1
    target_concurrency: int = 4
    idle_timeout: float = 300.0
    max_queue: int = 256
    queue_timeout: float = 600.0
    boot_timeout: float = 900.0
    drain_timeout: float = 30.0
    # Liveness of READY replicas: a hung engine is failed after HEALTH_FAILURES probes, each one interval
    # after the last answer and timing out: HEALTH_FAILURES * (health_interval + health_timeout) = 10 s.
    health_interval: float = 2.0
    health_timeout: float = 3.0


@dataclass(frozen=True)
class Demand:
    in_flight: int  # requests being served by the deployment's replicas
    waiting: int  # requests queued in its router
    arriving: int = 0  # a request about to queue (it found every replica at its target)


@dataclass(frozen=True)
class IdleReplica:
    replica_id: str
    in_flight: int
    last_used: float  # monotonic seconds


def desired_replicas(demand: Demand, policy: ScalingPolicy) -> int:
    """Replicas the demand needs, within the policy's bounds."""
    total = demand.in_flight + demand.waiting + demand.arriving
    want = -(-total // max(1, policy.target_concurrency))  # ceil
    return min(max(want, policy.min_replicas), policy.max_replicas)


def replicas_to_stop(
    ready: Sequence[IdleReplica], *, active: int, waiting: int, policy: ScalingPolicy, now: float
) -> list[str]:
    """Idle replicas to drain and stop: least recently used first, idle for ``idle_timeout``, keeping
    ``min_replicas`` of the ``active`` (starting or ready) ones; none while requests wait."""
    if not policy.idle_timeout or waiting:
        return []
    surplus = active - policy.min_replicas
    out: list[str] = []
    for replica in sorted(ready, key=lambda r: r.last_used):
        if len(out) >= surplus:
            break
        if replica.in_flight == 0 and now - replica.last_used >= policy.idle_timeout:
            out.append(replica.replica_id)
    return out
