"""``run(ServeConfig)``: the programmatic API behind ``coldstart-serve``.

Order: validate everything a user can get wrong (engine, install, model path) and bind the proxy's port
before any process starts; bring the proxy up; start the initial replicas; serve until SIGINT/SIGTERM
(``serve_until_signalled``); then stop every replica and release everything, also on errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

from coldstart.engine_adapters.base import EngineAdapter
from coldstart.engine_adapters.registry import get_adapter
from coldstart.launcher.config import ServeConfig
from coldstart.launcher.errors import CheckpointerUnavailable, GpuRefused, PortInUse, UsageError
from coldstart.launcher.image import image_mounted, with_mountpoint
from coldstart.launcher.logs import configured_logging
from coldstart.launcher.metrics import Metrics
from coldstart.launcher.proxy import Proxy
from coldstart.launcher.replica import ReplicaState
from coldstart.launcher.replicas import ReplicaManager, Snapshots
from coldstart.launcher.sandboxes.leftovers import log_cleanup
from coldstart.launcher.settings import engine_config, scaling_policy, snapshot_settings
from coldstart.pool import pool_for_host

log = logging.getLogger("coldstart.serve")


def validate(config: ServeConfig) -> EngineAdapter:
    """Everything checkable before starting anything; raises one-line errors. A model inside ``--image``
    is checked once the image is mounted (``check_model``)."""
    if not config.model:
        raise UsageError("MODEL is required: coldstart-serve ENGINE MODEL (see --help)")
    adapter = get_adapter(config.engine, engine_python=config.engine_python)
    adapter.check_installed()
    adapter.check_engine_args(tuple(config.engine_args))
    if config.snapshot == "cuda":  # asked for by name: refuse before anything starts (auto: make_snapshots)
        from coldstart.launcher.checkpointers.cuda import refuse_unsupported_engine_args

        refuse_unsupported_engine_args(config.engine_args)
    if config.image is None:
        ensure_model(config)
        check_model(adapter, config)
    elif not Path(config.image).is_file():
        raise UsageError(f"--image {config.image}: no such index (build one with: coldstart image build)")
    return adapter


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


def make_snapshots(config: ServeConfig, adapter: EngineAdapter, metrics: Metrics) -> Snapshots | None:
    settings = snapshot_settings(config)
    if settings is None:
        return None
    from coldstart.launcher.snapshots.manager import snapshots_for  # imported only when snapshots are on

    try:
        return snapshots_for(settings, adapter, engine_config(config), metrics)
    except (CheckpointerUnavailable, GpuRefused) as exc:
        if config.snapshot != "auto":
            raise  # asked for by name: say why it cannot work here
        log.warning("snapshots off: %s", exc, extra={"event": "snapshots_off"})
        return None


async def serve(config: ServeConfig, *, ready: asyncio.Event | None = None) -> None:
    """Serve until cancelled or signalled. ``ready`` is set once the proxy listens. Everything started
    here is stopped on the way out (replicas, pool, image mount), also on errors."""
    adapter = validate(config)
    async with contextlib.AsyncExitStack() as undo:
        sock = undo.enter_context(bind_proxy_socket(config.host, config.port))
        undo.callback(log.info, "stopped", extra={"event": "stopped"})  # runs last but one
        # What a killed launcher left (engines, namespaces, veths, containers, dead mounts), each said.
        await asyncio.to_thread(log_cleanup, Path(config.work_dir))
        mount = await undo.enter_async_context(image_mounted(config))
        if mount is not None:
            config = with_mountpoint(config, mount.mountpoint)
            check_model(adapter, config)
        metrics = Metrics()
        work_dir = Path(config.work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        econf = engine_config(config)
        # Replicas run on units of the buffer pool: this host's GPUs, or CPU slots where there are none.
        pool = pool_for_host(cpu_slots=config.max_replicas, target_idle=min(1, config.max_replicas))
        await pool.start()
        undo.push_async_callback(pool.close)
        manager = ReplicaManager(
            adapter,
            econf,
            scaling_policy(config),
            metrics,
            work_dir,
            snapshots=make_snapshots(config, adapter, metrics),
            pool=pool,
        )
        undo.push_async_callback(manager.close)
        proxy = Proxy(
            manager,
            metrics,
            config.public_model_name,
            adapter.upstream_model_name(econf),
            config.api_key,
            max_body_bytes=config.max_body_size,
            read_timeout=config.read_timeout,
        )
        undo.push_async_callback(proxy.aclose)
        await _serve_proxy(config, adapter, manager, proxy, mount, ready, sock)


async def _serve_proxy(
    config: ServeConfig,
    adapter: EngineAdapter,
    manager: ReplicaManager,
    proxy: Proxy,
    mount: Any,
    ready: asyncio.Event | None,
    sock: socket.socket,
) -> None:
    server = _ProxyServer(
        uvicorn.Config(
            proxy.app(),
            host=config.host,
            port=config.port,
            http=proxy.http_protocol(),  # with a header timeout
            # On SIGTERM in-flight requests get --drain-timeout to finish, then are cut (not waited forever).
            timeout_graceful_shutdown=math.ceil(config.drain_timeout),  # uvicorn takes whole seconds
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
                raise PortInUse(f"the proxy could not listen on {config.host}:{config.port}")
            await asyncio.sleep(0.01)
        log.info(
            "proxy listening on http://%s:%d (model %r, engine %s)",
            config.host,
            config.port,
            config.public_model_name,
            adapter.name,
            extra={"event": "proxy_up", "duration_s": round(time.monotonic() - started, 3)},
        )
        if ready is not None:
            ready.set()
        initial = await manager.start()
        pending = set(initial)
        while pending and not server_task.done():
            done, _ = await asyncio.wait([server_task, *pending], return_when=asyncio.FIRST_COMPLETED)
            pending -= done
        if initial and not server_task.done():
            if not any(r.state is ReplicaState.READY for r in manager.replicas.values()):
                if manager.last_boot_exception is not None:
                    raise manager.last_boot_exception  # nothing serves: fail the launch, exit 1
            log.info(
                "ready in %.2fs",
                time.monotonic() - started,
                extra={"event": "ready", "duration_s": round(time.monotonic() - started, 3)},
            )
            if mount is not None:
                await asyncio.to_thread(mount.save_profile)  # the boot is over: what it read, in order
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


async def serve_until_signalled(config: ServeConfig) -> None:
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


def run(config: ServeConfig) -> None:
    """Blocking entry point (``coldstart-serve``): logging set up for the call, then ``serve``."""
    with configured_logging(config.log_format, config.log_level):
        asyncio.run(serve_until_signalled(config))
