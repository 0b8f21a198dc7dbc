"""``RayHost``: replicas on the nodes of a Ray cluster (the ``ReplicaHost`` of ``launcher/placement.py``).

    gateway (coldstart-serve --cluster ray://HEAD:10001)          node (coldstart node start ...)
      RayHost.start(deployment, replica)
        ReplicaActor.options(unit, name, detached).remote()  --->  Ray places it where a unit is free
        actor.start()                                         --->  restore (node store / tiers) or cold boot
                                                                    + snapshot + publish; relay on node IP
        replica.sandbox = RayEngine(base_url=relay)           <---  StartReport
        (snapshot published) pull_ahead on every other node   --->  the node pulls it into its store
      proxy -> http://NODE_IP:RELAY_PORT -> engine's sandbox

Membership, placement, unit accounting and node-failure detection are Ray's. A unit is a Ray resource:
``coldstart_slot`` (CPU units, declared by ``coldstart node start --units N``) or ``GPU``. A replica is a
named, detached actor in the ``coldstart`` namespace, ``<gateway id>.<deployment>.<replica id>``: a gateway
that was killed and restarted with the same id finds what it left and removes it (``removed`` lists it).
Adoption (serving from the old engines) is not done: a restarted gateway has no record of their state
(in flight, warm, draining), and a restore is seconds.

Placement (``choose_node``) picks a node with a unit free by the gateway's own count, one that already
holds the deployment's snapshot first (a soft node affinity: Ray may still spill). Ray custom resources
cannot be added to a running node, and labels are fixed at ``ray start``, so the gateway keeps the map
(snapshot key -> nodes that hold it) from
what actors and pull-ahead tasks report. When a replica takes and publishes a snapshot, every other alive
node pulls it ahead (``actor.pull_ahead``, a Ray task pinned to that node), so its first restore is local.

The buffer: ``set_buffer(units)`` (the LP plan from ``pool.sizing``) asks Ray's autoscaler, through
``ray.autoscaler.sdk.request_resources``, for capacity for the units in use plus that many free ones; on a
static cluster the request is recorded and shown by ``ray status``, with an autoscaler (cloud, KubeRay) it
keeps that many units' nodes up. ``request_resources`` needs a driver with a GCS client, which a Ray Client
(``ray://``) session is not: it runs in a Ray task on the cluster.

Death: the gateway keeps one long poll per replica open (``actor.wait_exit``); it returns the engine's exit
status, or raises when the actor or its node died (``ActorDiedError``): either way ``exit_code()`` turns
non-None (-1 for a lost actor or node) and the gateway's liveness watcher fails the replica.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from coldstart.launcher.cluster.actor import ReplicaActor, StartReport, pull_ahead
from coldstart.launcher.cluster.errors import ClusterError, ClusterUnreachable, PlacementTimeout, ReplicaLost
from coldstart.launcher.cluster.node import NAMESPACE, SLOT
from coldstart.launcher.config import ServeConfig
from coldstart.launcher.deployment import one_line
from coldstart.launcher.metrics import Metrics
from coldstart.launcher.replica import ReplicaState, StartKind

if TYPE_CHECKING:
    from coldstart.launcher.deployment import Deployment
    from coldstart.launcher.replica import Replica

log = logging.getLogger("coldstart.cluster")

STOP_TIMEOUT_S = 60.0  # an actor's own stop (SIGTERM, grace, SIGKILL) beyond which it is killed anyway
NODES_TTL_S = 2.0  # ray.nodes() is a GCS call: capacity() reuses it this long
RELAY_PROBE_PORT = 9  # any port: a UDP connect only asks the kernel which source address it would use
CPU_QUERY_S = 5.0  # the engine's CPU time from its node (liveness); slower than this: not known
# (2 s was too short on a loaded 2-core node: the busy replica's probe was counted and the replica lost)
CONNECT_ATTEMPTS = 3


@dataclass
class Placement:
    """Where one replica runs, as the gateway saw it (for ``/health``, the benchmark and tests)."""

    actor_name: str
    node_id: str
    node_ip: str
    how: StartKind
    placed_s: float  # actor created -> running on its node (Ray's placement alone)
    started_s: float  # placed -> engine serving (restore or boot)
    restore_failed: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


class RayEngine:
    """The ``EngineHandle`` of a replica on a Ray node: the relay's address, the actor's fate."""

    def __init__(self, actor: Any, report: StartReport) -> None:
        self.actor = actor
        self.report = report
        self._exit: int | None = None
        self._stopped = False

    @property
    def base_url(self) -> str:
        return self.report.base_url

    def exit_code(self) -> int | None:
        return self._exit

    async def cpu_seconds(self) -> float | None:
        """The engine's CPU time as its node reads it; None when the actor does not answer in time."""
        try:
            seconds = await asyncio.wait_for(_awaitable(self.actor.cpu_seconds.remote()), CPU_QUERY_S)
        except Exception:  # the actor or its node is gone or slow: liveness counts the probe as it is
            return None
        return float(seconds) if seconds is not None else None

    async def is_healthy(self, adapter: Any, http: Any) -> bool:
        """Probed by the actor on the engine's node: the relay carries the engine's port alone, and an
        engine's snapshot_hooks control channel (port + 1 beside it: transformers, custom engines) is reached
        there only. An adapter's error (e.g. no control channel) comes back as the actor's, with its text."""
        return bool(await _awaitable(self.actor.is_healthy.remote()))

    async def stop(self, grace: float) -> None:
        """The actor stops its relay and engine, then the actor itself is killed. Idempotent; a dead actor
        or node is not an error here (there is nothing left to stop)."""
        if self._stopped:
            return
        self._stopped = True
        import ray

        with contextlib.suppress(Exception):  # RayError of any kind: the actor or its node is gone
            await asyncio.wait_for(_awaitable(self.actor.stop.remote(grace)), grace + STOP_TIMEOUT_S)
        with contextlib.suppress(Exception):
            ray.kill(self.actor, no_restart=True)
        if self._exit is None:
            self._exit = 0


