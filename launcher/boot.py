"""Cold boot: start the engine in a sandbox, wait until it is healthy, send the warm-up requests.

A boot that fails says why in its first line: the engine's root-cause line (``process.root_cause``: the
memory or allocation failure, else the first exception), then up to six such lines, the last lines, and the
file that holds the whole output (``engine.log`` in the replica's work folder). The error carries the
one-line reason as ``root_cause`` (for the 503 a held request gets, and to tell one failure from another).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import httpx

from coldstart.engine_adapters.base import EngineAdapter, EngineConfig
from coldstart.launcher.errors import BootTimeout, EngineExited, WarmupFailed
from coldstart.launcher.process import one_line_cause, root_cause
from coldstart.launcher.sandboxes.base import Sandbox

HEALTH_POLL_S = 0.05
TAIL_LINES = 20
log = logging.getLogger("coldstart.boot")


def failure_report(sandbox: Sandbox) -> tuple[str, str, str]:
    """(root-cause line, the report below the error's first line, tail) of an engine that failed."""
    output = sandbox.output()
    tail = sandbox.log_tail(TAIL_LINES)
    causes = output.root_cause() if output is not None else root_cause(tail.splitlines())
    cause = one_line_cause(causes)
    parts = []
    if causes:
        parts.append("root cause:\n" + "\n".join(causes))
    parts.append(f"last lines:\n{tail}")
    if output is not None and output.log_path is not None:
        parts.append(f"whole output: {output.log_path}")
    return cause, "\n".join(parts), tail


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
            await _drain(sandbox)
            cause, report, tail = failure_report(sandbox)
            raise EngineExited(
                f"{adapter.name} exited with status {code} while {while_}"
                f"{': ' + cause if cause else ''}\n{report}",
                tail,
                root_cause=cause,
            )
        if await adapter.is_healthy(http, sandbox.base_url):
            return
        if time.monotonic() > deadline:
            cause, report, tail = failure_report(sandbox)
            raise BootTimeout(
                f"{adapter.name} not healthy after {timeout_s:.0f} s (raise --boot-timeout)"
                f"{': ' + cause if cause else ''}\n{report}",
                tail,
                root_cause=cause,
            )
        await asyncio.sleep(poll_s)


async def _drain(sandbox: Sandbox, drain_s: float = 1.0) -> None:
    """Let the output of an engine that just exited reach its tail (the pipe still holds its last lines:
    the root cause is often among them)."""
    output = sandbox.output()
    if output is not None:
        await output.wait_eof(drain_s)


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
    for warning in adapter.boot_warnings(engine_config):
        log.warning("%s", warning, extra={"event": "boot_warning"})
    if engine_config.env:
        spec = dataclasses.replace(spec, env={**spec.env, **engine_config.env})
    await sandbox.start(spec)
    await wait_healthy(sandbox, adapter, http, timeout_s=timeout_s)
    if warmup:
        await warm_up(sandbox, adapter, engine_config, http)
