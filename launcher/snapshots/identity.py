"""Snapshot identity: what a snapshot is of, derived from typed config (never a hand-kept list of names).

Two parts, on purpose:
- the **key** (the store folder's name): everything that shapes the engine process -- the adapter's own
  ``identity(config)`` (engine, engine version, model, engine args), the whole ``EngineConfig`` (every field
  but the bind address, which the sandbox decides: ``env`` included, so a recipe's
  ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, which changes the process tree, changes the key), the variables of
  the launcher's environment that the engine inherits and that change its behaviour (``inherited_env``:
  the names starting with one of ``BEHAVIOUR_ENV_PREFIXES`` or listed in ``BEHAVIOUR_ENV_NAMES``), the
  warm-up and canary requests, the checkpointer's name, the hooks version, the image digest (imagefs) and
  our sandbox layout version. Any change gives a new key, so a stale snapshot is simply never found.
- the **gate fields** (recorded in the manifest, compared at restore): the checkpointer's version and the
  host fingerprint. They are not in the key so that a snapshot from another host or tool version is found
  and refused with the exact field that differs ("runsc 20240729 != 20221219", "cpu flag avx512f missing on
  this host") instead of silently missing; the cold boot that follows then replaces it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from coldstart.engine_adapters.base import EngineAdapter, EngineConfig
from coldstart.launcher.checkpointers.base import CheckpointerInfo
from coldstart.launcher.snapshots.fingerprint import HostFingerprint, host_fingerprint, incompatibilities

# Bump when the sandboxes change what a restored process expects (ports, namespaces, env, fd layout).
SANDBOX_LAYOUT_VERSION = 2  # 2: CRIU replicas in their own mount namespace (private /dev/shm, TMPDIR)


# The engine inherits the launcher's environment (sandboxes start it with ``{**os.environ, **spec.env}``).
# These families are read by the engines and the libraries under them and change what the process does or
# holds (vLLM's ~150 ``VLLM_*`` settings, CUDA and NCCL, OpenMP / MKL / oneDNN threading, torch and
# inductor, Hugging Face offline mode and caches, glibc's allocator tunables, Python's allocator and hash
# seed, preloaded libraries); anything else (PATH, HOME, a shell's variables) is left out so that a
# snapshot survives a new terminal.
BEHAVIOUR_ENV_PREFIXES = (
    "VLLM_", "SGLANG_", "CUDA_", "NCCL_", "NVIDIA_", "OMP_", "KMP_", "MKL_", "DNNL_", "ONEDNN_",
    "TORCH", "PYTORCH_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "MALLOC_", "GLIBC_", "PYTHON",
)  # fmt: skip
# TMPDIR is left out: the sandboxes give the engine its own (CRIU: a private tmpfs).
BEHAVIOUR_ENV_NAMES = frozenset({"LD_PRELOAD", "LD_LIBRARY_PATH"})
# Variables whose values are secrets (HF_TOKEN, VLLM_API_KEY, ...): the manifest, which is published, pulled
# by other hosts and shown by ``coldstart snapshot inspect``, holds a digest of the value, never the value.
# A new value still gives a new key (the restored engine would carry the old one in its memory).
SECRET_ENV_NAME = re.compile(r"TOKEN|SECRET|PASSW|CREDENTIAL|API_KEY|(^|_)KEY$|AUTH", re.IGNORECASE)
# EngineConfig fields that never reach the snapshot key: the sandbox decides where the engine binds.
NOT_IN_KEY = frozenset({"host", "port"})


def secret_digest(name: str, value: str) -> str:
    return "sha256:" + hashlib.sha256("\0".join(("coldstart-env", name, value)).encode()).hexdigest()


def without_secrets(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` sorted, each secret's value (``SECRET_ENV_NAME``) replaced by a digest of name and value."""
    return {k: secret_digest(k, v) if SECRET_ENV_NAME.search(k) else v for k, v in sorted(env.items())}


