"""The public OpenAI-compatible proxy (starlette): the only door to the replicas.

Routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/responses``, ``/v1/embeddings`` are forwarded
to the least-busy ready replica (requests are held while none is ready); ``/v1/models`` is answered here
(some engines list a hub cache instead of the served model); ``/health`` and ``/metrics`` are the proxy's.
Everything else is 404: engine control routes (``/sleep``, ``/wake_up``, ``/collective_rpc``,
``/release_memory_occupation``, ...) have no authentication upstream and are never forwarded. This is an
allow-list on purpose: a deny-list would leak each new control route an engine adds.

Streaming (SSE) is passed through chunk by chunk. If the engine dies mid-stream the client receives an
OpenAI-shaped ``error`` event and the stream ends (the ``openai`` client raises), never a hang.

The data plane uses aiohttp's client, not httpx (which the control plane uses): measured on this project's
2-core machine, a request through httpx's pool cost 1.0-2.0 ms against aiohttp's 0.4-0.5 ms, and the
proxy's goal is <= 1 ms added at p50 (bench/proxy_overhead.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator

import aiohttp
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from coldstart.launcher.metrics import Metrics
from coldstart.launcher.replica import Replica, ReplicaState
from coldstart.launcher.replicas import QueueFull, QueueTimeout, ReplicaManager

log = logging.getLogger("coldstart.proxy")

FORWARDED = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings")
RETRY_AFTER_S = 5
# Hop-by-hop headers (RFC 9110 7.6.1) and those the proxy recomputes.
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
    }
)


def openai_error(
    status: int, message: str, type_: str, code: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class Proxy:
    def __init__(
        self,
        manager: ReplicaManager,
        metrics: Metrics,
        public_model: str,
        upstream_model: str,
        api_key: str | None = None,
    ) -> None:
        self.manager = manager
        self.metrics = metrics
        self.public_model = public_model
        self.upstream_model = upstream_model
        self.api_key = api_key
        self.created = int(time.time())
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        # Created on first use, inside the running loop. No pool cap (1000s of concurrent streams), no
        # read timeout (generation can be long), bytes passed through undecoded.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    def app(self) -> Starlette:
        routes = [Route(path, self.forward, methods=["POST"]) for path in FORWARDED]
        routes += [
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics_route, methods=["GET"]),
        ]
        return Starlette(routes=routes, exception_handlers={404: self._not_found, 405: self._not_allowed})

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
        model = {"id": self.public_model, "object": "model", "created": self.created, "owned_by": "coldstart"}
        return JSONResponse({"object": "list", "data": [model]})

    async def health(self, request: Request) -> Response:
        replicas = [
            {"id": r.id, "state": r.state.value, "in_flight": r.in_flight, "how": r.how}
            for r in self.manager.replicas.values()
        ]
        ready = any(r.state is ReplicaState.READY for r in self.manager.replicas.values())
        body = {"status": "ok", "ready": ready, "replicas": replicas, "queue_depth": self.manager.queue_depth}
        return JSONResponse(body)

    async def metrics_route(self, request: Request) -> Response:
        self.manager.update_gauges()  # current at scrape time, not as of the last scaling tick
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ forwarding
    async def forward(self, request: Request) -> Response:
        route = request.url.path
        if (denied := self._unauthorized(request)) is not None:
            return self._count(route, denied)
        try:
            payload = json.loads(await request.body())
        except json.JSONDecodeError as exc:
            return self._count(
                route, openai_error(400, f"request body is not JSON: {exc}", "invalid_request_error")
            )
        if not isinstance(payload, dict):
            return self._count(
                route, openai_error(400, "request body must be a JSON object", "invalid_request_error")
            )
        model = payload.get("model")
        if model not in (self.public_model, self.upstream_model):
            return self._count(
                route,
                openai_error(404, f"The model `{model}` does not exist.", "NotFoundError", "model_not_found"),
            )
        payload["model"] = self.upstream_model
        body = json.dumps(payload).encode()
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _DROP]

        # One retry when the chosen replica turns out to be gone before a byte was sent.
        for attempt in (1, 2):
            try:
                replica = await self.manager.acquire()
            except QueueFull as exc:
                return self._count(
                    route,
                    openai_error(
                        503, str(exc), "server_overloaded", "queue_full", {"Retry-After": str(RETRY_AFTER_S)}
                    ),
                )
            except QueueTimeout as exc:
                return self._count(
                    route,
                    openai_error(
                        503,
                        str(exc),
                        "server_overloaded",
                        "queue_timeout",
                        {"Retry-After": str(RETRY_AFTER_S)},
                    ),
                )
            assert replica.sandbox is not None  # READY replicas always have one
            try:
                response = await self.session.post(
                    replica.sandbox.base_url + route, data=body, headers=headers
                )
            except aiohttp.ClientConnectionError as exc:
                self.manager.release(replica)
                await self.manager.replica_failed(replica, f"unreachable: {exc!r}")
                if attempt == 2:
                    return self._count(
                        route,
                        openai_error(
                            502, f"replica {replica.id} unreachable", "server_error", "upstream_unreachable"
                        ),
                    )
                continue
            return self._count(route, await self._relay(replica, response), response.status)
        raise AssertionError("unreachable")

    async def _relay(self, replica: Replica, response: aiohttp.ClientResponse) -> Response:
        headers = {k: v for k, v in response.headers.items() if k.lower() not in _DROP}
        finish = _Finish(self.manager, replica, response)
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            # A whole answer: one body, one ASGI message (cheaper than a stream of chunks).
            try:
                body = await response.read()
            except aiohttp.ClientError as exc:
                await self.manager.replica_failed(replica, f"lost mid-response: {exc!r}")
                return openai_error(
                    502,
                    f"replica {replica.id} failed mid-response; retry the request",
                    "server_error",
                    "upstream_lost",
                )
            finally:
                await finish()
            return Response(body, status_code=response.status, headers=headers)
        return StreamingResponse(
            self._stream(replica, response, finish),
            status_code=response.status,
            headers=headers,
            background=BackgroundTask(finish),
        )

    async def _stream(
        self, replica: Replica, response: aiohttp.ClientResponse, finish: _Finish
    ) -> AsyncIterator[bytes]:
        try:
            async for chunk in response.content.iter_any():
                yield chunk
        except aiohttp.ClientError as exc:
            await self.manager.replica_failed(replica, f"lost mid-response: {exc!r}")
            log.warning("replica %s lost mid-response: %r", replica.id, exc)
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

    def _count(self, route: str, response: Response, status: int | None = None) -> Response:
        self.metrics.requests.labels(route, str(status or response.status_code)).inc()
        return response


class _Finish:
    """Closes the upstream response and releases the replica exactly once: from the stream's end, or from
    the background task when the client went away before the stream started."""

    def __init__(self, manager: ReplicaManager, replica: Replica, response: aiohttp.ClientResponse) -> None:
        self._manager, self._replica, self._response = manager, replica, response
        self._done = False

    async def __call__(self) -> None:
        if self._done:
            return
        self._done = True
        self._manager.release(self._replica)
        self._response.release()
