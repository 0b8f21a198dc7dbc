"""vLLM and SGLang cannot run without a GPU: their adapters are checked against a recorded contract of the
engines' control routes (from their docs and source, see shared/reference/engine-apis.md), served by a
small starlette app that behaves as the engine does and records the calls."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from coldstart.engine_adapters.base import EngineConfig
from coldstart.engine_adapters.errors import EngineCallFailed
from coldstart.engine_adapters.registry import get_adapter

BASE = "http://engine"


class RecordedVllm:
    """vLLM >= 0.10 with --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1 (``has_pause``: newer versions)."""

    def __init__(self, has_pause: bool = True, sleep_works: bool = True) -> None:
        self.calls: list[str] = []
        self.sleeping = False
        self.has_pause = has_pause
        self.sleep_works = sleep_works

    def app(self) -> Starlette:
        async def sleep(request: Request) -> Response:
            self.calls.append(f"POST /sleep?level={request.query_params.get('level')}")
            self.sleeping = self.sleep_works
            return Response(status_code=200)

        async def wake_up(request: Request) -> Response:
            self.calls.append("POST /wake_up")
            self.sleeping = False
            return Response(status_code=200)

        async def is_sleeping(request: Request) -> Response:
            self.calls.append("GET /is_sleeping")
            return JSONResponse({"is_sleeping": self.sleeping})

        async def pause(request: Request) -> Response:
            self.calls.append("POST /pause")
            return Response(status_code=200 if self.has_pause else 404)

        async def resume(request: Request) -> Response:
            self.calls.append("POST /resume")
            return Response(status_code=200)

        return Starlette(
            routes=[
                Route("/sleep", sleep, methods=["POST"]),
                Route("/wake_up", wake_up, methods=["POST"]),
                Route("/is_sleeping", is_sleeping),
                Route("/pause", pause, methods=["POST"]),
                Route("/resume", resume, methods=["POST"]),
            ]
        )


class RecordedSglang:
    """SGLang >= 0.4.6 with --enable-memory-saver --enable-weights-cpu-backup."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def app(self) -> Starlette:
        async def release(request: Request) -> Response:
            self.calls.append(("release", (await request.json())["tags"]))
            return Response(status_code=200)

        async def resume(request: Request) -> Response:
            self.calls.append(("resume", (await request.json())["tags"]))
            return Response(status_code=200)

        async def health_generate(request: Request) -> Response:
            return Response(status_code=200)

        return Starlette(
            routes=[
                Route("/release_memory_occupation", release, methods=["POST"]),
                Route("/resume_memory_occupation", resume, methods=["POST"]),
                Route("/health_generate", health_generate),
            ]
        )


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def client_for(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app))


def test_vllm_launch_spec_enables_sleep_mode_and_dev_routes() -> None:
    spec = get_adapter("vllm").launch_spec(
        EngineConfig("Qwen/Qwen3-0.6B", ("--max-model-len", "4096"), port=8123)
    )
    assert spec.argv[1:4] == ["serve", "Qwen/Qwen3-0.6B", "--host"]
    assert "--enable-sleep-mode" in spec.argv and spec.argv[-2:] == ["--max-model-len", "4096"]
    assert spec.env["VLLM_SERVER_DEV_MODE"] == "1"
    assert spec.argv[spec.argv.index("--host") + 1] == "127.0.0.1"  # control routes: loopback only


@pytest.mark.parametrize("has_pause", [True, False])
def test_vllm_sleep_then_wake(has_pause: bool) -> None:
    engine = RecordedVllm(has_pause=has_pause)
    adapter = get_adapter("vllm")

    async def scenario() -> None:
        async with client_for(engine.app()) as client:
            await adapter.before_checkpoint(client, BASE)
            assert engine.sleeping
            await adapter.after_restore(client, BASE)

    run(scenario())
    expected = ["POST /pause", "POST /sleep?level=1", "GET /is_sleeping", "POST /wake_up", "GET /is_sleeping"]
    if has_pause:
        expected.append("POST /resume")
    assert engine.calls == expected
    assert not engine.sleeping


def test_vllm_not_asleep_after_sleep_is_refused() -> None:
    engine = RecordedVllm(sleep_works=False)

    async def scenario() -> None:
        async with client_for(engine.app()) as client:
            await get_adapter("vllm").before_checkpoint(client, BASE)

    with pytest.raises(EngineCallFailed, match="--enable-sleep-mode"):
        run(scenario())


def test_sglang_release_and_resume_in_order() -> None:
    engine = RecordedSglang()
    adapter = get_adapter("sglang")

    async def scenario() -> None:
        async with client_for(engine.app()) as client:
            assert await adapter.is_healthy(client, BASE)
            await adapter.before_checkpoint(client, BASE)
            await adapter.after_restore(client, BASE)

    run(scenario())
    assert engine.calls == [
        ("release", ["kv_cache", "weights"]),
        ("resume", ["weights"]),
        ("resume", ["kv_cache"]),
    ]


def test_sglang_launch_spec_has_memory_saver_and_cpu_backup() -> None:
    spec = get_adapter("sglang").launch_spec(EngineConfig("Qwen/Qwen3-0.6B", port=30000))
    assert spec.argv[1:3] == ["-m", "sglang.launch_server"]
    assert "--enable-memory-saver" in spec.argv and "--enable-weights-cpu-backup" in spec.argv


def test_sglang_release_failure_is_one_line() -> None:
    app = Starlette(
        routes=[
            Route(
                "/release_memory_occupation", lambda r: JSONResponse({"error": "busy"}, 400), methods=["POST"]
            )
        ]
    )

    async def scenario() -> None:
        async with client_for(app) as client:
            await get_adapter("sglang").before_checkpoint(client, BASE)

    with pytest.raises(EngineCallFailed, match="release_memory_occupation answered 400"):
        run(scenario())


def test_control_routes_are_declared() -> None:
    assert {"/sleep", "/wake_up", "/collective_rpc", "/pause"} <= get_adapter("vllm").control_paths
    assert {"/release_memory_occupation", "/resume_memory_occupation"} <= get_adapter("sglang").control_paths
