"""Launcher side of the control channel (used by ``engine_adapters.custom``): stdlib asyncio only.

Every call opens a fresh TCP connection, sends one HTTP/1.1 request, reads the whole answer and then
closes *first*, so the TIME_WAIT lands on the launcher and the engine keeps no socket but its listener
(see ``control.py`` for why). A pooled client (httpx) would keep the connection for reuse: exactly what
must not straddle a checkpoint.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlsplit

from coldstart.snapshot_hooks.errors import (
    CheckpointAborted,
    ControlProtocolError,
    ControlUnreachable,
    RestoreHooksFailed,
)

# The control port is the engine port + this offset unless the launcher says otherwise.
DEFAULT_PORT_OFFSET = 1


def control_port_for(engine_port: int, offset: int = DEFAULT_PORT_OFFSET) -> int:
    port = engine_port + offset
    return port if port <= 65535 else engine_port - offset


def control_url_for(base_url: str, offset: int = DEFAULT_PORT_OFFSET) -> str:
    """``http://10.88.0.2:8000`` -> ``http://10.88.0.2:8001``: same host, the engine's control port."""
    parts = urlsplit(base_url)
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"base_url {base_url!r} needs an explicit host and port")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"http://{host}:{control_port_for(parts.port, offset)}"


async def request(control_url: str, method: str, path: str, timeout_s: float) -> tuple[int, dict[str, Any]]:
    """One request on a fresh connection that we close; returns (status, JSON body)."""
    parts = urlsplit(control_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    try:
        return await asyncio.wait_for(_exchange(host, port, method, path), timeout_s)
    except TimeoutError as exc:
        raise ControlUnreachable(
            f"control channel {control_url}{path}: no answer within {timeout_s:g} s"
        ) from exc
    except OSError as exc:
        raise ControlUnreachable(
            f"control channel {control_url}: {exc.strerror or exc}; "
            "does the engine call snapshot_hooks.serve()?"
        ) from exc


async def _exchange(host: str, port: int, method: str, path: str) -> tuple[int, dict[str, Any]]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: 0\r\n\r\n".encode())
        await writer.drain()
        status_line = (await reader.readline()).decode("latin-1").split()
        if len(status_line) < 2 or not status_line[1].isdigit():
            raise ControlProtocolError(f"control channel {host}:{port}: not an HTTP answer: {status_line!r}")
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise ControlProtocolError(f"control channel {host}:{port}: answer cut short") from exc
    finally:
        writer.close()  # we close first: TIME_WAIT stays on our side, never in the engine
        try:
            await writer.wait_closed()
        except OSError:
            pass
    try:
        return int(status_line[1]), json.loads(body)
    except ValueError as exc:
        raise ControlProtocolError(f"control channel {host}:{port}: answer is not JSON") from exc


async def get_state(control_url: str, timeout_s: float = 2.0) -> dict[str, Any]:
    status, body = await request(control_url, "GET", "/state", timeout_s)
    if status != 200 or "state" not in body:
        raise ControlProtocolError(f"control channel {control_url}/state answered {status}")
    return body


async def run_before_checkpoint(control_url: str, timeout_s: float) -> dict[str, Any]:
    """Run the engine's before-checkpoint hooks. Raises ``CheckpointAborted`` (``serving`` tells whether
    the engine rolled back and still serves)."""
    status, body = await request(control_url, "POST", "/before_checkpoint", timeout_s)
    if status == 200 and body.get("ok"):
        return body
    serving = body.get("state") == "serving"
    raise CheckpointAborted(
        "before_checkpoint",
        body.get("failed_hook"),
        _message("checkpoint aborted", body, status),
        serving=serving,
    )


async def run_after_restore(control_url: str, timeout_s: float) -> dict[str, Any]:
    """Run the engine's after-restore hooks. Raises ``RestoreHooksFailed``: discard the replica."""
    status, body = await request(control_url, "POST", "/after_restore", timeout_s)
    if status == 200 and body.get("ok"):
        return body
    raise RestoreHooksFailed(
        "after_restore",
        body.get("failed_hook"),
        _message("after-restore failed; discard this replica", body, status),
        serving=False,
    )


def _message(what: str, body: dict[str, Any], status: int) -> str:
    detail = body.get("error") or f"HTTP {status}"
    extra = ""
    if body.get("rolled_back"):
        extra = " (engine rolled back and keeps serving)"
    elif body.get("rollback_error"):
        extra = f" (rollback failed too: {body['rollback_error']})"
    return f"{what}: {detail}{extra}"
