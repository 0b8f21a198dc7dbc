"""Cold boot: start the engine in a sandbox, wait until it is healthy, send the warm-up requests."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import httpx

from coldstart.engine_adapters.base import EngineAdapter, EngineConfig
from coldstart.launcher.errors import BootTimeout, EngineExited, WarmupFailed
from coldstart.launcher.sandboxes.base import Sandbox

HEALTH_POLL_S = 0.05


def config_for(sandbox: Sandbox, engine_config: EngineConfig) -> EngineConfig:
    """The engine config with the address the engine must bind inside ``sandbox``."""
    return dataclasses.replace(engine_config, host=sandbox.bind_host, port=sandbox.bind_port)


async def wait_healthy(
    sandbox: Sandbox,
    adapter: EngineAdapter,
    http: httpx.AsyncClient,
    *,
    timeout_s: float,
    poll_s: float = HEALTH_POLL_S,
    while_: str = "booting",
) -> None:
    """Poll the adapter's health probe every ``poll_s``; fail fast (with the log tail) if the engine exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        code = sandbox.exit_code()
        if code is not None:
            tail = sandbox.log_tail()
            raise EngineExited(
                f"{adapter.name} exited with status {code} while {while_}; last lines:\n{tail}", tail
            )
        if await adapter.is_healthy(http, sandbox.base_url):
            return
        if time.monotonic() > deadline:
            tail = sandbox.log_tail()
            raise BootTimeout(
                f"{adapter.name} not healthy after {timeout_s:.0f} s (raise --boot-timeout); last lines:\n"
                f"{tail}",
                tail,
            )
        await asyncio.sleep(poll_s)


async def warm_up(
    sandbox: Sandbox, adapter: EngineAdapter, engine_config: EngineConfig, http: httpx.AsyncClient
) -> None:
    """Send the adapter's (or recipe's) warm-up requests; each must answer 200."""
    for path, body in adapter.warmup_requests(engine_config):
        try:
            response = await http.post(f"{sandbox.base_url}{path}", json=body, timeout=300.0)
        except httpx.HTTPError as exc:
            raise WarmupFailed(f"warm-up request {path} failed: {exc!r}") from exc
        if response.status_code != 200:
            raise WarmupFailed(
                f"warm-up request {path} answered {response.status_code}: {response.text[:200]}"
            )


async def cold_boot(
    sandbox: Sandbox,
    adapter: EngineAdapter,
    engine_config: EngineConfig,
    http: httpx.AsyncClient,
    *,
    timeout_s: float,
    warmup: bool = True,
) -> None:
    """Start ``adapter``'s engine in ``sandbox`` and return once it is healthy and warmed up.

    On failure the sandbox is left for the caller to stop (the caller owns it).
    """
    spec = adapter.launch_spec(config_for(sandbox, engine_config))
    if engine_config.env:
        spec = dataclasses.replace(spec, env={**spec.env, **engine_config.env})
    await sandbox.start(spec)
    await wait_healthy(sandbox, adapter, http, timeout_s=timeout_s)
    if warmup:
        await warm_up(sandbox, adapter, engine_config, http)
