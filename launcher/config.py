"""``ServeConfig``: every option of ``coldstart-serve``, written once.

The CLI's options are generated from this dataclass (``cli/serve.py``), and Python users call
``coldstart.launcher.run(ServeConfig(...))`` directly, as uvicorn's ``main()`` -> ``run(Config)``.
Each field's ``metadata["help"]`` is its ``--help`` text; ``metadata["cli"] = False`` keeps a field off the
command line (recipe-only settings). ``settings.py`` is the one place that turns a ``ServeConfig`` into what
the engine, the autoscaler and the snapshot manager take.

Scopes: one endpoint serves many deployments (``GatewayConfig``, loaded from a deployments file by
``deployments.py``; ``coldstart-serve ENGINE MODEL`` is a file of one). A field with ``scope="server"`` is
host-wide (the proxy's address and key, where snapshots and scratch live, how many units the host has):
it is written once, under ``[server]`` or as a flag beside ``--config``, and copied into every deployment.
Every other field is per deployment (a ``[models.NAME]`` table). ``ge``/``gt`` in a field's metadata bound
its value (``bound_error``), checked the same way for flags and files.

Defaults that depend on the environment (``$XDG_CACHE_HOME``) are read when a config is made, never at
import time.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

ModelSize = Literal["tiny", "qwen3-0.6b"]
Scope = Literal["server", "deployment"]


class CheckpointerName(StrEnum):
    """``--snapshot`` / ``snapshot = ...``: the one list of checkpointer names (flags, recipes,
    deployments files; ``checkpointers/registry.py`` maps the concrete ones to classes)."""

    AUTO = "auto"  # the best 'coldstart doctor' finds: cuda, then criu, then runsc
    CRIU = "criu"
    RUNSC = "runsc"
    CUDA = "cuda"  # CUDA checkpoint (device state to host) + CRIU
    OFF = "off"


def coldstart_cache() -> Path:
    """``$XDG_CACHE_HOME/coldstart`` (default ``~/.cache/coldstart``), read at call time."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "coldstart"


def opt(default: object, help: str, **extra: object) -> Any:  # noqa: A002 - mirrors argparse
    return field(default=default, metadata={"help": help, **extra})


def server_opt(default: object, help: str, **extra: object) -> Any:  # noqa: A002
    """A host-wide option: one value for every deployment (``[server]`` in a deployments file)."""
    return opt(default, help, scope="server", **extra)


def cache_opt(sub: str, help: str) -> Any:  # noqa: A002
    """A path under the coldstart cache, resolved when the config is made (``--help`` shows the rule);
    host-wide."""
    return field(
        default_factory=lambda: coldstart_cache() / sub,
        metadata={"help": help, "default_text": f"$XDG_CACHE_HOME/coldstart/{sub}", "scope": "server"},
    )


@dataclass(frozen=True)
class WarmupRequest:
    """One request sent after the engine is healthy and before the checkpoint (JSON body). The launcher
    fills in ``model`` with the engine's own model name when the body leaves it out."""

    path: str
    body: dict[str, Any]


@dataclass(frozen=True)
class Canary:
    """The greedy completion recorded before a checkpoint that must come back identical after restore
    (token ids, and logprobs where the engine reports them)."""

    prompt: str
    max_tokens: int = 8
    chat: bool = True  # /v1/chat/completions with one user message, else /v1/completions


