"""``run(GatewayConfig | ServeConfig)``: the programmatic API behind ``coldstart-serve``.

Order: validate everything a user can get wrong (every deployment's engine, install, model path) and bind
the proxy's port before any process starts; mount images, set up each deployment's snapshots; one pool of
units for the host (or a Ray cluster with ``--cluster``); the gateway (``gateway.py``) and the proxy up;
start the initial replicas where units are free; serve until SIGINT/SIGTERM (``serve_until_signalled``);
then stop every replica and release everything, also on errors. A ``ServeConfig`` is a deployments file of
one (``deployments.single``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import math
import os
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

from coldstart.engine_adapters.base import EngineAdapter
from coldstart.engine_adapters.registry import get_adapter
from coldstart.launcher.config import GatewayConfig, ServeConfig, parse_bytes
from coldstart.launcher.control import control_client
from coldstart.launcher.deployment import Deployment, Snapshots
from coldstart.launcher.deployments import single
from coldstart.launcher.errors import CheckpointerUnavailable, GpuRefused, PortInUse, UsageError
from coldstart.launcher.gateway import Gateway
from coldstart.launcher.image import (
    boot_over,
    engine_from_image,
    engine_in_image,
    image_mounted,
    with_mountpoint,
)
from coldstart.launcher.local_host import LocalHost
from coldstart.launcher.logs import configured_logging
from coldstart.launcher.metrics import Metrics, ModelMetrics
from coldstart.launcher.placement import ReplicaHost
from coldstart.launcher.process import raise_nofile_limit
from coldstart.launcher.proxy import Proxy
from coldstart.launcher.sandboxes.leftovers import log_cleanup
from coldstart.launcher.settings import engine_config, scaling_policy, snapshot_settings
from coldstart.launcher.snapshots.store import private_dir
from coldstart.launcher.tasks import TaskOwner
from coldstart.pool import pool_for_host

log = logging.getLogger("coldstart.serve")


def validate(config: ServeConfig) -> EngineAdapter:
    """Everything checkable before starting anything; raises one-line errors. A model inside ``--image``
    is checked once the image is mounted (``check_model``), and so is an engine whose environment may be
    there (``engine_in_image``)."""
    if not config.model:
        raise UsageError("MODEL is required: coldstart-serve ENGINE MODEL (see --help)")
    adapter = get_adapter(config.engine, engine_python=config.engine_python)
    if not engine_in_image(config):  # else asked once the image is mounted (_deployment)
        check_engine(adapter, config)
    if config.snapshot == "cuda":  # asked for by name: refuse before anything starts (auto: make_snapshots)
        from coldstart.launcher.checkpointers.cuda import refuse_unsupported_engine_args

        refuse_unsupported_engine_args(config.engine_args)
    if config.image is None:
        ensure_model(config)
        check_model(adapter, config)
    elif not Path(config.image).is_file():
        raise UsageError(f"--image {config.image}: no such index (build one with: coldstart image build)")
    return adapter


def check_engine(adapter: EngineAdapter, config: ServeConfig) -> None:
    """The engine is installed (its version asked of its environment) and takes these engine arguments."""
    adapter.check_installed()
    adapter.check_engine_args(tuple(config.engine_args))


def ensure_model(config: ServeConfig) -> None:
    """Make a recipe's missing local model (``make_model``) now that serving starts, never while
    arguments are parsed (``--help`` or a typo must not write a 1.2 GB model)."""
    if config.make_model is None or (Path(config.model) / "config.json").exists():
        return
    from coldstart.launcher.tiny_model import make_model

    log.info("making model %s (%s) for its first use", config.model, config.make_model)
    make_model(Path(config.model), config.make_model)


def bind_proxy_socket(host: str, port: int) -> socket.socket:
    """The proxy's listening socket, bound now: the port is ours from here on (no check-then-bind race)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise UsageError(f"--host {host}: cannot resolve it ({exc.strerror})") from exc
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT does not block
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(
                f"port {port} on {host} is in use: pass --port N or stop what listens there"
            ) from exc
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror}): check --host") from exc
    sock.set_inheritable(False)
    return sock


def check_model(adapter: EngineAdapter, config: ServeConfig) -> None:
    adapter.upstream_model_name(engine_config(config))  # raises ModelNotFound for a missing local path


def make_snapshots(config: ServeConfig, adapter: EngineAdapter, metrics: ModelMetrics) -> Snapshots | None:
    settings = snapshot_settings(config)
    if settings is None:
        return None
    from coldstart.launcher.snapshots.manager import snapshots_for  # imported only when snapshots are on

    try:
        return snapshots_for(settings, adapter, engine_config(config), metrics)
    except (CheckpointerUnavailable, GpuRefused) as exc:
        if config.snapshot != "auto":
            raise  # asked for by name: say why it cannot work here
        log.warning(
            "%s: snapshots off: %s",
            config.public_model_name,
            exc,
            extra={"event": "snapshots_off", "model": config.public_model_name},
        )
        return None


