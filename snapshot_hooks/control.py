"""The control channel: how the launcher runs an engine's hooks and learns the outcome.

Design (and why):
- A tiny HTTP/1.1 listener on its own thread, started by ``serve()`` inside the engine process. It needs
  nothing from the engine's web framework (FastAPI, aiohttp, a bare socket loop: all the same), and it is
  reachable wherever the engine's own port is: the launcher passes ``COLDSTART_CONTROL_HOST`` (the engine's
  bind host) and ``COLDSTART_CONTROL_PORT`` and derives the URL from the sandbox's ``base_url`` host, so it
  works in a plain process, in a CRIU network namespace and inside a gVisor sandbox alike.
- No socket stays connected across a checkpoint. gVisor refuses to save established or TIME_WAIT TCP
  sockets and CRIU needs ``--tcp-established`` for them; so the channel is request/response over a fresh
  connection that the *launcher* closes first (the side that closes first holds TIME_WAIT). The server
  keeps the connection open after answering (HTTP/1.1 keep-alive) and closes only on the client's EOF, so
  its side goes CLOSE_WAIT -> LAST_ACK -> CLOSED and leaves nothing behind. Only the listening socket
  crosses the checkpoint; both checkpointers restore listening sockets.
- Rejected: a Unix socket (does not cross the gVisor boundary), a route on the engine's own HTTP server
  (framework specific, and the launcher's pooled keep-alive connections to that port would straddle the
  checkpoint), signals (no way to report which hook failed), a persistent connection (see above).

Routes: ``GET /state``; ``POST /before_checkpoint`` and ``POST /after_restore`` answer the ``PhaseResult``
as JSON: 200 when ok, 500 when a hook failed, 409 when the phase is not allowed now.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from coldstart.snapshot_hooks.errors import ControlPortError, HookStateError
from coldstart.snapshot_hooks.process_state import process_identity
from coldstart.snapshot_hooks.registry import HookRegistry, Phase, default_registry

PROTOCOL_VERSION = 1
ENV_PORT = "COLDSTART_CONTROL_PORT"
ENV_HOST = "COLDSTART_CONTROL_HOST"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    registry: HookRegistry


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client, not us, closes first
    timeout = 600  # a client that connects and never speaks does not pin a thread forever
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path != "/state":
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no route GET {self.path}"})
            return
        registry = self.server.registry
        self._reply(
            HTTPStatus.OK,
            {
                "protocol": PROTOCOL_VERSION,
                "state": registry.state.value,
                "pid": os.getpid(),
                "identity": process_identity().as_dict(),
                "hooks": {phase.value: [h.name for h in registry.hooks(phase)] for phase in Phase},
                "last_result": registry.last_result.as_dict() if registry.last_result else None,
            },
        )

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        registry = self.server.registry
        run = {
            "/before_checkpoint": registry.run_before_checkpoint,
            "/after_restore": registry.run_after_restore,
        }.get(self.path)
        if run is None:
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no route POST {self.path}"})
            return
        try:
            result = run()
        except HookStateError as exc:
            self._reply(HTTPStatus.CONFLICT, {"ok": False, "error": str(exc), "state": registry.state.value})
            return
        self._reply(HTTPStatus.OK if result.ok else HTTPStatus.INTERNAL_SERVER_ERROR, result.as_dict())

    def _reply(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet; the launcher logs
        pass


class ControlServer:
    """The listener thread. ``close()`` stops it; used as a context manager in tests."""

    def __init__(self, registry: HookRegistry, host: str, port: int) -> None:
        try:
            self._server = _Server((host, port), _Handler)
        except OSError as exc:
            raise ControlPortError(
                f"snapshot_hooks: cannot listen on {host}:{port} for the control channel ({exc.strerror}); "
                f"pick another {ENV_PORT}"
            ) from exc
        self._server.registry = registry
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="coldstart-control",
            daemon=True,
        )
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_served: ControlServer | None = None
_served_lock = threading.Lock()


def serve(
    *,
    registry: HookRegistry | None = None,
    host: str | None = None,
    port: int | None = None,
    loop: asyncio.AbstractEventLoop | None = None,
) -> ControlServer | None:
    """Start the control listener once per process; a no-op (None) when not run by coldstart.

    Host and port come from ``COLDSTART_CONTROL_HOST``/``COLDSTART_CONTROL_PORT`` unless given. Async hooks
    run on ``loop``, or on the running loop when called from inside one (e.g. an app's startup event).
    """
    global _served
    registry = registry or default_registry
    if loop is None:
        with contextlib.suppress(RuntimeError):
            loop = asyncio.get_running_loop()
    registry.attach_loop(loop)
    if port is None:
        raw = os.environ.get(ENV_PORT)
        if not raw:
            return None
        try:
            port = int(raw)
        except ValueError as exc:
            raise ControlPortError(f"snapshot_hooks: {ENV_PORT}={raw!r} is not a port number") from exc
    host = host or os.environ.get(ENV_HOST) or "127.0.0.1"
    with _served_lock:
        if _served is None:
            _served = ControlServer(registry, host, port)
        return _served