def inherited_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The launcher's variables that change an engine's behaviour (see ``BEHAVIOUR_ENV_PREFIXES``), secrets
    as digests."""
    env = os.environ if environ is None else environ
    return without_secrets(
        {k: v for k, v in env.items() if k in BEHAVIOUR_ENV_NAMES or k.startswith(BEHAVIOUR_ENV_PREFIXES)}
    )


def config_fields(config: EngineConfig) -> dict[str, Any]:
    """Every field of ``config`` but the bind address, as JSON (derived from the dataclass, not a list)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if f.name in NOT_IN_KEY:
            continue
        value = getattr(config, f.name)
        if f.name == "env":
            value = without_secrets(value)
        elif f.name == "warmup":
            value = [[path, dict(body)] for path, body in value]
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def hooks_version() -> str:
    try:
        from coldstart.snapshot_hooks import __version__
    except ImportError:
        return "none"
    return str(__version__)


def canonical_digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class SnapshotIdentity:
    engine: dict[str, Any]
    warmup: list[Any]
    canary: dict[str, Any]
    checkpointer: str
    checkpointer_version: str
    hooks_version: str
    image_digest: str | None
    fingerprint: HostFingerprint
    layout_version: int = SANDBOX_LAYOUT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def key_fields(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "warmup": self.warmup,
            "canary": self.canary,
            "checkpointer": self.checkpointer,
            "hooks_version": self.hooks_version,
            "image_digest": self.image_digest,
            "layout_version": self.layout_version,
            "extra": self.extra,
        }

    @property
    def key(self) -> str:
        """The store folder name: 24 hex digits of the SHA-256 of the key fields."""
        return canonical_digest(self.key_fields())[:24]

    def to_json(self) -> dict[str, Any]:
        return {
            **self.key_fields(),
            "checkpointer_version": self.checkpointer_version,
            "fingerprint": self.fingerprint.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SnapshotIdentity:
        return cls(
            engine=data["engine"],
            warmup=data["warmup"],
            canary=data["canary"],
            checkpointer=data["checkpointer"],
            checkpointer_version=data["checkpointer_version"],
            hooks_version=data["hooks_version"],
            image_digest=data.get("image_digest"),
            fingerprint=HostFingerprint.from_json(data["fingerprint"]),
            layout_version=int(data.get("layout_version", 0)),
            extra=data.get("extra") or {},
        )

    def gate(self, recorded: SnapshotIdentity) -> list[str]:
        """Why the ``recorded`` snapshot cannot restore here (empty: it can). Names the differing field."""
        problems = []
        if recorded.key != self.key:  # a folder renamed by hand, or a key scheme change
            for name, value in self.key_fields().items():
                if recorded.key_fields().get(name) != value:
                    problems.append(f"{name} differs from this launcher's")
        if recorded.checkpointer_version != self.checkpointer_version:
            problems.append(
                f"{self.checkpointer} {recorded.checkpointer_version} != {self.checkpointer_version} "
                "on this host"
            )
        problems += incompatibilities(recorded.fingerprint, self.fingerprint)
        return problems


def snapshot_identity(
    adapter: EngineAdapter,
    config: EngineConfig,
    checkpointer: CheckpointerInfo,
    canary: dict[str, Any],
    *,
    image_digest: str | None = None,
    fingerprint: HostFingerprint | None = None,
) -> SnapshotIdentity:
    return SnapshotIdentity(
        engine={
            **adapter.identity(config),
            "config": config_fields(config),
            "inherited_env": inherited_env(),
        },
        warmup=[list(item) for item in adapter.warmup_requests(config)],
        canary=canary,
        checkpointer=checkpointer.name,
        checkpointer_version=checkpointer.version,
        hooks_version=hooks_version(),
        image_digest=image_digest,
        fingerprint=fingerprint or host_fingerprint(),
    )
