"""``custom``: any command that serves OpenAI routes and uses ``coldstart.snapshot_hooks``.

    coldstart-serve custom MODEL -- python my_server.py --model {model} --host {host} --port {port}

The command after ``--`` is the engine. Placeholders in it are filled in per replica: ``{python}`` (this
interpreter), ``{model}``, ``{served_model_name}``, ``{host}``, ``{port}``, ``{control_port}``; the same
values are in the environment as ``COLDSTART_MODEL``, ``COLDSTART_HOST``, ``COLDSTART_PORT``, and the
hooks library reads ``COLDSTART_CONTROL_HOST``/``COLDSTART_CONTROL_PORT``.

Before checkpoint and after restore go through the engine's control channel (``snapshot_hooks.client``):
a fresh TCP connection per call that the launcher closes first, at the engine's base_url host and the
engine port + 1 (``control_url_for``), so it works the same in a plain process, a CRIU network namespace
and a gVisor sandbox. The engine port + 1 must be free where the engine runs: always true in a sandbox
with its own network namespace; on the host a busy port makes the engine exit at start naming the port.

Failures map to ``EngineCallFailed``: a failed before-checkpoint means the checkpoint is aborted (the
engine rolled back and keeps serving unless the message says otherwise); a failed after-restore means
the replica must be discarded and a cold boot started instead.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from typing import Any, ClassVar

import httpx

from coldstart import snapshot_hooks
from coldstart.engine_adapters.base import EngineAdapter, EngineConfig, LaunchSpec, local_model_path
from coldstart.engine_adapters.errors import EngineCallFailed, EngineNotInstalled
from coldstart.snapshot_hooks import client as hooks_client
from coldstart.snapshot_hooks.errors import ControlError

# Hooks enforce their own timeouts inside the engine; this only bounds a wedged engine.
PHASE_TIMEOUT_S = 900.0


class CustomAdapter(EngineAdapter):
    name: ClassVar[str] = "custom"
    extra: ClassVar[str] = "custom"
    # The engine's own snapshot report: useful to operators and tests, not to API clients.
    control_paths: ClassVar[frozenset[str]] = frozenset({"/coldstart/state"})

    def check_installed(self) -> None:
        """Nothing to install: the command itself is checked in ``launch_spec``."""

    def version(self) -> str:
        return f"custom+snapshot_hooks-{snapshot_hooks.__version__}"

    def _values(self, config: EngineConfig) -> dict[str, str]:
        return {
            "python": sys.executable,
            "model": local_model_path(config.model),
            "served_model_name": config.public_model_name,
            "host": config.host,
            "port": str(config.port),
            "control_port": str(hooks_client.control_port_for(config.port)),
        }

    def _argv(self, config: EngineConfig) -> list[str]:
        if not config.engine_args:
            raise EngineNotInstalled(
                "engine 'custom' needs the command that serves the model after --, e.g. "
                "coldstart-serve custom MODEL -- python my_server.py --port {port}"
            )
        values = self._values(config)
        argv = [_fill(arg, values) for arg in config.engine_args]
        if shutil.which(argv[0]) is None:
            raise EngineNotInstalled(f"engine 'custom': command {argv[0]!r} not found or not executable")
        return argv

    def launch_spec(self, config: EngineConfig) -> LaunchSpec:
        values = self._values(config)
        env = {
            "COLDSTART_MODEL": values["model"],
            "COLDSTART_HOST": config.host,
            "COLDSTART_PORT": str(config.port),
            "COLDSTART_CONTROL_HOST": config.host,
            "COLDSTART_CONTROL_PORT": values["control_port"],
            "PYTHONUNBUFFERED": "1",
            # libuv >= 1.45 (uvloop, hence uvicorn's default loop) opens an io_uring that CRIU and
            # gVisor cannot checkpoint; this makes it use epoll.
            "UV_USE_IO_URING": "0",
        }
        return LaunchSpec(argv=self._argv(config), env=env)

    async def is_healthy(self, client: httpx.AsyncClient, base_url: str) -> bool:
        """The engine answers ``/health`` and its control channel is up (its hooks are registered)."""
        if not await super().is_healthy(client, base_url):
            return False
        try:
            state = await hooks_client.get_state(hooks_client.control_url_for(base_url), timeout_s=2.0)
        except ControlError:
            return False
        return state["state"] != snapshot_hooks.EngineState.BROKEN.value

    async def before_checkpoint(self, client: httpx.AsyncClient, base_url: str) -> None:
        url = hooks_client.control_url_for(base_url)
        try:
            await hooks_client.run_before_checkpoint(url, PHASE_TIMEOUT_S)
        except ControlError as exc:
            raise EngineCallFailed(f"custom engine at {base_url}: {exc}") from exc

    async def after_restore(self, client: httpx.AsyncClient, base_url: str) -> None:
        url = hooks_client.control_url_for(base_url)
        try:
            await hooks_client.run_after_restore(url, PHASE_TIMEOUT_S)
        except ControlError as exc:
            raise EngineCallFailed(f"custom engine at {base_url}: {exc}") from exc

    def identity(self, config: EngineConfig) -> dict[str, Any]:
        """Adds the digest of every file the command names (the server script): editing it is a new
        snapshot, as a new engine version would be."""
        identity = super().identity(config)
        files: dict[str, str] = {}
        for arg in self._argv(config)[1:]:
            if os.path.isfile(arg):
                files[os.path.abspath(arg)] = _sha256(arg)
        identity["engine_files"] = files
        return identity


def _fill(arg: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        arg = arg.replace("{" + key + "}", value)
    return arg


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
