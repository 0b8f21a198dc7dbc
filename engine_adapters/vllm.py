"""vLLM (``vllm serve``) with sleep mode, the engine most of our users run on GPUs.

vLLM cannot run on this project's CPU machines, so this adapter is tested against a recorded contract of
the routes below (tests/engine_adapters/test_vllm_contract.py), taken from vLLM's documentation and source
(see shared/reference/engine-apis.md), not against a live vLLM:
- start with ``--enable-sleep-mode`` and ``VLLM_SERVER_DEV_MODE=1`` (without it the control routes do not
  exist); the routes are unauthenticated, so the engine binds loopback (or a private netns) only and the
  proxy never forwards them;
- before checkpoint: ``POST /pause`` where it exists (newer versions: no request in flight), ``POST
  /sleep?level=1`` (weights to pinned host memory, KV cache discarded), then ``GET /is_sleeping`` must say
  true -- ``/health`` does not report sleep, and inference while asleep has crashed vLLM (#15483, #28714);
- after restore: ``POST /wake_up`` (all tags: weights, then KV cache re-created), ``GET /is_sleeping`` must
  say false, then ``POST /resume`` if we paused.
"""

from __future__ import annotations

from typing import ClassVar

import httpx

from coldstart.engine_adapters.base import (
    EngineAdapter,
    EngineConfig,
    LaunchSpec,
    console_script,
    package_version,
    post_ok,
    require_package,
)
from coldstart.engine_adapters.errors import EngineCallFailed

CONTROL_PATHS = frozenset(
    {
        "/sleep",
        "/wake_up",
        "/is_sleeping",
        "/pause",
        "/resume",
        "/is_paused",
        "/collective_rpc",
        "/reset_prefix_cache",
        "/reset_mm_cache",
        "/start_profile",
        "/stop_profile",
        "/update_weights",
        "/scale_elastic_ep",
        "/server_info",
        "/load_lora_adapter",
        "/unload_lora_adapter",
    }
)


class VllmAdapter(EngineAdapter):
    name: ClassVar[str] = "vllm"
    extra: ClassVar[str] = "vllm"
    control_paths: ClassVar[frozenset[str]] = CONTROL_PATHS

    def __init__(self) -> None:
        self._paused = False

    def check_installed(self) -> None:
        require_package("vllm", self.name, self.extra)

    def version(self) -> str:
        return f"vllm-{package_version('vllm')}"

    def launch_spec(self, config: EngineConfig) -> LaunchSpec:
        script = console_script("vllm") or "vllm"
        argv = [script, "serve", config.model, "--host", config.host, "--port", str(config.port)]
        if "--enable-sleep-mode" not in config.engine_args:
            argv.append("--enable-sleep-mode")
        return LaunchSpec(argv=[*argv, *config.engine_args], env={"VLLM_SERVER_DEV_MODE": "1"})

    async def before_checkpoint(self, client: httpx.AsyncClient, base_url: str) -> None:
        pause = await client.post(f"{base_url}/pause", timeout=300.0)
        self._paused = pause.is_success  # 404 on versions without pause: nothing to resume later
        await post_ok(client, f"{base_url}/sleep", "vLLM POST /sleep?level=1", params={"level": "1"})
        await self._expect_sleeping(client, base_url, True)

    async def after_restore(self, client: httpx.AsyncClient, base_url: str) -> None:
        await post_ok(client, f"{base_url}/wake_up", "vLLM POST /wake_up")
        await self._expect_sleeping(client, base_url, False)
        if self._paused:
            await post_ok(client, f"{base_url}/resume", "vLLM POST /resume")
            self._paused = False

    @staticmethod
    async def _expect_sleeping(client: httpx.AsyncClient, base_url: str, expected: bool) -> None:
        response = await client.get(f"{base_url}/is_sleeping", timeout=30.0)
        if not response.is_success or response.json().get("is_sleeping") is not expected:
            raise EngineCallFailed(
                f"vLLM /is_sleeping answered {response.status_code} {response.text[:100]!r}, expected "
                f"is_sleeping={expected}; was the engine started with --enable-sleep-mode?"
            )
