"""The public OpenAI-compatible proxy (starlette): the only door to the replicas.

Routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/responses``, ``/v1/embeddings`` are forwarded
by their ``model`` to that deployment's router (``deployment.py``: requests are held while no replica has
room); an unknown model gets a 404 ``model_not_found`` naming the models served. ``/v1/models`` is answered
here, one entry per deployment with its ``state`` (ready / starting / failing / at_zero) as an extra field
(some engines list a hub cache instead of the served model). Everything else is 404: engine control
routes (``/sleep``, ``/wake_up``, ``/collective_rpc``, ``/release_memory_occupation``, ...) have no
authentication upstream and are never forwarded. This is an allow-list on purpose: a deny-list would leak
each new control route an engine adds.

Probes: ``GET /health`` is 200 whenever the proxy is up (it accepts and holds requests even at zero
replicas: a load tool waiting on it may start sending, and its requests start a replica); its body lists
the replicas. ``GET /ready`` is 200 only while a replica is READY, else 503 (a readiness probe; it starts
nothing). ``GET /metrics`` is Prometheus.

Every error the proxy returns is OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``), also
the engine's own (a FastAPI 422 ``{"detail": ...}`` or a plain-text 500 is wrapped, status kept), so the
``openai`` client raises its typed errors with a readable message. A deployment whose boots keep failing
the same way answers 503 ``boot_failed`` with the one-line reason and ``Retry-After``.

Failures upstream: a connection error or read timeout is not proof that a replica is dead (the engine may
have closed a keep-alive connection after answering a bad request with an error): the gateway is asked to
probe the replica (``suspect``), which it fails only if the engine exited or its health probe fails. A
request is retried on another replica only when the connection could not be opened (nothing was sent);
once bytes may have reached the engine it is never replayed silently (it may not be idempotent: it costs
tokens, it may have side effects): the client gets a 502 saying so and decides. Connections that carried
an error answer are closed, not pooled, and pooled ones idle no longer than engines keep them (uvicorn: 5 s).

The end-to-end clock ends here: a request that arrives while its deployment has no READY replica (it waits
for a restore or a boot) observes ``coldstart_phase_seconds{phase="first_token"}``, from its arrival to the
first token of its streamed answer: the first SSE event carrying content, text or a finish reason (engines
may send a role-only event before generating). Whole (non-streamed) answers have no first token to see and
are not counted; nor are requests that found a replica ready.

Streaming (SSE) is passed through chunk by chunk. If the engine dies mid-stream the client receives an
OpenAI-shaped ``error`` event and the stream ends (the ``openai`` client raises), never a hang. A client
that goes away cancels its upstream request, streaming or not (the engine sees the connection close).

The data plane uses aiohttp's client, not httpx (which the control plane uses): measured on this project's
2-core machine, a request through httpx's pool cost 1.0-2.0 ms against aiohttp's 0.4-0.5 ms, and the
proxy's goal is <= 1 ms added at p50 (bench/proxy_overhead.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from coldstart.launcher.deployment import Deployment
from coldstart.launcher.errors import BootFailing, QueueFull, QueueTimeout, ReplicaStateError
from coldstart.launcher.gateway import Gateway
from coldstart.launcher.metrics import Metrics
from coldstart.launcher.replica import Replica

log = logging.getLogger("coldstart.proxy")

FORWARDED = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings")
RETRY_AFTER_S = 5
MAX_BODY_BYTES = 32 * 1024 * 1024  # a request body above this is refused (413) before it is read whole
READ_TIMEOUT_S = 600.0  # longest silence from an engine within one answer (hung engines: liveness.py)
HEADER_TIMEOUT_S = 10.0  # a client must send a request's head within this (slowloris: hold no socket forever)
POOL_IDLE_S = 3.0  # below uvicorn's keep-alive (5 s): never reuse a connection the engine is closing
_ENGINE_ERROR_BYTES = 64 * 1024  # an engine's error body is read up to this to reshape it
# Hop-by-hop headers (RFC 9110 7.6.1), those the proxy recomputes, and those its own server sets
# (``date``, ``server``: uvicorn adds them; passing the engine's too would send each twice).
_DROP = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
        "content-length",
        "host",
        "authorization",
        "content-encoding",
        "date",
        "server",
    }
)


def openai_error(
    status: int, message: str, type_: str, code: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def shaped_engine_error(status: int, body: bytes) -> dict[str, Any] | None:
    """The OpenAI-shaped body for an engine's error answer, or None when it already is one."""
    text = body.decode(errors="replace")
    try:
        parsed: Any = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return None
    message: str
    if isinstance(parsed, dict) and "message" in parsed:  # vLLM's older {"object": "error", ...}
        message = str(parsed["message"])
    elif isinstance(parsed, dict) and "detail" in parsed:  # FastAPI: a string or pydantic's error list
        detail = parsed["detail"]
        if isinstance(detail, list):
            parts = [
                f"{'.'.join(map(str, d.get('loc', ())))}: {d.get('msg', d)}"
                if isinstance(d, dict)
                else str(d)
                for d in detail
            ]
            message = "; ".join(parts)
        else:
            message = str(detail)
    else:
        message = text.strip()[:1000] or f"engine answered {status}"
    type_ = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": type_, "param": None, "code": f"engine_{status}"}}


