"""SGLang (``python -m sglang.launch_server``) with the memory saver, run from its own environment.

Found like vLLM (``discovery``: ``--engine-python``, ``sglang`` on PATH, ``/opt/coldstart/engines/sglang``)
and asked there for its version and device. **GPU only, refused elsewhere**: from PyPI, SGLang 0.5.x
installs on a CPU host (4.3 GB) and imports, but its kernels (``sgl-kernel``) are CUDA builds and it was
not seen serving here; its CPU backend (docs.sglang.io, "CPU Servers") is built from source or a Docker
image (a CPU build of sgl-kernel, ``SGLANG_USE_CPU_ENGINE=1``), not published on PyPI, and is built for
Intel AMX -- whose per-process permission CRIU does not restore (see ``no_io_uring``). Its memory saver
(what the checkpoint relies on) is a CUDA allocator. Rather than pretend, the adapter refuses a CPU
environment with that reason (``EngineUnsupported``); use ``vllm`` or ``transformers`` there. The GPU
path below is tested against a recorded contract of the routes
(tests/engine_adapters/test_vllm_sglang_contract.py), from SGLang's documentation and source:
- start with ``--enable-memory-saver --enable-weights-cpu-backup`` (without the CPU backup the weights are
  garbage after resume and must be reloaded from disk);
- readiness: ``GET /health_generate`` (a one-token generation) rather than ``/health`` (200 while loading);
- before checkpoint: ``POST /release_memory_occupation {"tags": ["kv_cache", "weights"]}`` (asserts the
  server is idle); after restore: ``POST /resume_memory_occupation`` with weights first, then the KV cache.
  The CUDA graph pool stays: the CUDA checkpoint copies it to host memory with the rest of the context.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import httpx

from coldstart.engine_adapters.base import EngineConfig, LaunchSpec, post_ok
from coldstart.engine_adapters.discovery import OwnEnvironmentAdapter, engines_root
from coldstart.engine_adapters.errors import EngineUnsupported

ENTRY = Path(__file__).with_name("sglang_entry.py")

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


class SglangAdapter(OwnEnvironmentAdapter):
    name: ClassVar[str] = "sglang"
    extra: ClassVar[str] = ""  # no pip extra: SGLang runs from an environment of its own
    control_paths: ClassVar[frozenset[str]] = CONTROL_PATHS
    # /health is 200 while the model still loads; /health_generate runs a one-token generation.
    health_path: ClassVar[str] = "/health_generate"
    health_timeout_s: ClassVar[float] = 30.0

    entry: ClassVar[Path] = ENTRY

    def install_hint(self) -> str:
        return (
            f"install it on a GPU host into a venv of its own ({engines_root() / 'sglang'}, or any venv "
            "passed with --engine-python V)"
        )

    def check_installed(self) -> None:
        env = self.environment
        if env.device != "cuda":
            raise EngineUnsupported(
                f"sglang {env.version} on {env.device} ({env.found_by}): not supported by coldstart -- its "
                "kernels (sgl-kernel) and memory saver are CUDA-only and it was not seen serving on a CPU "
                "host; serve with 'vllm' or 'transformers' here, or run SGLang on a GPU host"
            )

    def version(self) -> str:
        return f"sglang-{self.environment.version}"

    def launch_spec(self, config: EngineConfig) -> LaunchSpec:
        argv = [self.environment.python, "-m", "sglang.launch_server", "--model-path", config.model]
        argv += ["--host", config.host, "--port", str(config.port)]
        for flag in ("--enable-memory-saver", "--enable-weights-cpu-backup"):
            if flag not in config.engine_args:
                argv.append(flag)
        # Modal's SGLang example: one inductor compile thread keeps the snapshot restorable.
        return LaunchSpec(argv=[*argv, *config.engine_args], env={"TORCHINDUCTOR_COMPILE_THREADS": "1"})

    def canary_fields(self, chat: bool) -> dict[str, Any]:
        # SGLang's OpenAI protocol: ``return_token_ids`` answers the ids as "response_token_ids",
        # ``logprobs`` (bool for chat, a count for completions), ``ignore_eos`` as in its sampling params.
        return {"return_token_ids": True, "logprobs": True if chat else 1, "ignore_eos": True}

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