def choose_node(units: dict[str, int], ours: list[str], holders: set[str]) -> str | None:
    """A node with a unit free by the gateway's own count (``units`` each node declares, minus ``ours``, one
    entry per replica placed or being placed there): one that holds the snapshot first, then the least
    loaded. None when no node has a unit free by that count (Ray then places where one frees up). A soft
    affinity to a busy holder left the spill to the free node up to Ray (once, in CI, no second replica
    was placed in 120 s); a node with a free unit by this count is never a node to wait on."""
    load = collections.Counter(ours)
    free = [n for n, u in units.items() if load[n] < u]
    if not free:
        return None
    return min(free, key=lambda n: (n not in holders, load[n] - units[n], n))


def connect(address: str) -> None:
    """``ray.init`` to ``address`` in the ``coldstart`` namespace. Ray Client starts a server process per
    session on the head; on a loaded head it can miss its start deadline ("Starting Ray client server
    failed"): tried ``CONNECT_ATTEMPTS`` times, then ``ClusterUnreachable`` that says what to start."""
    import ray

    for attempt in range(CONNECT_ATTEMPTS):
        try:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
            return
        except (ConnectionError, RuntimeError, ValueError) as exc:
            with contextlib.suppress(Exception):
                ray.shutdown()
            if attempt + 1 < CONNECT_ATTEMPTS:
                log.warning("connecting to %s failed (%s); trying again", address, str(exc).splitlines()[0])
                time.sleep(2.0)
                continue
            raise ClusterUnreachable(
                f"--cluster {address}: no Ray cluster answers there ({exc}); start one with "
                "'coldstart node start --head' (Ray Client: ray://HEAD:10001)"
            ) from exc


