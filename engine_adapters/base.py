"""The one small interface every engine adapter implements.

An adapter knows how to start its engine, when it is healthy, how to warm it up, and what to call on the
engine before a checkpoint and after a restore. It knows nothing about sandboxes, checkpointers or the
proxy: the launcher drives it.

Adapters are registered by name in ``coldstart.engine_adapters.registry``; an unknown name raises
``UnknownEngine`` listing the valid ones.
"""

from __future__ import annotations

import abc
import importlib.metadata
import importlib.util
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import httpx

from coldstart.engine_adapters.errors import EngineCallFailed, EngineNotInstalled, ModelNotFound


@dataclass(frozen=True)
class LaunchSpec:
    """How to start one engine process: argv, extra environment, working directory."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    # Folders of coldstart's own that the engine reads (an entry script, a worker extension). With an image
    # as the gVisor container's root they are mounted there read-only at the same path: the image holds the
    # engine's environment, not the launcher's files.
    launcher_dirs: tuple[str, ...] = ()


@dataclass(frozen=True)
class EngineConfig:
    """What the user asked for: the engine's model and the arguments passed through after ``--``."""

    model: str
    engine_args: tuple[str, ...] = ()
    # Where the engine binds. Inside a sandbox with its own network namespace this is 0.0.0.0; the
    # launcher reaches it at the sandbox's ``base_url``, which adapter calls receive explicitly.
    host: str = "127.0.0.1"
    port: int = 8000
    # Name clients use in the ``model`` field; defaults to the model string, as vLLM does.
    served_model_name: str | None = None
    # Extra environment for the engine process (recipes' ``env``), on top of the adapter's own.
    env: Mapping[str, str] = field(default_factory=dict)
    # Warm-up requests from a recipe: (path, JSON body); empty = the adapter's default warm-up.
    warmup: tuple[tuple[str, Mapping[str, Any]], ...] = ()

    @property
    def public_model_name(self) -> str:
        return self.served_model_name or self.model


class EngineAdapter(abc.ABC):
    """Base class: subclasses set ``name`` and ``extra`` and implement ``launch_spec``."""

    name: ClassVar[str]
    # The pip extra that installs this engine (``pip install 'coldstart[<extra>]'``); "" for engines that run
    # from an environment of their own (vLLM, SGLang: never in coldstart's venv).
    extra: ClassVar[str]
    # Engine routes the public proxy must never forward (control plane, unauthenticated upstream).
    control_paths: ClassVar[frozenset[str]] = frozenset()
    # Readiness probe: 200 here means the engine serves requests.
    health_path: ClassVar[str] = "/health"
    health_timeout_s: ClassVar[float] = 2.0
    # The largest request body the proxy forwards to this engine (a 413 above it), or None for the proxy's
    # --max-body-size alone: an engine that tokenizes a huge prompt in its event loop stops answering its
    # health probe meanwhile and is replaced as hung (``transformers serve`` with a 30 MB prompt).
    max_request_bytes: ClassVar[int | None] = None
    # True where the engine runs from an environment of its own (``discovery``), found by the adapter or
    # named with ``--engine-python``; such adapters take ``engine_python`` in their constructor.
    own_environment: ClassVar[bool] = False

    @abc.abstractmethod
    def check_installed(self) -> None:
        """Raise ``EngineNotInstalled`` (naming the extra to install) when the engine is missing."""

    def check_engine_args(self, engine_args: tuple[str, ...]) -> None:
        """Raise ``EngineArgsRefused`` for an engine argument the launcher owns or the engine cannot honour
        here (checked before anything starts)."""

    @abc.abstractmethod
    def version(self) -> str:
        """The engine's version string; part of the snapshot identity."""

    @abc.abstractmethod
    def launch_spec(self, config: EngineConfig) -> LaunchSpec:
        """The command line that serves ``config.model`` on ``config.host:config.port``."""

    def boot_warnings(self, config: EngineConfig) -> list[str]:
        """Lines the launcher logs as warnings before booting ``config`` (a setting that will take most of
        the host, say), each naming how to change it; [] when there is nothing to say."""
        return []

    def upstream_model_name(self, config: EngineConfig) -> str:
        """The ``model`` string the engine itself expects in requests (the proxy rewrites to it)."""
        return config.model

    async def is_healthy(self, client: httpx.AsyncClient, base_url: str) -> bool:
        """True once the engine serves requests: ``GET {health_path}`` answers 200."""
        try:
            response = await client.get(f"{base_url}{self.health_path}", timeout=self.health_timeout_s)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def warmup_requests(self, config: EngineConfig) -> list[tuple[str, dict[str, Any]]]:
        """(path, JSON body) pairs sent after health and before a checkpoint: the recipe's, with the
        engine's model name filled in, else one short greedy chat."""
        if config.warmup:
            model = self.upstream_model_name(config)
            return [(path, {"model": model, **body}) for path, body in config.warmup]
        return [
            (
                "/v1/chat/completions",
                {
                    "model": self.upstream_model_name(config),
                    "messages": [{"role": "user", "content": "Say hello."}],
                    "max_tokens": 4,
                    "temperature": 0,
                },
            )
        ]

    async def before_checkpoint(self, client: httpx.AsyncClient, base_url: str) -> None:
        """Bring the engine to a checkpointable state (weights off the device, KV cache dropped)."""

    async def after_restore(self, client: httpx.AsyncClient, base_url: str) -> None:
        """Undo ``before_checkpoint`` on a restored (or resumed) engine before it takes traffic."""

    def canary_fields(self, chat: bool) -> dict[str, Any]:
        """Extra request fields that make the engine report what it computed (token ids, logprobs) and
        generate the canary's fixed number of tokens whatever the model emits (end-of-sequence first
        included); {} for engines that refuse unknown fields (``transformers serve`` answers 422)."""
        return {}

    def identity(self, config: EngineConfig) -> dict[str, Any]:
        """Everything of this engine that shapes the process; hashed into the snapshot identity."""
        return {
            "engine": self.name,
            "engine_version": self.version(),
            "model": config.model,
            "engine_args": list(config.engine_args),
        }


