"""The chunk cache server (the "AZ cache" tier) and HTTP origin: ``GET /chunks/<sha256 hex>``.

``coldstart image serve --store DIR [--upstream URL]``: serves chunks from DIR; a miss is fetched from the
upstream (another cache server or the origin), verified, kept in DIR, then served. Without an upstream it is
an HTTP origin for a store built by ``coldstart image build``. 200 with the bytes, 404 absent, 400 for a
malformed digest, 502 when the upstream is unreachable or sends bad bytes. ``GET /healthz`` -> ``ok``.

Refs (``refs.py``: published snapshots and trees by name): ``GET /refs?prefix=P`` -> JSON list of names,
``GET /refs/<name>`` -> the ref. A ref is a mutable name, so a cache server asks its upstream first (and
keeps a copy); when the upstream is unreachable it answers from its copy: a stale ref still names
content-addressed bytes that verify, only perhaps an older snapshot.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from coldstart.imagefs.refs import REF_NAME, list_local_refs, ref_path
from coldstart.imagefs.store import ChunkStore, is_hex_digest, write_atomic

log = logging.getLogger("coldstart.imagefs")


@dataclass(frozen=True)
class ServerConfig:
    store: str
    upstream: str | None = None
    host: str = "127.0.0.1"
    port: int = 8700


def create_app(config: ServerConfig) -> Starlette:
    store = ChunkStore(config.store)
    Path(config.store).mkdir(parents=True, exist_ok=True)
    state: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if config.upstream:
            timeout = httpx.Timeout(15.0, connect=2.0)
            async with httpx.AsyncClient(base_url=config.upstream.rstrip("/"), timeout=timeout) as client:
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
            log.warning("upstream %s unreachable for chunk %s: %s", config.upstream, digest, exc)
            return PlainTextResponse("upstream unreachable\n", status_code=502)
        if upstream.status_code == 404:
            return PlainTextResponse("no such chunk\n", status_code=404)
        body = upstream.content
        if upstream.status_code != 200 or hashlib.sha256(body).hexdigest() != digest:
            log.warning(
                "upstream %s sent a bad chunk %s (HTTP %d)", config.upstream, digest, upstream.status_code
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
                log.warning("upstream %s unreachable for ref %s: %s", config.upstream, name, exc)
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
                log.warning("upstream %s unreachable for the ref list: %s", config.upstream, exc)
        return JSONResponse(list_local_refs(config.store, prefix))

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    routes = [
        Route("/chunks/{digest}", chunk, methods=["GET"]),
        Route("/refs", refs, methods=["GET"]),
        Route("/refs/{name}", ref, methods=["GET"]),
        Route("/healthz", healthz),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def serve(config: ServerConfig) -> None:
    """Run the server until SIGINT/SIGTERM (uvicorn handles both)."""
    import uvicorn

    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="warning")