class _BodyTooLarge(Exception):
    pass


class Proxy:
    def __init__(
        self,
        gateway: Gateway,
        metrics: Metrics,
        api_key: str | None = None,
        *,
        max_body_bytes: int = MAX_BODY_BYTES,
        read_timeout: float = READ_TIMEOUT_S,
        header_timeout: float = HEADER_TIMEOUT_S,
    ) -> None:
        self.gateway = gateway
        self.metrics = metrics
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.read_timeout = read_timeout
        self.header_timeout = header_timeout
        self.created = int(time.time())
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        # Created on first use, inside the running loop. No pool cap (1000s of concurrent streams), no
        # total timeout (generation can be long) but a bound on silence, bytes passed through undecoded.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=POOL_IDLE_S),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.read_timeout),
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
                response_class=_NoReuseAfterError,
            )
        return self._session

    def http_protocol(self) -> type[asyncio.Protocol]:
        """uvicorn's HTTP protocol with a header timeout (``uvicorn.Config(http=...)``)."""
        return _with_header_timeout(self.header_timeout)

    def app(self) -> Starlette:
        routes = [Route(path, self.forward, methods=["POST"]) for path in FORWARDED]
        routes += [
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/ready", self.ready, methods=["GET"]),
            Route("/metrics", self.metrics_route, methods=["GET"]),
        ]
        return Starlette(
            routes=routes,
            exception_handlers={404: self._not_found, 405: self._not_allowed, Exception: self._crashed},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    # ------------------------------------------------------------------ local routes
    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return openai_error(404, f"route {request.url.path} not found", "invalid_request_error", "not_found")

    async def _not_allowed(self, request: Request, exc: Exception) -> Response:
        return openai_error(
            405,
            f"method {request.method} not allowed on {request.url.path}",
            "invalid_request_error",
            "method_not_allowed",
        )

    async def _crashed(self, request: Request, exc: Exception) -> Response:
        log.exception("proxy error on %s", request.url.path, exc_info=exc)
        return openai_error(500, f"proxy error: {type(exc).__name__}", "server_error", "proxy_error")

    def _unauthorized(self, request: Request) -> Response | None:
        if self.api_key is None:
            return None
        if request.headers.get("authorization", "") != f"Bearer {self.api_key}":
            return openai_error(
                401,
                "invalid or missing API key (send 'Authorization: Bearer KEY')",
                "authentication_error",
                "invalid_api_key",
            )
        return None

    async def models(self, request: Request) -> Response:
        if (denied := self._unauthorized(request)) is not None:
            return denied
        data = [
            {
                "id": d.name,
                "object": "model",
                "created": self.created,
                "owned_by": "coldstart",
                "state": d.state,
            }
            for d in self.gateway.deployments.values()
        ]
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        status = self.gateway.status()
        replicas = [r for d in status["deployments"].values() for r in d["replicas"]]
        body = {
            "status": "ok",
            "ready": self.gateway.ready(),
            "replicas": replicas,  # every deployment's, as one list (the single-model view)
            "queue_depth": self.gateway.queue_depth,
            **status,
        }
        return JSONResponse(body)

    async def ready(self, request: Request) -> Response:
        if self.gateway.ready():
            return JSONResponse({"ready": True})
        return openai_error(503, "no replica is ready (yet)", "server_overloaded", "not_ready")

    async def metrics_route(self, request: Request) -> Response:
        self.gateway.update_gauges()  # current at scrape time, not as of the last scaling tick
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ forwarding
    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _BodyTooLarge
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _BodyTooLarge
            chunks.append(chunk)
        return b"".join(chunks)

    async def _parse(self, request: Request) -> tuple[dict[str, Any], int] | Response:
        try:
            raw = await self._read_body(request)
        except _BodyTooLarge:
            return openai_error(
                413,
                f"request body larger than {self.max_body_bytes} bytes",
                "invalid_request_error",
                "request_too_large",
            )
        try:
            payload = json.loads(raw)
        except UnicodeDecodeError:
            return openai_error(400, "request body is not UTF-8 text", "invalid_request_error")
        except ValueError as exc:  # JSONDecodeError
            return openai_error(400, f"request body is not JSON: {exc}", "invalid_request_error")
        except RecursionError:
            return openai_error(400, "request body is JSON nested too deeply", "invalid_request_error")
        if not isinstance(payload, dict):
            return openai_error(400, "request body must be a JSON object", "invalid_request_error")
        return payload, len(raw)

    async def forward(self, request: Request) -> Response:
        arrived = time.monotonic()
        route = request.url.path
        if (denied := self._unauthorized(request)) is not None:
            return self._count(route, denied)
        try:
            parsed = await self._parse(request)
        except ClientDisconnect:
            return self._count(route, Response(status_code=499))
        if isinstance(parsed, Response):
            return self._count(route, parsed)
        payload, size = parsed
        model = payload.get("model")
        deployment = self.gateway.lookup(model)
        if deployment is None:
            served = ", ".join(repr(n) for n in self.gateway.served_names)
            return self._count(
                route,
                openai_error(
                    404,
                    f"The model `{model}` does not exist; served here: {served}",
                    "NotFoundError",
                    "model_not_found",
                ),
            )
        limit = getattr(deployment.adapter, "max_request_bytes", None)
        if isinstance(limit, int) and size > limit:
            return self._count(
                route,
                openai_error(
                    413,
                    f"request body of {size} bytes is more than {deployment.adapter.name} serves "
                    f"({limit} bytes)",
                    "invalid_request_error",
                    "request_too_large",
                ),
                model=deployment.name,
            )
        payload["model"] = deployment.upstream_model
        body = json.dumps(payload).encode()
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _DROP]
        clock = FirstToken(deployment, arrived) if deployment.state != "ready" else None

        # Until the answer starts, a client that goes away cancels the wait (queue or engine).
        gone = asyncio.create_task(_disconnected(request))
        work = asyncio.create_task(self._dispatch(deployment, route, body, headers, clock))
        try:
            await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():  # the client went away (or we are cancelled): stop the upstream call
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
        if work.cancelled():  # nobody reads this: the client is gone
            return self._count(route, Response(status_code=499), model=deployment.name)
        response, status = work.result()
        return self._count(route, response, status, model=deployment.name)

    async def _dispatch(
        self,
        deployment: Deployment,
        route: str,
        body: bytes,
        headers: list[tuple[str, str]],
        clock: FirstToken | None = None,
    ) -> tuple[Response, int | None]:
        # Retry on another replica only when the connection could not be opened: nothing was sent.
        refused: Replica | None = None
        for attempt in (1, 2):
            try:
                replica = await deployment.acquire(avoid=refused)
            except (QueueFull, QueueTimeout) as exc:
                code = "queue_full" if isinstance(exc, QueueFull) else "queue_timeout"
                retry = {"Retry-After": str(RETRY_AFTER_S)}
                return openai_error(503, str(exc), "server_overloaded", code, retry), None
            except BootFailing as exc:
                retry = {"Retry-After": str(max(1, round(exc.retry_after_s)))}
                return openai_error(503, str(exc), "server_error", "boot_failed", retry), None
            finished = False
            try:
                url = _base_url(replica) + route
                try:
                    response = await self.session.post(url, data=body, headers=headers)
                except aiohttp.ClientConnectorError as exc:
                    self.gateway.suspect(replica, f"connection refused: {exc!r}")
                    refused = replica
                    if attempt == 1:
                        continue
                    msg = f"replica {replica.id} unreachable; retry the request"
                    return openai_error(502, msg, "server_error", "upstream_unreachable"), None
                except (aiohttp.ClientError, TimeoutError) as exc:
                    self.gateway.suspect(replica, f"lost before answering: {exc!r}")
                    msg = (
                        f"replica {replica.id} closed the connection before answering "
                        f"({type(exc).__name__}); the request may have reached the engine and was not retried"
                    )
                    return openai_error(502, msg, "server_error", "upstream_lost"), None
                result = await self._relay(deployment, replica, response, clock)
                finished = True  # _relay owns the release from here
                return result, response.status
            finally:
                if not finished:
                    deployment.release(replica)
        raise ReplicaStateError("unreachable: the retry loop always returns")

    async def _relay(
        self,
        deployment: Deployment,
        replica: Replica,
        response: aiohttp.ClientResponse,
        clock: FirstToken | None = None,
    ) -> Response:
        headers = {k: v for k, v in response.headers.items() if k.lower() not in _DROP}
        finish = _Finish(deployment, replica, response)
        streaming = response.headers.get("content-type", "").startswith("text/event-stream")
        if response.status < 400 and streaming:
            return StreamingResponse(
                self._stream(replica, response, finish, clock),
                status_code=response.status,
                headers=headers,
                background=BackgroundTask(finish),
            )
        # A whole answer: one body, one ASGI message (cheaper than a stream of chunks).
        try:
            body = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.gateway.suspect(replica, f"lost mid-response: {exc!r}")
            finish.broken = True
            msg = f"replica {replica.id} failed mid-response; retry the request"
            return openai_error(502, msg, "server_error", "upstream_lost")
        finally:
            await finish()
        if response.status >= 400 and (shaped := shaped_engine_error(response.status, body)) is not None:
            headers.pop("content-type", None)
            return JSONResponse(shaped, status_code=response.status, headers=headers)
        return Response(body, status_code=response.status, headers=headers)

    async def _stream(
        self,
        replica: Replica,
        response: aiohttp.ClientResponse,
        finish: _Finish,
        clock: FirstToken | None = None,
    ) -> AsyncIterator[bytes]:
        try:
            async for chunk in response.content.iter_any():
                if clock is not None and not clock.done:
                    clock.feed(chunk)
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            finish.broken = True
            self.gateway.suspect(replica, f"lost mid-stream: {exc!r}")
            log.warning("replica %s lost mid-stream: %r", replica.id, exc)
            # The openai client raises APIError on an SSE event carrying "error".
            error = {
                "error": {
                    "message": f"replica {replica.id} failed mid-stream; retry the request",
                    "type": "server_error",
                    "param": None,
                    "code": "upstream_lost",
                }
            }
            yield f"data: {json.dumps(error)}\n\n".encode()
        finally:
            await finish()

    def _count(
        self, route: str, response: Response, status: int | None = None, *, model: str = ""
    ) -> Response:
        self.metrics.requests.labels(model, route, str(status or response.status_code)).inc()
        return response