def memory_budget(server: ServeConfig) -> int:
    """``--memory-budget``, else 90% of what the host has available now (CPU slots are bounded by it)."""
    if server.memory_budget:
        return parse_bytes(server.memory_budget)
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 * 9 // 10
    return 0


def launcher_work_dir(work_dir: Path) -> Path:
    """This launcher's own folder under ``--work-dir`` (two launchers on the same folder never share a
    replica's files); folders of launchers that are gone are removed. Raises a one-line error when the
    folder cannot be written."""
    try:
        private_dir(work_dir)  # engine logs and page images hold the engines' memory and environment
        for old in work_dir.glob("launcher-*"):
            pid = old.name.removeprefix("launcher-")
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                shutil.rmtree(old, ignore_errors=True)
        mine = private_dir(work_dir / f"launcher-{os.getpid()}")
    except OSError as exc:
        raise UsageError(
            f"--work-dir {work_dir}: cannot write there ({exc.strerror}); pass a writable folder"
        ) from exc
    return mine


async def _deployment(
    config: ServeConfig,
    adapter: EngineAdapter,
    metrics: Metrics,
    undo: contextlib.AsyncExitStack,
    index: int,
) -> Deployment:
    """One deployment, its image mounted (unmounted by ``undo``) and its snapshots set up; with an image,
    the boot's read order is saved as its profile once a first replica is ready."""
    if config.image is not None:
        mountpoint = Path(config.image_mount or Path(config.work_dir) / f"image-{index}").resolve()
        config = with_mountpoint(config, mountpoint)  # {image} -> where it is about to be mounted
    bound = metrics.for_model(config.public_model_name)
    mount = await undo.enter_async_context(image_mounted(config, bound))
    profile_saver = TaskOwner()
    undo.push_async_callback(profile_saver.close)  # ends before the image is unmounted (LIFO)
    if mount is not None:
        if engine_in_image(config):  # its environment may be in the image: found now that it is mounted
            adapter = await engine_from_image(config)
        check_model(adapter, config)
    econf = engine_config(config)
    name = config.public_model_name
    upstream = adapter.upstream_model_name(econf)
    deployment = Deployment(
        name,
        adapter,
        econf,
        scaling_policy(config),
        bound,
        upstream_model=upstream,
        # On a cluster each node's replica actor keeps the snapshots; the gateway holds none.
        snapshots=None if config.cluster else make_snapshots(config, adapter, bound),
        config=config,
        weight=config.weight,
        priority=config.priority,
        aliases=(upstream,) if upstream != name else (),
    )
    if deployment.snapshots is not None:  # before any replica ran here: what its snapshot recorded
        deployment.memory_estimate = deployment.snapshots.resident_hint()
    if mount is not None:
        profile_saver.spawn(_save_profile_when_ready(deployment, mount), name=f"profile-{name}")
    return deployment


async def _save_profile_when_ready(deployment: Deployment, mount: Any) -> None:
    """The boot is over once a replica is ready: what it read, in order, is the image's profile (what
    follows, requests and later boots, is not). An image unmounted first saves what was read by then."""
    await deployment.first_ready.wait()
    await boot_over(mount, deployment.metrics)


async def _replica_host(
    gateway_config: GatewayConfig, metrics: Metrics, http: Any, work_dir: Path
) -> tuple[ReplicaHost, float]:
    """Where replicas run, and a unit's lead time: a Ray cluster with ``--cluster``, else this host's pool
    (its GPUs, or CPU slots bounded by memory)."""
    server = gateway_config.server
    if server.cluster:
        from coldstart.launcher.cluster.ray_host import RayHost  # Ray is imported only with --cluster

        # Connecting (ray.init) blocks: off the event loop.
        host = await asyncio.to_thread(RayHost, server.cluster, server, metrics)
        return host, float(getattr(host, "unit_lead_time_s", 60.0))
    pool = pool_for_host(cpu_slots=gateway_config.cpu_units, target_idle=0)
    await pool.start()
    budget = memory_budget(server)
    local = LocalHost(pool, http, work_dir, budget or None)
    log.info(
        "units: %s %s slot(s)%s",
        pool.provider.capacity(),
        pool.kind,
        f", {budget / (1 << 30):.1f} GiB for replicas" if pool.kind == "cpu" and budget else "",
        extra={"event": "units", "capacity": pool.provider.capacity(), "kind": pool.kind},
    )
    return local, 0.0 if pool.kind == "cpu" else 2.0


