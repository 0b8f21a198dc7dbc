"""One replica on one node of a Ray cluster: the Ray actor that brings the engine up there and owns it.

Ray places the actor (``num_cpus=0`` and one unit: ``resources={"coldstart_slot": 1}`` or ``num_gpus=1``)
on a node with a free unit; it runs there as root, in the node's network namespace, with the node's
settings (``node.py``: its snapshot store, work directory, tiers). ``start()`` does what the single-host
lifecycle does, with the same library code: restore when the node's store (or a tier) has the deployment's
snapshot (``snapshots_for`` -> ``SnapshotManager.restore``), else cold boot (``boot.cold_boot``) and take the
snapshot; a failed restore is followed by a cold boot, with its reason reported. The engine runs in its own
sandbox (a CRIU/runsc network namespace on the node, or a plain process), so the actor hands the gateway
an address on the *node*: a relay (``Relay``) listening on the node's IP that pipes each connection to the
engine's sandbox address. Only the gateway's address may connect to it.

Why a relay in the actor and not a DNAT rule on the node: a DNAT needs ``ip_forward`` in the node's
namespace and a MASQUERADE rule (the sandbox has no route back to the gateway), both node-wide side effects
that a killed actor would leave behind; the relay dies with its actor and needs nothing of the node. Its
cost is measured by ``bench/cluster.py`` (the "relay" row: one small completion through the relay vs
straight to the sandbox from the node).

The engine dies with the actor (``process.die_with_launcher``: the actor's process is the engine's
launcher), so an actor killed with its node, or by ``ray.kill``, leaves at most a namespace, which the next
actor on that node removes (``log_cleanup`` at start: it touches only what dead processes left).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from coldstart.launcher.cluster.node import NodeSettings, with_node
from coldstart.launcher.config import ServeConfig
from coldstart.launcher.control import control_client

log = logging.getLogger("coldstart.cluster")

EXIT_POLL_S = 0.2
RELAY_CHUNK = 256 * 1024


@dataclass
class StartReport:
    """What ``ReplicaActor.start`` returns to the gateway (plain values: it crosses Ray)."""

    base_url: str  # the relay on the node's IP
    how: str  # "restore" or "cold_boot" (``StartKind`` values)
    node_id: str
    node_ip: str
    snapshot_key: str | None  # the deployment's snapshot identity on this node (None: snapshots off)
    holds_snapshot: bool  # the node's store has it now (taken, pulled or already there)
    engine_url: str = ""  # the sandbox's own address, reachable on the node only
    actor_pid: int = 0  # the actor's process on its node (its replicas' namespaces are cs-<pid>-*)
    restore_failed: str | None = None  # the ``RestoreReason`` of a restore that fell back to a cold boot
    timings: dict[str, float] = field(default_factory=dict)


class Relay:
    """A TCP listener on the node's address that pipes every connection to the engine's sandbox."""

    def __init__(self, target: str, allowed: frozenset[str]) -> None:
        host, _, port = target.removeprefix("http://").rstrip("/").rpartition(":")
        self.target = (host, int(port))
        self.allowed = allowed  # peer addresses allowed to connect (empty: any)
        self.server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def open(self, host: str) -> int:
        self.server = await asyncio.start_server(self._serve, host, 0, backlog=256)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        try:
            peer = writer.get_extra_info("peername")
            if self.allowed and (not peer or peer[0] not in self.allowed):
                log.warning("relay: refused a connection from %s", peer)
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                return  # the engine is gone: the gateway sees a closed connection (and probes it)
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                up_writer.close()
        finally:
            writer.close()
            if task is not None:
                self._conns.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(RELAY_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


class ReplicaActor:
    """Wrapped with ``ray.remote`` by ``ray_host.py`` (this module imports nothing of Ray at the top)."""

    def __init__(self, config: ServeConfig, replica_id: str, allowed: tuple[str, ...] = ()) -> None:
        _default_loop_policy()
        # The engine's whole life (spawn, restore, relay, stop) runs on an asyncio loop of our own, in a
        # thread that lives as long as the actor: Ray's actor loop is uvloop, whose subprocesses inherit
        # the worker's descriptors (Ray's raylet.out, uvloop's own sockets) -- CRIU refused to dump an
        # engine holding them -- and the engines' death signal follows the thread that spawned them.
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="coldstart-replica", daemon=True)
        self._thread.start()
        self.config = config
        self.replica_id = replica_id
        self.allowed = frozenset(allowed)
        self.sandbox: Any = None  # launcher.sandboxes.base.Sandbox once started
        self.relay: Relay | None = None
        self.manager: Any = None  # SnapshotManager, when snapshots are on
        self._publish: asyncio.Task[str | None] | None = None
        self._stopped = False
        self._prepared: bool | None = None
        self.node: Any = None  # NodeSettings, once prepared
        self.adapter: Any = None
        self.econf: Any = None
        self.work = Path()

    def ping(self) -> str:
        return self.replica_id

    def pid(self) -> int:
        return os.getpid()

    async def _own(self, coro: Any) -> Any:
        """Run ``coro`` on the actor's own loop (see ``__init__``) and await it from Ray's."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    async def prepare(self) -> bool:
        return bool(await self._own(self._prepare()))

    async def start(self) -> StartReport:
        import ray

        node_id, node_ip = ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()
        report: StartReport = await self._own(self._start(node_id, node_ip))
        return report

    async def published(self) -> str | None:
        """The key of the snapshot this replica took, once published (None: none taken or not published)."""
        key: str | None = await self._own(self._published())
        return key

    async def stop(self, grace: float) -> None:
        """Stop the relay and the engine (SIGTERM, ``grace``, SIGKILL; its namespace removed). Idempotent."""
        await self._own(self._stop(grace))

    async def cpu_seconds(self) -> float | None:
        """CPU time the engine's processes used so far (the gateway's liveness: busy or hung)."""
        sandbox = self.sandbox
        return None if sandbox is None else await self._own(sandbox.cpu_seconds())

    async def is_healthy(self) -> bool:
        """The adapter's health probe of the engine, from this node (the gateway's liveness)."""
        sandbox = self.sandbox
        return sandbox is not None and bool(await self._own(self._is_healthy(sandbox)))

    async def _is_healthy(self, sandbox: Any) -> bool:
        async with control_client() as http:
            return bool(await sandbox.is_healthy(self.adapter, http))

    async def _prepare(self) -> bool:
        """Set up on this node (the node's settings, leftovers of dead actors removed, the adapter and the
        snapshot manager); returns whether a restore will be tried (the gateway moves the replica's state)."""
        from coldstart.engine_adapters.registry import get_adapter
        from coldstart.launcher.sandboxes.leftovers import log_cleanup
        from coldstart.launcher.settings import engine_config

        if self._prepared is not None:
            return self._prepared
        node = NodeSettings.load()
        self.node = node
        self.config = with_node(self.config, node)
        self.work = Path(self.config.work_dir) / "ray" / f"{self.replica_id}-{os.getpid()}"
        self.work.mkdir(parents=True, exist_ok=True)
        _log_to(self.work / "actor.log")
        await asyncio.to_thread(log_cleanup, Path(self.config.work_dir))
        self.adapter = get_adapter(self.config.engine, engine_python=self.config.engine_python)
        self.adapter.check_installed()
        econf = engine_config(self.config)
        if gpus := os.environ.get("CUDA_VISIBLE_DEVICES"):  # set by Ray for num_gpus=1
            econf = dataclasses.replace(econf, env={**econf.env, "CUDA_VISIBLE_DEVICES": gpus})
        self.econf = econf
        self.manager = manager = _snapshots(self.config, self.adapter, econf)
        restore = manager is not None and manager.store.has(manager.identity.key)
        if manager is not None and not restore and manager.remote is not None and manager.remote.tiers:
            # Published by another node? One ref lookup (not a failed restore counted before a first boot).
            restore = await asyncio.to_thread(manager.remote.find, manager.identity.key) is not None
        self._prepared = restore
        return restore

    async def _start(self, node_id: str, node_ip: str) -> StartReport:
        """Restore or cold-boot the engine on this node; returns once it serves (through the relay)."""
        started = time.monotonic()
        restore = await self._prepare()
        adapter, econf, work = self.adapter, self.econf, self.work
        report = StartReport(
            base_url="",
            how="cold_boot",
            node_id=node_id,
            node_ip=node_ip,
            snapshot_key=self.manager.identity.key if self.manager else None,
            holds_snapshot=False,
            actor_pid=os.getpid(),
        )
        async with control_client() as http:
            if restore:
                from coldstart.launcher.errors import RestoreFailed

                try:
                    self.sandbox = await self.manager.restore(adapter, econf, http, work, self.replica_id)
                    report.how = "restore"
                    report.timings.update(self.manager.restore_timings.get(self.replica_id, {}))
                except RestoreFailed as exc:
                    log.warning("replica %s: restore failed (%s): %s", self.replica_id, exc.reason, exc)
                    report.restore_failed = str(exc.reason)
                    await self._cold_boot(adapter, econf, http, work, snapshot=exc.reason.replace_snapshot)
            else:
                await self._cold_boot(adapter, econf, http, work, snapshot=self.manager is not None)
        if self.manager is not None:
            report.holds_snapshot = self.manager.store.has(self.manager.identity.key)
            if report.how == "cold_boot" and report.holds_snapshot and self.node.publish_to is not None:
                self._publish = asyncio.create_task(self._published_to(self.node.publish_to))
        self.relay = Relay(self.sandbox.base_url, self.allowed)
        port = await self.relay.open(report.node_ip)
        report.base_url = f"http://{report.node_ip}:{port}"
        report.engine_url = self.sandbox.base_url
        report.timings["start"] = time.monotonic() - started
        return report

    async def _cold_boot(
        self, adapter: Any, econf: Any, http: httpx.AsyncClient, work: Path, *, snapshot: bool
    ) -> None:
        from coldstart.launcher.boot import cold_boot
        from coldstart.launcher.sandboxes.plain import PlainSandbox

        if self.manager is not None:
            self.sandbox = self.manager.new_sandbox(work, self.replica_id)
        else:
            self.sandbox = PlainSandbox(f"{adapter.name}:{self.replica_id}")
        try:
            await cold_boot(self.sandbox, adapter, econf, http, timeout_s=self.config.boot_timeout)
            if snapshot and self.manager is not None:
                await self.manager.snapshot(self.sandbox, adapter, econf, http)
        except BaseException:
            await self.sandbox.stop(2.0)
            raise

    async def _published_to(self, origin: Path) -> str | None:
        """Publish the snapshot this replica took into the node's chunk store (the other nodes pull it)."""
        from coldstart.launcher.errors import SnapshotError

        key = self.manager.identity.key
        snapshot = self.manager.store.lookup(key)
        try:
            await asyncio.to_thread(node_tiers(self.config, (), None, origin).publish, snapshot)
        except (SnapshotError, OSError) as exc:
            log.warning("snapshot %s not published: %s", key, exc)
            return None
        return str(key)

    async def _published(self) -> str | None:
        if self._publish is None:
            return None
        return await asyncio.shield(self._publish)

    async def wait_exit(self) -> int:
        """Returns the engine's exit status once it has exited (a long poll the gateway keeps open)."""
        while self.sandbox is None or (code := self.sandbox.exit_code()) is None:
            await asyncio.sleep(EXIT_POLL_S)
        return int(code)

    async def _stop(self, grace: float) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.relay is not None:
            await self.relay.close()
        if self.sandbox is not None:
            await self.sandbox.stop(grace)
        if self._publish is not None and not self._publish.done():
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._publish), 60.0)
        if self.manager is not None:
            await self.manager.close()  # its pull-ahead thread and the store's fsync threads