class FirstToken:
    """The first-token clock of one streamed answer to a request that arrived with no replica ready: fed
    the SSE bytes as they pass until an event carries a token, then observed once (``first_token``).
    Gives up on an error event, ``[DONE]``, or 1 MiB without a line end."""

    def __init__(self, deployment: Deployment, arrived: float) -> None:
        self.deployment = deployment
        self.arrived = arrived
        self.done = False
        self._partial = b""

    def feed(self, chunk: bytes) -> None:
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        for line in lines:
            seen = _token_event(line)
            if seen is None:
                continue
            self.done = True
            if seen:
                seconds = time.monotonic() - self.arrived
                self.deployment.metrics.phase_seconds.labels("first_token").observe(seconds)
            return
        if len(self._partial) > 1 << 20:
            self.done = True


def _token_event(line: bytes) -> bool | None:
    """True for an SSE ``data:`` event that carries a token (chat content, completion text, a finish
    reason, a Responses text delta); False for one that ends the stream without a token; else None."""
    if not line.startswith(b"data:"):
        return None
    data = line[5:].strip()
    if data == b"[DONE]":
        return False
    try:
        event = json.loads(data)
    except ValueError:
        return None
    if not isinstance(event, dict):
        return None
    if "error" in event:
        return False
    if str(event.get("type", "")).endswith("output_text.delta"):
        return True
    for choice in event.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            delta = {}
        if delta.get("content") or delta.get("reasoning_content") or choice.get("text"):
            return True
        if choice.get("finish_reason"):
            return True
    return None