async def serve(config: ServeConfig | GatewayConfig, *, ready: asyncio.Event | None = None) -> None:
    """Serve until cancelled or signalled. ``ready`` is set once the proxy listens. Everything started
    here is stopped on the way out (replicas, pool, image mounts), also on errors."""
    gateway_config = config if isinstance(config, GatewayConfig) else single(config)
    server = gateway_config.server
    adapters = [validate(d) for d in gateway_config.deployments]
    async with contextlib.AsyncExitStack() as undo:
        sock = undo.enter_context(bind_proxy_socket(server.host, server.port))
        undo.callback(log.info, "stopped", extra={"event": "stopped"})  # runs last but one
        raise_nofile_limit()  # thousands of client connections must not starve the health probes
        # What a killed launcher left (engines, namespaces, veths, containers, dead mounts), each said.
        await asyncio.to_thread(log_cleanup, Path(server.work_dir))
        work_dir = launcher_work_dir(Path(server.work_dir))
        undo.callback(shutil.rmtree, work_dir, True)
        metrics = Metrics()
        http = control_client()
        undo.push_async_callback(http.aclose)
        deployments = [
            await _deployment(dataclasses.replace(d, work_dir=work_dir), adapter, metrics, undo, i)
            for i, (d, adapter) in enumerate(zip(gateway_config.deployments, adapters, strict=True))
        ]
        host, lead_time_s = await _replica_host(gateway_config, metrics, http, work_dir)
        undo.push_async_callback(host.close)
        gateway = Gateway(
            deployments, host, metrics, http, min_residency=server.min_residency, unit_lead_time_s=lead_time_s
        )
        undo.push_async_callback(gateway.close)
        proxy = Proxy(
            gateway,
            metrics,
            server.api_key,
            max_body_bytes=server.max_body_size,
            read_timeout=server.read_timeout,
        )
        undo.push_async_callback(proxy.aclose)
        await _serve_proxy(server, gateway, proxy, ready, sock)


async def _serve_proxy(
    server_config: ServeConfig,
    gateway: Gateway,
    proxy: Proxy,
    ready: asyncio.Event | None,
    sock: socket.socket,
) -> None:
    server = _ProxyServer(
        uvicorn.Config(
            proxy.app(),
            host=server_config.host,
            port=server_config.port,
            http=proxy.http_protocol(),  # with a header timeout
            # On SIGTERM in-flight requests get --drain-timeout to finish, then are cut (not waited forever).
            timeout_graceful_shutdown=math.ceil(server_config.drain_timeout),  # uvicorn takes whole seconds
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
    )
    started = time.monotonic()
    server_task = asyncio.create_task(server.serve(sockets=[sock]), name="proxy")
    try:
        while not server.started:
            if server_task.done():
                await server_task
                raise PortInUse(f"the proxy could not listen on {server_config.host}:{server_config.port}")
            await asyncio.sleep(0.01)
        names = ", ".join(f"{name!r} ({d.adapter.name})" for name, d in gateway.deployments.items())
        log.info(
            "proxy listening on http://%s:%d (models %s)",
            server_config.host,
            server_config.port,
            names,
            extra={"event": "proxy_up", "duration_s": round(time.monotonic() - started, 3)},
        )
        if ready is not None:
            ready.set()
        initial = await gateway.start()
        pending = set(initial)
        while pending and not server_task.done():
            done, _ = await asyncio.wait([server_task, *pending], return_when=asyncio.FIRST_COMPLETED)
            pending -= done
        if initial and not server_task.done():
            if not gateway.ready():
                errors = [d.last_boot_exception for d in gateway.deployments.values()]
                first = next((e for e in errors if e is not None), None)
                if first is not None and len(gateway.deployments) == 1:
                    raise first  # nothing serves: fail the launch, exit 1
            log.info(
                "ready in %.2fs",
                time.monotonic() - started,
                extra={"event": "ready", "duration_s": round(time.monotonic() - started, 3)},
            )
        # Shielded: a SIGTERM cancels serve(), not uvicorn, whose graceful shutdown below lets in-flight
        # requests finish (up to --drain-timeout) before the replicas are stopped under them.
        await asyncio.shield(server_task)
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await server_task


class _ProxyServer(uvicorn.Server):
    """uvicorn without its signal handlers: it re-raises captured signals when it exits, and a re-raised
    SIGTERM would kill the launcher before it stops its engines. ``run`` owns the signals instead."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve_until_signalled(config: ServeConfig | GatewayConfig) -> None:
    """``serve`` until SIGINT or SIGTERM, which cancel it (its cleanup stops every replica)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    inner = asyncio.create_task(serve(config), name="serve")
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, inner.cancel)
    try:
        await inner
    except asyncio.CancelledError:
        if task is not None and task.cancelling():  # we ourselves were cancelled, not by a signal
            raise
        log.info("signal received: stopped cleanly", extra={"event": "signal"})
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def run(config: ServeConfig | GatewayConfig) -> None:
    """Blocking entry point (``coldstart-serve``): logging set up for the call, then ``serve``."""
    server = config.server if isinstance(config, GatewayConfig) else config
    with configured_logging(server.log_format, server.log_level):
        asyncio.run(serve_until_signalled(config))
