"""A fake engine behind the real ``Sandbox``/``EngineAdapter`` interfaces, for fast tests of the replica
manager and the proxy (routing, queueing, scaling, faults) without booting a model.

It is a real HTTP/1.1 server on a loopback port (raw asyncio, so that a test controls exactly what each
connection does), answering the OpenAI routes the way engines misbehave:

- body ``{"sleep": S}``: answer after S seconds (a long generation);
- ``{"stream": true, "chunks": N}``: SSE, N chunks;
- ``{"max_tokens": -1}``: a FastAPI-style 422 ``{"detail": [...]}``, after which the engine drops the
  connection the moment the next request arrives on it (what a pooled keep-alive connection to uvicorn
  sees after it gave up on a connection);
- ``{"plain_500": true}``: a text/plain 500;
- ``{"drop": true}``: read the request, then close without answering;
- ``engine.hang()``: stop answering anything, /health included (SIGSTOP): its CPU time stands still;
- ``engine.busy()``: /health unanswered while requests go on (a generation holding the CPU): its CPU time
  grows at every look;
- ``engine.die()``: close every socket and report an exit status (SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any, ClassVar

import httpx

from coldstart.engine_adapters.base import EngineAdapter, EngineConfig, LaunchSpec
from coldstart.launcher.sandboxes.base import Sandbox


class FakeEngine:
    def __init__(self) -> None:
        self.received = 0  # inference requests read in full
        self.answered = 0
        self.cancelled = 0  # requests whose client (the proxy) went away before the answer
        self.in_flight = 0
        self.hung = asyncio.Event()
        self.busy_health = False  # /health unanswered, requests served (see busy())
        self.cpu_used = 0.0  # what the sandbox reports as the engine's CPU seconds
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def hang(self) -> None:
        self.hung.set()

    def busy(self) -> None:
        self.busy_health = True

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        poisoned = False
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if poisoned:
                    return  # the request arrived on a connection we gave up on: drop it
                method, path, *_ = head.split(b"\r\n", 1)[0].decode().split(" ")
                headers = dict(
                    line.decode().lower().split(": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line
                )
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                if self.hung.is_set():
                    await asyncio.Event().wait()  # never answers
                if path == "/health":
                    if self.busy_health:
                        await asyncio.Event().wait()  # never answers
                    await self._reply(writer, 200, {"status": "ok"})
                    continue
                self.received += 1
                request = json.loads(body or b"{}")
                if request.get("drop"):
                    return
                if request.get("max_tokens") == -1:
                    detail = [{"loc": ["body", "max_tokens"], "msg": "must be >= 1", "type": "value_error"}]
                    await self._reply(writer, 422, {"detail": detail})
                    poisoned = True
                    continue
                if request.get("plain_500"):
                    await self._reply(writer, 500, b"Internal Server Error", "text/plain")
                    continue
                self.in_flight += 1
                try:
                    await self._answer(reader, writer, request)
                finally:
                    self.in_flight -= 1
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: Any) -> None:
        if request.get("stream"):
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
                b"date: engine\r\nserver: engine\r\n\r\n"
            )
            for i in range(int(request.get("chunks", 3))):
                data = f"data: {json.dumps({'choices': [{'delta': {'content': str(i)}}]})}\n\n".encode()
                writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                await writer.drain()
                await asyncio.sleep(float(request.get("interval", 0)))
            done = b"data: [DONE]\n\n"
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
            await writer.drain()
            self.answered += 1
            return
        sleep = float(request.get("sleep", 0))
        if sleep:
            # A generation in progress; a closed connection (EOF) means the client went away.
            try:
                await asyncio.wait_for(reader.read(1), sleep)
            except TimeoutError:
                pass
            else:
                self.cancelled += 1
                raise ConnectionError("client went away")
        await self._reply(writer, 200, {"choices": [{"message": {"content": "ok"}}], "port": self.port})
        self.answered += 1

    @staticmethod
    async def _reply(
        writer: asyncio.StreamWriter, status: int, body: Any, content_type: str = "application/json"
    ) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        writer.write(
            f"HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ncontent-length: {len(data)}\r\n"
            "date: engine\r\nserver: engine\r\n\r\n".encode()
            + data
        )
        await writer.drain()


class FakeSandbox(Sandbox):
    """A ``FakeEngine`` as a sandbox. ``stop_s`` makes stopping take that long (a slow teardown)."""

    def __init__(self, stop_s: float = 0.0) -> None:
        self.engine = FakeEngine()
        self.stop_s = stop_s
        self.code: int | None = None
        self.started = False
        self.stops = 0
        self.stopped = asyncio.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.engine.port}"

    @property
    def bind_host(self) -> str:
        return "127.0.0.1"

    @property
    def bind_port(self) -> int:
        return self.engine.port

    async def start(self, spec: LaunchSpec) -> None:
        await self.engine.start()
        self.started = True

    def exit_code(self) -> int | None:
        return self.code

    async def cpu_seconds(self) -> float | None:
        if self.engine.busy_health and not self.engine.hung.is_set():
            self.engine.cpu_used += 0.5
        return self.engine.cpu_used

    def log_tail(self, lines: int = 20) -> str:
        return ""

    async def die(self) -> None:
        self.code = -9
        await self.engine.close()

    async def stop(self, grace_s: float = 10.0) -> None:
        self.stops += 1
        await self.engine.close()  # SIGTERM: it stops answering at once, its process exits, and the
        if self.code is None:  # rest of the teardown (namespaces, mounts) takes stop_s
            self.code = -15
        await asyncio.sleep(self.stop_s)
        self.stopped.set()


class FakeAdapter(EngineAdapter):
    name: ClassVar[str] = "fake"
    extra: ClassVar[str] = "fake"
    health_timeout_s: ClassVar[float] = 1.0

    def check_installed(self) -> None:
        pass

    def version(self) -> str:
        return "fake-1"

    def launch_spec(self, config: EngineConfig) -> LaunchSpec:
        return LaunchSpec(argv=["fake-engine"])

    def warmup_requests(self, config: EngineConfig) -> list[tuple[str, dict[str, Any]]]:
        return []


class FakeSnapshots:
    """A snapshot store that always has a snapshot: ``restore`` takes ``restore_s`` and gives a started
    ``FakeSandbox``. Every sandbox handed out is kept in ``sandboxes`` (by replica id)."""

    def __init__(self, restore_s: float | list[float] = 0.0, stop_s: float = 0.0) -> None:
        self.restore_s = restore_s if isinstance(restore_s, list) else [restore_s]
        self.stop_s = stop_s
        self.sandboxes: dict[str, FakeSandbox] = {}
        self.restores = 0

    def has_snapshot(self) -> bool:
        return True

    def resident_hint(self) -> int:
        return 0

    def new_sandbox(self, workdir: Path, replica_id: str) -> Sandbox:
        sandbox = self.sandboxes[replica_id] = FakeSandbox(self.stop_s)
        return sandbox

    async def restore(
        self,
        adapter: EngineAdapter,
        engine_config: EngineConfig,
        http: httpx.AsyncClient,
        workdir: Path,
        replica_id: str,
    ) -> Sandbox:
        self.restores += 1
        await asyncio.sleep(self.restore_s[min(self.restores, len(self.restore_s)) - 1])
        sandbox = self.sandboxes[replica_id] = FakeSandbox(self.stop_s)
        await sandbox.start(LaunchSpec(argv=["fake-engine"]))
        return sandbox

    async def snapshot(
        self, sandbox: Sandbox, adapter: EngineAdapter, engine_config: EngineConfig, http: httpx.AsyncClient
    ) -> None:
        pass

    async def close(self) -> None:
        pass