def _log_to(path: Path) -> None:
    """The actor's coldstart log lines (restore, snapshot, boot failures) into its folder on the node."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("coldstart")
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def _default_loop_policy() -> None:
    """Ray installs uvloop as the event-loop policy of its worker processes; the netlink client that makes
    replica namespaces (pyroute2, in a thread of its own) then gets a uvloop loop, which cannot open a
    netlink socket ("cannot open a UDP handle, invalid family 16"). This process is the actor's alone
    (one Ray worker per actor): new loops are asyncio's again; Ray's running loop is untouched."""
    asyncio.set_event_loop_policy(None)


def _snapshots(config: ServeConfig, adapter: Any, econf: Any) -> Any:
    """The node's ``SnapshotManager`` for this deployment (None with ``--snapshot off``, or ``auto`` on a
    node where no checkpointer works)."""
    from coldstart.launcher.errors import CheckpointerUnavailable, GpuRefused
    from coldstart.launcher.metrics import Metrics
    from coldstart.launcher.settings import snapshot_settings
    from coldstart.launcher.snapshots.manager import snapshots_for

    settings = snapshot_settings(config)
    if settings is None:
        return None
    try:
        return snapshots_for(settings, adapter, econf, Metrics().for_model(config.public_model_name))
    except (CheckpointerUnavailable, GpuRefused) as exc:
        if config.snapshot != "auto":
            raise
        log.warning("snapshots off on this node: %s", exc)
        return None


def node_tiers(
    config: ServeConfig, tiers: tuple[str, ...], cache: Path | None, publish_to: Path | None
) -> Any:
    """The node's ``SnapshotTiers`` with the deployment's trust key (``--snapshot-trust-key``, the same path
    on every node): what an actor publishes is signed, what a node pulls ahead is checked, as on one host."""
    from coldstart.launcher.snapshots.remote import remote_for

    return remote_for(list(tiers), cache, publish_to, config.snapshot_trust_key)


def pull_ahead(config: ServeConfig) -> dict[str, Any]:
    """Pull the deployment's snapshot into this node's store, if it has none (a Ray task pinned to a node).
    Returns ``{"key", "held", "pulled", "seconds"}``; a failure is reported, never raised (the first restore
    here meets it again with its reason)."""
    import ray

    from coldstart.engine_adapters.registry import get_adapter
    from coldstart.launcher.metrics import Metrics
    from coldstart.launcher.settings import engine_config, snapshot_settings
    from coldstart.launcher.snapshots.manager import snapshots_for

    _default_loop_policy()
    node = NodeSettings.load()
    config = with_node(config, node)
    settings = snapshot_settings(config)
    node_id = ray.get_runtime_context().get_node_id()
    if settings is None or not node.tiers:
        return {"key": None, "held": False, "pulled": False, "seconds": 0.0, "node_id": node_id}
    adapter = get_adapter(config.engine, engine_python=config.engine_python)
    econf = engine_config(config)
    # Built without tiers (snapshots_for would start a prefetch thread of its own), then pulled here.
    manager = snapshots_for(
        dataclasses.replace(settings, tiers=()), adapter, econf, Metrics().for_model(config.public_model_name)
    )
    key = manager.identity.key
    if manager.store.has(key):
        return {"key": key, "held": True, "pulled": False, "seconds": 0.0, "node_id": node_id}
    manager.remote = node_tiers(config, node.tiers, node.chunk_cache, None)
    started = time.monotonic()
    thread = manager.prefetch(adapter, econf)
    if thread is not None:
        thread.join()
    held = manager.store.has(key)
    manager.store.join_background(60.0)
    return {
        "key": key,
        "held": held,
        "pulled": held,
        "seconds": round(time.monotonic() - started, 3),
        "node_id": node_id,
    }