def _base_url(replica: Replica) -> str:
    if replica.sandbox is None:
        raise ReplicaStateError(f"replica {replica.id} in state {replica.state.name} has no sandbox")
    return replica.sandbox.base_url


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: the next message is the end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _NoReuseAfterError(aiohttp.ClientResponse):
    """A response whose connection is never reused after an error answer: engines may close it right
    after (uvicorn does when it did not read the whole body), and the next request sent on it would be
    lost in a way that cannot be told apart from a crash. A small body is read with the headers and the
    connection already back in the pool when ``start`` returns, hence the close here."""

    async def start(self, connection: aiohttp.connector.Connection) -> aiohttp.ClientResponse:
        protocol = connection.protocol
        await super().start(connection)
        if self.status >= 400 and protocol is not None:
            if self.connection is None:
                protocol.close()  # idle in the pool already (no await since): nobody else took it
            else:
                protocol.force_close()  # closed instead of pooled once the body is read
        return self


class _Finish:
    """Closes the upstream response and releases the replica exactly once: from the stream's end, or from
    the background task when the client went away before the stream started. A connection that carried
    an error answer (or broke) is closed, not returned to the pool: the engine may be closing it."""

    def __init__(self, deployment: Deployment, replica: Replica, response: aiohttp.ClientResponse) -> None:
        self._deployment, self._replica, self._response = deployment, replica, response
        self._done = False
        self.broken = False

    async def __call__(self) -> None:
        if self._done:
            return
        self._done = True
        self._deployment.release(self._replica)
        if self.broken or self._response.status >= 400:
            self._response.close()
        else:
            self._response.release()


def _with_header_timeout(timeout_s: float) -> type[asyncio.Protocol]:
    """A subclass of uvicorn's httptools protocol that closes a connection whose request head (request line
    and headers) has not arrived in full within ``timeout_s`` of the connection or of the request's first
    byte. uvicorn has none (its keep-alive timer stops at the first byte), so 100 slow-header connections
    stayed open forever. A response in progress is never cut."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(timeout_s, self._head_too_slow)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_too_slow(self) -> None:
            self._head_timer = None
            if self.cycle is None or self.cycle.response_complete:
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol
