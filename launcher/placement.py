"""Placement: which unit a replica runs on, and whom to evict when there is none.

The gateway serves many deployments from one set of units (this host's GPUs or CPU slots, or a Ray
cluster's). Where replicas actually run is a ``ReplicaHost``:

    LocalHost   (``launcher/local_host.py``)     units from this host's ``pool.Pool``; the engine restored or
                                                  cold-booted in a local sandbox
    RayHost     (``launcher/cluster/``)          a Ray actor on a node with a free unit restores or boots it
                                                  there and hands back its address

Both give the gateway the same thing: a started replica whose ``sandbox`` is an ``EngineHandle`` (a base
URL to forward to, an exit code to watch, a stop). Placement decides *whether* a replica may start now (a
unit is free and its memory fits) and, when not, which replica of another deployment gives its unit up:

    a free unit                          -> start
    none: an idle replica elsewhere      -> evict it (no request in flight; lowest priority first, then least
                                            recently used; never before its minimum residency) -> start
    none idle: a busy deployment above   -> it yields one replica (takes no new requests, finishes those in
      its weighted share                    flight, then stops) -> start
    nothing                              -> the request waits in its router's bounded queue

The choice functions are pure (``choose_victim``, ``over_share``) and tested without processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import httpx

    from coldstart.engine_adapters.base import EngineAdapter
    from coldstart.launcher.deployment import Deployment
    from coldstart.launcher.replica import Replica, StartKind


class EngineHandle(Protocol):
    """A running engine as the gateway sees it: a local ``Sandbox`` is one, a Ray actor's handle another."""

    @property
    def base_url(self) -> str: ...

    def exit_code(self) -> int | None:
        """None while the engine runs; its exit status (or -1 when its host is gone) once it is not."""
        ...

    async def stop(self, grace: float) -> None:
        """SIGTERM, ``grace`` seconds, SIGKILL; reaped; everything the engine held released."""
        ...

    async def cpu_seconds(self) -> float | None:
        """CPU time the engine's processes used so far (None: not known here, e.g. under gVisor): liveness
        tells a busy engine from a hung one by it."""
        ...

    async def is_healthy(self, adapter: EngineAdapter, http: httpx.AsyncClient) -> bool:
        """``adapter``'s health probe of the engine, made where the engine's control channel is reachable
        (a Ray replica's relay carries the engine's port alone: its actor probes on the node)."""
        ...


class ReplicaHost(Protocol):
    """Where replicas run. ``start`` places the replica on a unit and brings its engine up (restore when a
    snapshot exists, else cold boot and snapshot); on return ``replica.sandbox`` is set and serving can begin.
    It raises on failure, after releasing what it took. ``stop`` stops the engine and frees its unit."""

    name: str  # "local" or "ray": shown in /health and logs

    def capacity(self) -> int | None:
        """Units replicas may hold at once (None: unbounded, e.g. a cluster that autoscales)."""
        ...

    def memory_budget(self) -> int | None:
        """Bytes replicas may use in all on CPU units (None: not bounded by memory)."""
        ...

    async def start(self, deployment: Deployment, replica: Replica) -> StartKind: ...

    async def stop(self, replica: Replica, grace: float) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class Holder:
    """A replica holding a unit, as placement sees it (a plain record: the choice functions are pure)."""

    replica_id: str
    deployment: str
    priority: int
    weight: float
    in_flight: int
    ready: bool  # serving (READY); starting replicas are never evicted
    last_used: float
    placed_at: float
    memory: int = 0


def choose_victim(
    holders: Sequence[Holder], *, wanted_by: str, now: float, min_residency: float
) -> Holder | None:
    """The idle replica of another deployment to evict for ``wanted_by``: no request in flight, serving,
    past its minimum residency; lowest priority first, then least recently used."""
    idle = [
        h
        for h in holders
        if h.deployment != wanted_by and h.ready and h.in_flight == 0 and now - h.placed_at >= min_residency
    ]
    return min(idle, key=lambda h: (h.priority, h.last_used), default=None)


def over_share(
    holders: Sequence[Holder],
    *,
    wanted_by: str,
    weights: dict[str, float],
    now: float,
    min_residency: float,
) -> Holder | None:
    """Under contention, the busy replica that should yield its unit to ``wanted_by``.

    A deployment yields when it holds strictly more units per weight than ``wanted_by`` does: two
    deployments of equal weight on two units settle at one each, and on one unit they take turns. A
    holder yields only after ``min_residency`` scaled by the weights (on one unit, weight 2 against 1
    keeps it twice as long): the time share follows the weights and no swap comes before its turn ends.
    Only serving replicas; of the deployment most over its share, the one placed longest ago."""
    held: dict[str, int] = {}
    for h in holders:
        held[h.deployment] = held.get(h.deployment, 0) + 1
    want_w = weights.get(wanted_by, 1.0)
    mine = held.get(wanted_by, 0) / want_w

    def share(h: Holder) -> float:
        return held[h.deployment] / weights.get(h.deployment, 1.0)

    candidates = [
        h
        for h in holders
        if h.deployment != wanted_by
        and h.ready
        and share(h) > mine
        and now - h.placed_at >= min_residency * weights.get(h.deployment, 1.0) / want_w
    ]
    return max(candidates, key=lambda h: (share(h), -h.priority, now - h.placed_at), default=None)
