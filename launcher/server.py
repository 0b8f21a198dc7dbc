"""``run(ServeConfig)``: the programmatic API behind ``coldstart-serve``.

Order: validate everything a user can get wrong (engine, install, model path, port) before any process
starts; bring the proxy up; start the initial replicas; serve until SIGINT/SIGTERM (uvicorn's handlers,
scoped to ``serve()``); then stop every replica and release everything, also on errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

from coldstart.engine_adapters.base import EngineAdapter, EngineConfig
from coldstart.engine_adapters.registry import get_adapter
from coldstart.launcher.config import ServeConfig
from coldstart.launcher.errors import CheckpointerUnavailable, PortInUse, UsageError
from coldstart.launcher.image import image_mounted, with_mountpoint
from coldstart.launcher.logs import configured_logging
from coldstart.launcher.metrics import Metrics
from coldstart.launcher.process import port_is_free
from coldstart.launcher.proxy import Proxy
from coldstart.launcher.replica import ReplicaState
from coldstart.launcher.replicas import ReplicaManager, ScalingPolicy, Snapshots
from coldstart.pool import pool_for_host

log = logging.getLogger("coldstart.serve")


def engine_config(config: ServeConfig) -> EngineConfig:
    return EngineConfig(
        model=config.model, engine_args=tuple(config.engine_args), served_model_name=config.served_model_name
    )


def policy(config: ServeConfig) -> ScalingPolicy:
    if config.max_replicas < max(1, config.min_replicas, config.initial_replicas):
        raise UsageError("--max-replicas must be >= 1, --min-replicas and --initial-replicas")
    return ScalingPolicy(
        min_replicas=config.min_replicas,
        max_replicas=config.max_replicas,
        initial_replicas=config.initial_replicas,
        target_concurrency=config.target_concurrency,
        idle_timeout=config.idle_timeout,
        max_queue=config.max_queue,
        queue_timeout=config.queue_timeout,
        boot_timeout=config.boot_timeout,
        drain_timeout=config.drain_timeout,
    )


def validate(config: ServeConfig) -> EngineAdapter:
    """Everything checkable before starting anything; raises one-line errors. A model inside ``--image``
    is checked once the image is mounted (``check_model``)."""
    if not config.model:
        raise UsageError("MODEL is required: coldstart-serve ENGINE MODEL (see --help)")
    adapter = get_adapter(config.engine)
    adapter.check_installed()
    if config.snapshot == "cuda":  # CUDA checkpoint cannot restore NCCL: one GPU per replica
        from coldstart.launcher.checkpointers.cuda import refuse_unsupported_engine_args

        refuse_unsupported_engine_args(config.engine_args)
    if config.image is None:
        check_model(adapter, config)
    elif not Path(config.image).is_file():
        raise UsageError(f"--image {config.image}: no such index (build one with: coldstart image build)")
    if not port_is_free(config.host, config.port):
        raise PortInUse(
            f"port {config.port} on {config.host} is in use: pass --port N or stop what listens there"
        )
    return adapter


def check_model(adapter: EngineAdapter, config: ServeConfig) -> None:
    adapter.upstream_model_name(engine_config(config))  # raises ModelNotFound for a missing local path


def make_snapshots(config: ServeConfig, adapter: EngineAdapter, metrics: Metrics) -> Snapshots | None:
    if config.snapshot == "off":
        return None
    from coldstart.launcher.snapshots.manager import snapshots_for  # imported only when snapshots are on

    try:
        return snapshots_for(config, adapter, engine_config(config), metrics)  # type: ignore[no-any-return]
    except CheckpointerUnavailable as exc:
        if config.snapshot != "auto":
            raise  # asked for by name: say why it cannot work here
        log.warning("snapshots off: %s", exc, extra={"event": "snapshots_off"})
        return None


async def serve(config: ServeConfig, *, ready: asyncio.Event | None = None) -> None:
    """Serve until cancelled or signalled. ``ready`` is set once the proxy listens. Everything started
    here is stopped on the way out (replicas, pool, image mount), also on errors."""
    adapter = validate(config)
    async with contextlib.AsyncExitStack() as undo:
        undo.callback(log.info, "stopped", extra={"event": "stopped"})  # runs last
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
            policy(config),
            metrics,
            work_dir,
            snapshots=make_snapshots(config, adapter, metrics),
            pool=pool,
        )
        undo.push_async_callback(manager.close)
        proxy = Proxy(
            manager, metrics, config.public_model_name, adapter.upstream_model_name(econf), config.api_key
        )
        undo.push_async_callback(proxy.aclose)
        await _serve_proxy(config, adapter, manager, proxy, mount, ready)


async def _serve_proxy(
    config: ServeConfig,
    adapter: EngineAdapter,
    manager: ReplicaManager,
    proxy: Proxy,
    mount: Any,
    ready: asyncio.Event | None,
) -> None:
    server = _ProxyServer(
        uvicorn.Config(
            proxy.app(),
            host=config.host,
            port=config.port,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
    )
    started = time.monotonic()
    server_task = asyncio.create_task(server.serve(), name="proxy")
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
        await server_task
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
    assert task is not None  # called from a coroutine
    inner = asyncio.create_task(serve(config), name="serve")
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, inner.cancel)
    try:
        await inner
    except asyncio.CancelledError:
        if task.cancelling():  # we ourselves were cancelled, not by a signal
            raise
        log.info("signal received: stopped cleanly", extra={"event": "signal"})
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def run(config: ServeConfig) -> None:
    """Blocking entry point (``coldstart-serve``): logging set up for the call, then ``serve``."""
    with configured_logging(config.log_format, config.log_level):
        asyncio.run(serve_until_signalled(config))