@dataclass(frozen=True)
class EngineEnvironment:
    """An engine installed in an environment of its own (vLLM pins its own torch and transformers, so it
    never shares coldstart's venv): the interpreter that runs it and what that environment reported."""

    python: str
    distribution: str
    version: str
    device: str  # "cuda", "cpu", ...: decides how the engine is brought to a checkpointable state
    sleep_mode: bool  # the platform has the engine's sleep mode (CUDA); else it is paused instead
    found_by: str = ""  # how it was found (an option, PATH, the set-up's location): for error messages


def interpreter_of(path: str) -> str | None:
    """The Python interpreter behind ``path``: a venv folder (its ``bin/python``), an interpreter itself,
    or a console script (its ``#!`` line). None when ``path`` is none of these."""
    p = Path(path).expanduser()
    if p.is_dir():
        candidate = p / "bin" / "python"
        return str(candidate) if os.access(candidate, os.X_OK) else None
    if not (p.is_file() and os.access(p, os.X_OK)):
        return None
    if p.name.startswith("python"):
        return str(p)
    try:
        with open(p, "rb") as f:
            first = f.readline(512)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode(errors="replace").split()
    if words and Path(words[0]).name == "env" and len(words) > 1:
        return shutil.which(words[1])
    return words[0] if words and os.access(words[0], os.X_OK) else None


def console_script(name: str) -> str | None:
    """Path of an installed console script, preferring the one beside this Python (the same venv)."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name)


def package_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not-installed"


def require_package(module: str, engine: str, extra: str) -> None:
    """Raise ``EngineNotInstalled`` naming the extra when ``module`` cannot be imported."""
    if importlib.util.find_spec(module) is None:
        raise EngineNotInstalled(
            f"engine {engine!r} is not installed in this environment: pip install 'coldstart[{extra}]'"
        )


def local_model_path(model: str) -> str:
    """The absolute path of a local model, or ``model`` unchanged when it names a hub repository.

    Anything that looks like a path (starts with / . ~, or exists) must exist: a missing model is a
    usage error named before any process starts.
    """
    expanded = os.path.expanduser(model)
    looks_local = model.startswith(("/", ".", "~")) or os.path.exists(expanded)
    if not looks_local:
        return model
    if not os.path.isdir(expanded):
        raise ModelNotFound(
            f"model path {model!r} does not exist (make one with: coldstart make-model {model})"
        )
    return os.path.abspath(expanded)


async def post_ok(client: httpx.AsyncClient, url: str, what: str, **kwargs: Any) -> httpx.Response:
    """POST and require a 2xx answer, else ``EngineCallFailed`` naming the call."""
    try:
        response = await client.post(url, timeout=kwargs.pop("timeout", 300.0), **kwargs)
    except httpx.HTTPError as exc:
        raise EngineCallFailed(f"{what}: {exc!r}") from exc
    if not response.is_success:
        raise EngineCallFailed(f"{what} answered {response.status_code}: {response.text[:200]}")
    return response
