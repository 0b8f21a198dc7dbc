"""``ServeConfig``: every option of ``coldstart-serve``, written once.

The CLI's options are generated from this dataclass (``cli/serve.py``), and Python users call
``coldstart.launcher.run(ServeConfig(...))`` directly, as uvicorn's ``main()`` -> ``run(Config)``.
Each field's ``metadata["help"]`` is its ``--help`` text; ``metadata["cli"] = False`` keeps a field off the
command line (recipe-only settings). ``settings.py`` is the one place that turns a ``ServeConfig`` into what
the engine, the autoscaler and the snapshot manager take.

Defaults that depend on the environment (``$XDG_CACHE_HOME``) are read when a config is made, never at
import time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ModelSize = Literal["tiny", "qwen3-0.6b"]


def coldstart_cache() -> Path:
    """``$XDG_CACHE_HOME/coldstart`` (default ``~/.cache/coldstart``), read at call time."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "coldstart"


def opt(default: object, help: str, **extra: object) -> Any:  # noqa: A002 - mirrors argparse
    return field(default=default, metadata={"help": help, **extra})


def cache_opt(sub: str, help: str) -> Any:  # noqa: A002
    """A path under the coldstart cache, resolved when the config is made (``--help`` shows the rule)."""
    return field(
        default_factory=lambda: coldstart_cache() / sub,
        metadata={"help": help, "default_text": f"$XDG_CACHE_HOME/coldstart/{sub}"},
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

    host: str = opt("127.0.0.1", "address the OpenAI proxy listens on")
    port: int = opt(8000, "port the OpenAI proxy listens on")
    served_model_name: str | None = opt(None, "model name clients send (default: MODEL as given)")
    engine_python: str | None = opt(
        None,
        "the engine's own environment (vllm, sglang): a venv folder, its python or its console script "
        "(default: the engine's command on PATH, then the set-up's /opt/coldstart/engines/ENGINE)",
    )
    api_key: str | None = opt(None, "require 'Authorization: Bearer KEY' on /v1 routes, as vLLM does")
    recipe: str | None = opt(None, "recipe name or TOML path (see 'coldstart recipes ls'); flags override it")

    min_replicas: int = opt(0, "replicas kept when idle (0 = scale to zero)")
    max_replicas: int = opt(1, "upper bound on replicas")
    initial_replicas: int = opt(1, "replicas started at launch (0 = start on the first request)")
    target_concurrency: int = opt(4, "in-flight requests per replica before another one is started")
    idle_timeout: float = opt(300.0, "seconds a replica may sit idle before it is stopped (0 = never)")
    max_queue: int = opt(256, "requests held while no replica is ready; more get 503")
    queue_timeout: float = opt(600.0, "seconds a request waits for a replica before a 503")
    boot_timeout: float = opt(900.0, "seconds an engine may take to become healthy")
    drain_timeout: float = opt(
        30.0, "seconds in-flight requests get to finish when a replica stops or the launcher gets SIGTERM"
    )
    health_interval: float = opt(
        2.0,
        "seconds between liveness probes of each ready replica; a replica whose engine exited, or whose "
        "probe fails twice in a row, is stopped and replaced (a hung engine is found within "
        "interval + 2 x (timeout + interval) = 10 s by default)",
    )
    health_timeout: float = opt(3.0, "seconds a liveness probe waits for the engine's answer")
    read_timeout: float = opt(
        600.0, "longest silence (seconds) from an engine within one answer before the request fails (502)"
    )
    max_body_size: int = opt(32 * 1024 * 1024, "largest request body in bytes; larger ones get 413")

    snapshot: str = opt(
        "auto",
        "checkpointer: auto (the best 'coldstart doctor' finds), criu, runsc, cuda (CUDA + CRIU) or off",
        choices=("auto", "criu", "runsc", "cuda", "off"),
    )
    snapshot_dir: Path = cache_opt("snapshots", "where snapshots are stored")
    work_dir: Path = cache_opt("run", "scratch space for replicas (sandboxes, logs)")
    image: Path | None = opt(
        None,
        "run the engine from this imagefs index, mounted lazily; {image} in MODEL "
        "and engine args is its mount point",
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
    snapshot_tiers: str | None = opt(
        None,
        "comma-separated tiers to pull snapshots this host lacks from, nearest first, origin last "
        "(cache server URLs, chunk store dirs)",
    )
    snapshot_cache: Path | None = opt(None, "local chunk cache for pulled snapshots (default: none)")
    snapshot_publish: Path | None = opt(
        None, "publish every snapshot taken here into this chunk store dir (serve it: coldstart image serve)"
    )

    # From recipes only (no flag): engine environment, warm-up requests, canary prompt, and how to make a
    # missing local model (done when serving starts, never while arguments are parsed).
    engine_env: dict[str, str] = field(default_factory=dict, metadata={"cli": False})
    warmup: tuple[WarmupRequest, ...] = field(default=(), metadata={"cli": False})
    canary: Canary | None = field(default=None, metadata={"cli": False})
    make_model: ModelSize | None = field(default=None, metadata={"cli": False})

    log_format: str = opt("text", "log lines as 'text' or 'json'", choices=("text", "json"))
    log_level: str = opt(
        "info", "debug shows the engine's own output", choices=("debug", "info", "warning", "error")
    )

    @property
    def public_model_name(self) -> str:
        return self.served_model_name or self.model
