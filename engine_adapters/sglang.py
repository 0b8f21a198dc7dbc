"""SGLang (``python -m sglang.launch_server``) with the memory saver.

SGLang cannot run on this project's CPU machines, so this adapter is tested against a recorded contract of
the routes below (tests/engine_adapters/test_sglang_contract.py), from SGLang's documentation and source:
- start with ``--enable-memory-saver --enable-weights-cpu-backup`` (without the CPU backup the weights are
  garbage after resume and must be reloaded from disk);
- readiness: ``GET /health_generate`` (a one-token generation) rather than ``/health`` (200 while loading);
- before checkpoint: ``POST /release_memory_occupation {"tags": ["kv_cache", "weights"]}`` (asserts the
  server is idle); after restore: ``POST /resume_memory_occupation`` with weights first, then the KV cache.
  The CUDA graph pool stays: the CUDA checkpoint copies it to host memory with the rest of the context.
"""

from __future__ import annotations

import sys
from typing import ClassVar

import httpx

from coldstart.engine_adapters.base import (
    EngineAdapter,
    EngineConfig,
    LaunchSpec,
    package_version,
    post_ok,
    require_package,
)

CONTROL_PATHS = frozenset(
    {
        "/release_memory_occupation",
        "/resume_memory_occupation",
        "/flush_cache",
        "/update_weights_from_disk",
        "/update_weights_from_tensor",
        "/update_weights_from_distributed",
        "/init_weights_update_group",
        "/start_profile",
        "/stop_profile",
        "/abort_request",
        "/configure_logging",
        "/get_server_info",
        "/set_internal_state",
        "/shutdown",
    }
)
RELEASE_TAGS = ["kv_cache", "weights"]
RESUME_ORDER = ["weights", "kv_cache"]


class SglangAdapter(EngineAdapter):
    name: ClassVar[str] = "sglang"
    extra: ClassVar[str] = "sglang"
    control_paths: ClassVar[frozenset[str]] = CONTROL_PATHS
    # /health is 200 while the model still loads; /health_generate runs a one-token generation.
    health_path: ClassVar[str] = "/health_generate"
    health_timeout_s: ClassVar[float] = 30.0

    def check_installed(self) -> None:
        require_package("sglang", self.name, self.extra)

    def version(self) -> str:
        return f"sglang-{package_version('sglang')}"

    def launch_spec(self, config: EngineConfig) -> LaunchSpec:
        argv = [sys.executable, "-m", "sglang.launch_server", "--model-path", config.model]
        argv += ["--host", config.host, "--port", str(config.port)]
        for flag in ("--enable-memory-saver", "--enable-weights-cpu-backup"):
            if flag not in config.engine_args:
                argv.append(flag)
        # Modal's SGLang example: one inductor compile thread keeps the snapshot restorable.
        return LaunchSpec(argv=[*argv, *config.engine_args], env={"TORCHINDUCTOR_COMPILE_THREADS": "1"})

    async def before_checkpoint(self, client: httpx.AsyncClient, base_url: str) -> None:
        await post_ok(
            client,
            f"{base_url}/release_memory_occupation",
            "SGLang release_memory_occupation",
            json={"tags": RELEASE_TAGS},
        )

    async def after_restore(self, client: httpx.AsyncClient, base_url: str) -> None:
        for tag in RESUME_ORDER:
            await post_ok(
                client,
                f"{base_url}/resume_memory_occupation",
                f"SGLang resume_memory_occupation {tag}",
                json={"tags": [tag]},
            )
