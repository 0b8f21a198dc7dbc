"""``custom``: any command that serves OpenAI routes and uses ``coldstart.snapshot_hooks``.

    coldstart-serve custom MODEL -- python my_server.py --model {model} --host {host} --port {port}

The command after ``--`` is the engine. Placeholders in it are filled in per replica: ``{python}`` (this
interpreter), ``{model}``, ``{served_model_name}``, ``{host}``, ``{port}``, ``{control_port}``; the same
values are in the environment as ``COLDSTART_MODEL``, ``COLDSTART_HOST``, ``COLDSTART_PORT``, and the
hooks library reads ``COLDSTART_CONTROL_HOST``/``COLDSTART_CONTROL_PORT``.

Before checkpoint and after restore go through the engine's control channel (``hooks_channel.py``) at
the engine port + 1. The engine port + 1 must be free where the engine runs: always true in a sandbox with
its own network namespace; on the host a busy port makes the engine exit at start naming the port.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from typing import Any, ClassVar

from coldstart import snapshot_hooks
from coldstart.engine_adapters.base import EngineConfig, LaunchSpec, local_model_path
from coldstart.engine_adapters.errors import EngineNotInstalled
from coldstart.engine_adapters.hooks_channel import HooksChannel
from coldstart.snapshot_hooks import client as hooks_client


class CustomAdapter(HooksChannel):
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
            "PYTHONUNBUFFERED": "1",
            **self.hooks_env(config),
        }
        return LaunchSpec(argv=self._argv(config), env=env)

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
