"""The chunk cache server (the "AZ cache" tier) and HTTP origin: ``GET /chunks/<sha256 hex>``.

``coldstart image serve --store DIR [--upstream URL]``: serves chunks from DIR; a miss is fetched from the
upstream (another cache server or the origin), verified, kept in DIR, then served. Without an upstream it is
an HTTP origin for a store built by ``coldstart image build``. 200 with the bytes, 404 absent, 400 for a
malformed digest, 502 when the upstream is unreachable or sends bad bytes. ``GET /healthz`` -> ``ok``.

Refs (``refs.py``: published snapshots and trees by name): ``GET /refs?prefix=P`` -> JSON list of names,
``GET /refs/<name>`` -> the ref. A ref is a mutable name, so a cache server asks its upstream first (and
keeps a copy); when the upstream is unreachable it answers from its copy: a stale ref still names
content-addressed bytes that verify, only perhaps an older snapshot.

Authentication: a store holds snapshots, and a snapshot's page images hold an engine's memory and
environment (``HF_TOKEN=...``), so the server answers only requests that carry its token (``--token-file``):
``Authorization: Bearer TOKEN``, or HTTP basic auth with TOKEN as the password, which is what a tier URL with
the token in it sends (``http://:TOKEN@host:port``; ``HttpTier`` keeps it out of its name and logs). 401
otherwise. ``/healthz`` is open. ``--no-token`` serves without (a store of public images only).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from coldstart.imagefs.refs import REF_NAME, list_local_refs, ref_path
from coldstart.imagefs.store import ChunkStore, is_hex_digest, write_atomic
from coldstart.imagefs.tiers import split_token

log = logging.getLogger("coldstart.imagefs")


@dataclass(frozen=True)
class ServerConfig:
    store: str
    upstream: str | None = None
    host: str = "127.0.0.1"
    port: int = 8700
    token: str | None = None  # None: no authentication (``--no-token``)


def token_of(request_headers: Mapping[str, str]) -> str | None:
    """The token a request carries (Bearer, or basic auth's password), None without one."""
    value = request_headers.get("authorization", "")
    scheme, _, rest = value.partition(" ")
    if scheme.lower() == "bearer":
        return rest.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(rest.strip()).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return None
    return None


class _RequireToken(BaseHTTPMiddleware):
    def __init__(self, app: object, token: str) -> None:
        super().__init__(app)  # type: ignore[arg-type]
        self.token = token.encode()

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        if request.url.path != "/healthz":
            given = token_of(request.headers)
            if given is None or not hmac.compare_digest(given.encode(), self.token):
                return PlainTextResponse(
                    "this chunk server needs its token (a tier URL http://:TOKEN@host:port)\n",
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await call_next(request)


def create_app(config: ServerConfig) -> Starlette:
    store = ChunkStore(config.store)
    Path(config.store).mkdir(parents=True, exist_ok=True)
    state: dict[str, httpx.AsyncClient] = {}
    upstream_name = split_token(config.upstream)[0] if config.upstream else None  # no token in logs

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if config.upstream:
            timeout = httpx.Timeout(15.0, connect=2.0)
            upstream, token = split_token(config.upstream)
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            async with httpx.AsyncClient(
                base_url=upstream.rstrip("/"), timeout=timeout, headers=headers, trust_env=False
            ) as client:
                state["upstream"] = client
                yield
        else:
            yield

    async def chunk(request: Request) -> Response:
        digest = request.path_params["digest"]
        if not is_hex_digest(digest):
            return PlainTextResponse("not a sha256 hex digest\n", status_code=400)
        data = await anyio.to_thread.run_sync(store.read, digest)
        if data is not None:
            return Response(data, media_type="application/octet-stream")
        client = state.get("upstream")
        if client is None:
            return PlainTextResponse("no such chunk\n", status_code=404)
        try:
            upstream = await client.get(f"/chunks/{digest}")
        except httpx.HTTPError as exc:
            log.warning("upstream %s unreachable for chunk %s: %s", upstream_name, digest, exc)
            return PlainTextResponse("upstream unreachable\n", status_code=502)
        if upstream.status_code == 404:
            return PlainTextResponse("no such chunk\n", status_code=404)
        body = upstream.content
        if upstream.status_code != 200 or hashlib.sha256(body).hexdigest() != digest:
            log.warning(
                "upstream %s sent a bad chunk %s (HTTP %d)", upstream_name, digest, upstream.status_code
            )
            return PlainTextResponse("upstream sent a bad chunk\n", status_code=502)
        await anyio.to_thread.run_sync(store.write, digest, body)
        return Response(body, media_type="application/octet-stream")

    async def ref(request: Request) -> Response:
        name = request.path_params["name"]
        if not REF_NAME.match(name):
            return PlainTextResponse("not a ref name\n", status_code=400)
        local = ref_path(config.store, name)
        client = state.get("upstream")
        if client is not None:
            try:
                upstream = await client.get(f"/refs/{name}")
            except httpx.HTTPError as exc:
                log.warning("upstream %s unreachable for ref %s: %s", upstream_name, name, exc)
            else:
                if upstream.status_code == 404:
                    local.unlink(missing_ok=True)  # removed upstream: forget our copy
                    return PlainTextResponse("no such ref\n", status_code=404)
                if upstream.status_code == 200:
                    local.parent.mkdir(parents=True, exist_ok=True)
                    await anyio.to_thread.run_sync(write_atomic, local, upstream.content)
                    return Response(upstream.content, media_type="application/json")
        try:
            data = await anyio.to_thread.run_sync(local.read_bytes)
        except FileNotFoundError:
            return PlainTextResponse("no such ref\n", status_code=404)
        return Response(data, media_type="application/json")

    async def refs(request: Request) -> Response:
        prefix = request.query_params.get("prefix", "")
        client = state.get("upstream")
        if client is not None:
            try:
                upstream = await client.get("/refs", params={"prefix": prefix})
                if upstream.status_code == 200:
                    return Response(upstream.content, media_type="application/json")
            except httpx.HTTPError as exc:
                log.warning("upstream %s unreachable for the ref list: %s", upstream_name, exc)
        return JSONResponse(list_local_refs(config.store, prefix))

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    routes = [
        Route("/chunks/{digest}", chunk, methods=["GET"]),
        Route("/refs", refs, methods=["GET"]),
        Route("/refs/{name}", ref, methods=["GET"]),
        Route("/healthz", healthz),
    ]
    middleware = [Middleware(_RequireToken, token=config.token)] if config.token else []
    return Starlette(routes=routes, lifespan=lifespan, middleware=middleware)


def serve(config: ServerConfig) -> None:
    """Run the server until SIGINT/SIGTERM (uvicorn handles both)."""
    import uvicorn

    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="warning")