class RayHost:
    """Replicas as Ray actors on the cluster at ``address`` (``ray://HEAD:10001`` through Ray Client, or
    ``HEAD:6379`` from a process on a Ray node)."""

    name = "ray"
    unit_lead_time_s = 60.0  # a new unit is a new node (autoscaler: minutes); the LP's lead time

    def __init__(
        self,
        address: str,
        server_config: ServeConfig,
        metrics: Metrics,
        *,
        gateway_id: str | None = None,
        autoscaling: bool = False,
    ) -> None:
        import ray

        self.address = address
        self.server_config = server_config
        self.metrics = metrics
        self.autoscaling = autoscaling
        # One gateway, one prefix: a restarted gateway with the same listen address finds its own actors.
        self.gateway_id = (
            gateway_id
            or "gw-" + hashlib.sha256(f"{server_config.host}:{server_config.port}".encode()).hexdigest()[:8]
        )
        connect(address)
        self._actor_cls = ray.remote(ReplicaActor)
        self._pull = ray.remote(pull_ahead)
        self.unit = "GPU" if ray.cluster_resources().get("GPU") else SLOT
        self.allowed = _own_addresses(address)
        self.placements: dict[str, Placement] = {}  # replica id -> where it runs
        self._placing: dict[str, str] = {}  # replica id -> the node chosen for it, until it runs or fails
        self.holders: dict[str, set[str]] = {}  # snapshot key -> node ids holding it
        self.pulls: list[dict[str, Any]] = []  # pull-ahead reports (tests and the benchmark read them)
        self._keys: dict[str, str] = {}  # deployment name -> its snapshot key (learnt from the first start)
        self._handles: dict[str, RayEngine] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # exit watchers and pull-ahead fan-outs
        self._nodes: tuple[float, list[dict[str, Any]]] = (0.0, [])
        self._buffer = 0
        self.requested_units: int | None = None  # units last asked of Ray's autoscaler (in use + buffer)
        self._closed = False
        self.removed = self.remove_left_behind()

    # ---------------------------------------------------------------- ReplicaHost
    def capacity(self) -> int | None:
        """Units on the alive nodes now (None when an autoscaler may add nodes)."""
        if self.autoscaling:
            return None
        return int(sum(n["Resources"].get(self.unit, 0) for n in self.alive_nodes()))

    def memory_budget(self) -> int | None:
        return None  # each node bounds its own units; the gateway does not see node memory

    async def start(self, deployment: Deployment, replica: Replica) -> StartKind:
        """Place the replica's actor on a node with a free unit, bring the engine up there (restore or cold
        boot), set ``replica.sandbox`` and return how it started. Raises a ``ClusterError`` (or the
        engine's own error from the node) after removing the actor."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        name = f"{self.gateway_id}.{deployment.name}.{replica.id}"
        options: dict[str, Any] = {
            "name": name,
            "namespace": NAMESPACE,
            "lifetime": "detached",
            "num_cpus": 0,
            "max_restarts": 0,
            "max_concurrency": 64,
        }
        if self.unit == "GPU":
            options["num_gpus"] = 1
        else:
            options["resources"] = {SLOT: 1}
        if (node := self._preferred_node(deployment.name)) is not None:
            self._placing[replica.id] = node
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                node, soft=True, _spill_on_unavailable=True
            )
        config = deployment.config
        if config is None:
            raise ClusterError(
                f"deployment {deployment.name} has no ServeConfig: a cluster node rebuilds from it"
            )
        t0 = time.monotonic()
        actor = self._actor_cls.options(**options).remote(config, replica.id, self.peers())
        try:
            try:
                await asyncio.wait_for(_awaitable(actor.ping.remote()), config.boot_timeout)
            except TimeoutError as exc:
                raise PlacementTimeout(
                    f"replica {replica.id} of {deployment.name}: no node with a free {self.unit} unit "
                    f"within {config.boot_timeout:.0f} s (add a node: coldstart node start)"
                ) from exc
            placed = time.monotonic() - t0
            restoring = await _mapped(_awaitable(actor.prepare.remote()), replica.id)
            replica.transition(ReplicaState.RESTORING if restoring else ReplicaState.BOOTING)
            report: StartReport = await _mapped(_awaitable(actor.start.remote()), replica.id)
        except BaseException:
            with contextlib.suppress(Exception):
                import ray

                ray.kill(actor, no_restart=True)
            raise
        finally:
            self._placing.pop(replica.id, None)
        started = time.monotonic() - t0 - placed
        how = StartKind(report.how)
        handle = RayEngine(actor, report)
        replica.sandbox = handle  # type: ignore[assignment]  # an EngineHandle (placement.py)
        self._handles[replica.id] = handle
        self.placements[replica.id] = Placement(
            name, report.node_id, report.node_ip, how, placed, started, report.restore_failed, report.timings
        )
        if report.snapshot_key:
            self._keys[deployment.name] = report.snapshot_key
            if report.holds_snapshot:
                self.holders.setdefault(report.snapshot_key, set()).add(report.node_id)
        # The states the node went through, after the fact (each step there succeeded).
        if report.restore_failed:
            replica.transition(ReplicaState.BOOTING, reason=f"restore-failed:{report.restore_failed}")
        if how is StartKind.COLD_BOOT and report.holds_snapshot:
            replica.transition(ReplicaState.SNAPSHOTTING)
        metrics = deployment.metrics
        (metrics.restores if how is StartKind.RESTORE else metrics.cold_boots).inc()
        if report.restore_failed:
            metrics.restore_failures.labels(report.restore_failed).inc()
        log.info(
            "replica %s of %s on node %s (%s): placed in %.2fs, %s in %.2fs",
            replica.id, deployment.name, report.node_ip, report.node_id[:8], placed, how, started,
            extra={"event": "placed", "replica": replica.id, "node": report.node_ip, "how": str(how)},
        )  # fmt: skip
        self._spawn(self._watch(handle), f"watch {replica.id}")
        if how is StartKind.COLD_BOOT and report.holds_snapshot:
            self._spawn(self._fan_out(actor, config, report.node_id), f"pull ahead for {deployment.name}")
        self._update_buffer()
        return how

    async def stop(self, replica: Replica, grace: float) -> None:
        handle = self._handles.pop(replica.id, None)
        if handle is not None:
            await handle.stop(grace)
        self.placements.pop(replica.id, None)
        self._update_buffer()

    async def close(self) -> None:
        """Stop every replica still here, cancel watchers and pulls, drop the buffer request, disconnect.
        Idempotent."""
        import ray

        if self._closed:
            return
        self._closed = True

        await asyncio.gather(*(h.stop(2.0) for h in self._handles.values()), return_exceptions=True)
        self._handles.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._request([])
        ray.shutdown()

    # ---------------------------------------------------------------- the buffer (LP plan)
    def set_buffer(self, units: int) -> None:
        """Keep ``units`` free units in the cluster beyond those replicas hold (the LP plan's buffer)."""
        self._buffer = max(0, int(units))
        self._update_buffer()

    def _update_buffer(self) -> None:
        bundles = [{self.unit: 1.0}] * (len(self._handles) + self._buffer)
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # called outside the gateway's loop (before serving starts): at once
            import ray

            with contextlib.suppress(Exception):
                fn = ray.remote(_request_resources).options(num_cpus=0)
                self.requested_units = ray.get(fn.remote(bundles), timeout=30)
            return
        self._spawn(self._request(bundles), "request_resources")

    async def _request(self, bundles: list[dict[str, float]]) -> None:
        import ray

        fn = ray.remote(_request_resources).options(num_cpus=0)
        with contextlib.suppress(Exception):
            self.requested_units = await asyncio.wait_for(_awaitable(fn.remote(bundles)), 30.0)

    def peers(self) -> tuple[str, ...]:
        """The addresses a node's relay lets in: this gateway's source address toward the head and toward
        every alive node (they differ where Ray advertises a node by another interface than the one the
        gateway reached the head on, e.g. a one-machine cluster reached at 127.0.0.1)."""
        found = set(self.allowed)
        for node in self.alive_nodes():
            found.update(_own_addresses(f"{node.get('NodeManagerAddress', '')}:{RELAY_PROBE_PORT}"))
        return tuple(sorted(found))

    # ---------------------------------------------------------------- nodes, orphans, snapshots
    def alive_nodes(self) -> list[dict[str, Any]]:
        import ray

        at, nodes = self._nodes
        if time.monotonic() - at > NODES_TTL_S:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            self._nodes = (time.monotonic(), nodes)
        return nodes

    def remove_left_behind(self) -> list[str]:
        """Actors a previous run of this gateway left (killed -9): stopped and removed, each named."""
        import ray

        removed = []
        for entry in ray.util.list_named_actors(all_namespaces=True):
            if entry.get("namespace") != NAMESPACE or not entry["name"].startswith(self.gateway_id + "."):
                continue
            with contextlib.suppress(Exception):
                actor = ray.get_actor(entry["name"], namespace=NAMESPACE)
                with contextlib.suppress(Exception):
                    ray.get(actor.stop.remote(2.0), timeout=STOP_TIMEOUT_S)
                ray.kill(actor, no_restart=True)
                removed.append(entry["name"])
                log.warning(
                    "removed replica actor %s left by a previous gateway",
                    entry["name"],
                    extra={"event": "leftover_removed"},
                )
        return removed

    def _preferred_node(self, deployment: str) -> str | None:
        """The node for the next replica of ``deployment`` (see ``choose_node``); None: any node Ray finds."""
        key = self._keys.get(deployment)
        holders = self.holders.get(key, set()) if key else set()
        units = {n["NodeID"]: int(n["Resources"].get(self.unit, 0)) for n in self.alive_nodes()}
        for dead in holders - units.keys():
            holders.discard(dead)
        ours = [p.node_id for p in self.placements.values()] + list(self._placing.values())
        return choose_node(units, ours, holders)

    async def _fan_out(self, actor: Any, config: ServeConfig, source: str) -> None:
        """Once the snapshot the replica took is published, every other alive node pulls it ahead."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        try:
            key = await _awaitable(actor.published.remote())
        except Exception as exc:  # the actor or its node died: the next cold boot publishes again
            log.warning("no pull ahead: the snapshot's publisher is gone (%s)", one_line(exc))
            return
        if not key:
            return
        nodes = [n["NodeID"] for n in self.alive_nodes() if n["NodeID"] != source]
        refs = [
            self._pull.options(
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
            ).remote(config)
            for node in nodes
        ]
        for node, ref in zip(nodes, refs, strict=True):
            try:
                report = await _awaitable(ref)
            except Exception as exc:  # that node died or its task failed: its first restore pulls on demand
                log.warning("node %s did not pull ahead: %s", node[:8], one_line(exc))
                continue
            self.pulls.append(report)
            if report.get("held") and report.get("key"):
                self.holders.setdefault(report["key"], set()).add(report["node_id"])
            log.info("node %s holds snapshot %s (%s)", node[:8], report.get("key"), report)

    async def _watch(self, handle: RayEngine) -> None:
        from ray.exceptions import ActorUnavailableError, RayError

        while handle._exit is None:
            try:
                handle._exit = int(await _awaitable(handle.actor.wait_exit.remote()))
            except ActorUnavailableError:
                await asyncio.sleep(1.0)  # transient (network); ActorDiedError follows if it is dead
            except RayError:
                if handle._exit is None:
                    handle._exit = -1  # the actor or its node died
                    log.warning(
                        "replica on node %s lost: its actor or node died",
                        handle.report.node_ip,
                        extra={"event": "replica_lost", "node": handle.report.node_ip},
                    )

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _request_resources(bundles: list[dict[str, float]]) -> int:
    """On the cluster (a driver with a GCS client): ask the autoscaler to keep room for ``bundles``."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)
    return len(bundles)


async def _awaitable(ref: Any) -> Any:
    return await ref


async def _mapped(coro: Any, replica_id: str) -> Any:
    """Ray's errors at the boundary: a dead actor or node is ``ReplicaLost``; an error the node raised
    (a failed boot, a usage error) comes back as itself where Ray could carry it."""
    from ray.exceptions import RayActorError, RayTaskError

    try:
        return await coro
    except RayTaskError as exc:
        cause = exc.cause if isinstance(exc.cause, BaseException) else None
        if cause is not None:
            raise cause from exc
        raise ClusterError(f"replica {replica_id}: {exc}") from exc
    except RayActorError as exc:
        raise ReplicaLost(f"replica {replica_id}: its actor or node died while it started ({exc})") from exc


def _own_addresses(address: str) -> tuple[str, ...]:
    """The address this gateway reaches the cluster from: the only peer a node's relay accepts."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host or address, int(port or 10001)))
            return (probe.getsockname()[0],)
    except (OSError, ValueError):
        return ()