@dataclass
class ServeConfig:
    engine: str = opt("transformers", "engine adapter: transformers, vllm, sglang or custom", positional=True)
    model: str = opt("", "model: a local path or a hub name the engine understands", positional=True)
    engine_args: tuple[str, ...] = field(default=(), metadata={"help": "passed to the engine unchanged"})
    config: Path | None = server_opt(
        None,
        "deployments file: serve every model it names from one endpoint (README: Many models, one "
        "endpoint); short: -c FILE",
        metavar="FILE",
    )

    host: str = server_opt("127.0.0.1", "address the OpenAI proxy listens on")
    port: int = server_opt(8000, "port the OpenAI proxy listens on", ge=0, le=65535)
    served_model_name: str | None = opt(None, "model name clients send (default: MODEL as given)")
    engine_python: str | None = opt(
        None,
        "the engine's own environment (vllm, sglang): a venv folder, its python or its console script "
        "(default: the engine's command on PATH, then the set-up's /opt/coldstart/engines/ENGINE)",
    )
    api_key: str | None = server_opt(
        None,
        "require 'Authorization: Bearer KEY' on /v1 routes, as vLLM does (visible to every local user in "
        "the process list: prefer --api-key-file or $COLDSTART_API_KEY)",
        metavar="KEY",
    )
    api_key_file: Path | None = server_opt(
        None, "read --api-key from this file (its first line; keep it mode 600)", metavar="FILE"
    )
    recipe: str | None = opt(
        None,
        "recipe name or TOML path (see 'coldstart recipes ls'); flags override it, engine flags are appended "
        "to its engine args",
        metavar="NAME",
    )

    min_replicas: int = opt(0, "replicas kept when idle (0 = scale to zero)", ge=0)
    max_replicas: int = opt(1, "upper bound on replicas", ge=1)
    initial_replicas: int = opt(1, "replicas started at launch (0 = start on the first request)", ge=0)
    target_concurrency: int = opt(4, "in-flight requests per replica before another one is started", ge=1)
    idle_timeout: float = opt(300.0, "seconds a replica may sit idle before it is stopped (0 = never)", ge=0)
    max_queue: int = opt(256, "requests held while no replica is ready; more get 503", ge=0)
    queue_timeout: float = opt(600.0, "seconds a request waits for a replica before a 503", gt=0)
    boot_timeout: float = opt(900.0, "seconds an engine may take to become healthy", gt=0)
    drain_timeout: float = opt(
        30.0,
        "seconds in-flight requests get to finish when a replica stops or the launcher gets SIGTERM",
        ge=0,
    )
    health_interval: float = opt(
        2.0,
        "seconds between liveness probes of each ready replica; a replica whose engine exited, or whose "
        "probe fails twice in a row, is stopped and replaced (a hung engine is found within "
        "2 x (interval + timeout) = 10 s by default)",
        gt=0,
    )
    health_timeout: float = opt(3.0, "seconds a liveness probe waits for the engine's answer", gt=0)
    read_timeout: float = server_opt(
        600.0,
        "longest silence (seconds) from an engine within one answer before the request fails (502)",
        gt=0,
    )
    max_body_size: int = server_opt(
        32 * 1024 * 1024, "largest request body in bytes; larger ones get 413", ge=1
    )

    # Many deployments on one host (deployments.py; the gateway shares the host's units among them).
    weight: float = opt(
        1.0, "this model's share of the host's units while models contend for them", gt=0, metavar="SHARE"
    )
    priority: int = opt(
        0, "idle replicas of lower priority are evicted first when another model needs a unit"
    )
    units: int | None = server_opt(
        None,
        "CPU slots replicas run on when the host has no GPU (default: the sum of the max replicas)",
        ge=1,
    )
    memory_budget: str | None = server_opt(
        None,
        "memory replicas on CPU slots may use in all: bytes or e.g. 16GiB, 500MB (default: 90% of "
        "MemAvailable at start)",
        metavar="SIZE",
    )
    min_residency: float = server_opt(
        2.0, "seconds a placed replica keeps its unit before it may be evicted for another model", ge=0
    )
    cluster: str | None = server_opt(
        None,
        "run replicas on a Ray cluster (see README: Past one machine): ray://HOST:PORT or HOST:PORT",
        metavar="ADDRESS",
    )

    snapshot: CheckpointerName = opt(
        CheckpointerName.AUTO,
        "checkpointer: auto (the best 'coldstart doctor' finds), criu, runsc, cuda (CUDA + CRIU) or off",
        choices=tuple(CheckpointerName),
    )
    snapshot_dir: Path = cache_opt("snapshots", "where snapshots are stored")
    work_dir: Path = cache_opt("run", "scratch space for replicas (sandboxes, logs)")
    image: Path | None = opt(
        None,
        "run the engine from this imagefs index, mounted lazily; {image} in MODEL "
        "and engine args is its mount point. The first boot saves its read order beside the index "
        "(INDEX.profile); with one, what the boot reads is copied to local disk first (a hot tree: no "
        "FUSE round trip per file) and the rest stays lazy",
    )
    image_mount: Path | None = opt(None, "where to mount --image (default: WORK_DIR/image)")
    image_tiers: str | None = opt(
        None,
        "comma-separated chunk tiers, nearest first, origin last (cache server "
        "URLs, store dirs; default: the store the index was built into)",
    )
    image_cache: Path | None = opt(
        None, "local disk cache for image chunks (default: ~/.cache/coldstart/chunks)"
    )
    # Snapshots across hosts (snapshots/remote.py).
    snapshot_tiers: str | None = server_opt(
        None,
        "comma-separated tiers to pull snapshots this host lacks from, nearest first, origin last "
        "(cache server URLs, chunk store dirs)",
    )
    snapshot_cache: Path | None = server_opt(
        None, "local chunk cache for pulled snapshots, made private (0700) (default: none)"
    )
    snapshot_trust_key: Path | None = server_opt(
        None,
        "a file of 16+ secret bytes shared by a deployment's hosts: snapshots published here are signed "
        "with it, and pulled ones whose signature does not check are refused",
    )
    snapshot_publish: Path | None = server_opt(
        None,
        "publish every snapshot taken here into this chunk store dir (made private, 0700: page images hold "
        "the engine's memory; serve it: coldstart image serve)",
    )

    # From recipes only (no flag): engine environment, warm-up requests, canary prompt, and how to make a
    # missing local model (done when serving starts, never while arguments are parsed).
    engine_env: dict[str, str] = field(default_factory=dict, metadata={"cli": False})
    warmup: tuple[WarmupRequest, ...] = field(default=(), metadata={"cli": False})
    canary: Canary | None = field(default=None, metadata={"cli": False})
    make_model: ModelSize | None = field(default=None, metadata={"cli": False})

    log_format: str = server_opt("text", "log lines as 'text' or 'json'", choices=("text", "json"))
    log_level: str = server_opt(
        "info", "debug shows the engine's own output", choices=("debug", "info", "warning", "error")
    )

    @property
    def public_model_name(self) -> str:
        return self.served_model_name or self.model


FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(ServeConfig)}


def scope(f: dataclasses.Field[Any]) -> Scope:
    """``server`` for a host-wide field, ``deployment`` for the rest."""
    return "server" if f.metadata.get("scope") == "server" else "deployment"


def fields_of(which: Scope) -> tuple[dataclasses.Field[Any], ...]:
    """``ServeConfig``'s fields of one scope, in declaration order."""
    return tuple(f for f in FIELDS.values() if scope(f) == which)


def bound_error(f: dataclasses.Field[Any], value: object) -> str | None:
    """What is wrong with ``value`` for field ``f`` given its ``ge``/``gt``/``le`` bounds, else None:
    ``"must be > 0, got 0.0"``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    for key, op, ok in (("ge", ">=", value.__ge__), ("gt", ">", value.__gt__), ("le", "<=", value.__le__)):
        limit = f.metadata.get(key)
        if limit is not None and not ok(limit):
            return f"must be {op} {limit}, got {value}"
    return None


_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str) -> int:
    """``"16GiB"`` -> 17179869184: a whole or decimal number, optionally followed by B, kB, MB, GB, TB
    (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024); case and a space before the unit do not matter.
    Raises ``ValueError`` saying what is accepted."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _BYTE_UNITS:
        raise ValueError(
            f"{text!r} is not a size: write bytes or e.g. 16GiB, 500MB (units: B, kB, MB, GB, "
            "TB, KiB, MiB, GiB, TiB)"
        )
    return int(float(match.group(1)) * _BYTE_UNITS[unit])


@dataclass(frozen=True)
class GatewayConfig:
    """What ``coldstart-serve`` serves: host-wide options and the deployments behind one endpoint.

    Each deployment is a complete ``ServeConfig``: its own fields, plus every server-scope field copied
    from ``server``; its ``public_model_name`` is the name clients send (unique across deployments).
    ``deployments.load_deployments`` makes one from a file, ``deployments.single`` from one config."""

    server: ServeConfig
    deployments: tuple[ServeConfig, ...]

    @property
    def names(self) -> tuple[str, ...]:
        """The public model names, in file order."""
        return tuple(d.public_model_name for d in self.deployments)

    def deployment(self, name: str) -> ServeConfig:
        """The deployment clients reach as ``name``; ``KeyError`` for a name that is not served."""
        for d in self.deployments:
            if d.public_model_name == name:
                return d
        raise KeyError(name)

    @property
    def cpu_units(self) -> int:
        """CPU slots when the host has no GPU: ``--units``, else the sum of the deployments' max replicas."""
        return self.server.units or sum(d.max_replicas for d in self.deployments)
