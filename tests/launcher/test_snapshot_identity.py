"""The snapshot key follows everything that shapes the engine process: the whole ``EngineConfig`` (its
``env`` included) and the launcher's environment variables the engine inherits and reads."""

from __future__ import annotations

import dataclasses
import json

import pytest

from coldstart.engine_adapters.base import EngineConfig
from coldstart.engine_adapters.registry import get_adapter
from coldstart.launcher.checkpointers.base import CheckpointerInfo
from coldstart.launcher.snapshots.identity import (
    BEHAVIOUR_ENV_PREFIXES,
    NOT_IN_KEY,
    config_fields,
    inherited_env,
    snapshot_identity,
)

CRIU = CheckpointerInfo("criu", "4.2.1")


def key(config: EngineConfig) -> str:
    return snapshot_identity(get_adapter("transformers"), config, CRIU, {"c": 1}).key


def test_multiprocessing_switch_in_the_engine_env_changes_the_key() -> None:
    base = EngineConfig(model="org/model")
    lean = dataclasses.replace(base, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    assert key(lean) != key(base)
    assert key(dataclasses.replace(base, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})) != key(lean)


def test_multiprocessing_switch_inherited_from_the_launcher_changes_the_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = EngineConfig(model="org/model")
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    before = key(config)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    assert key(config) != before
    monkeypatch.setenv("SOME_SHELL_VARIABLE", "x")  # not read by engines: the snapshot survives it
    after = key(config)
    monkeypatch.setenv("SOME_SHELL_VARIABLE", "y")
    assert key(config) == after


def test_every_config_field_but_the_bind_address_is_in_the_key() -> None:
    config = EngineConfig(model="org/model")
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    assert set(config_fields(config)) == fields - NOT_IN_KEY
    assert key(dataclasses.replace(config, port=9999, host="0.0.0.0")) == key(config)
    assert key(dataclasses.replace(config, served_model_name="other")) != key(config)
    assert key(dataclasses.replace(config, warmup=(("/v1/completions", {"prompt": "x"}),))) != key(config)


def test_inherited_env_keeps_the_documented_families_only() -> None:
    environ = {
        "OMP_NUM_THREADS": "2",
        "HF_HUB_OFFLINE": "1",
        "PATH": "/bin",
        "HOME": "/root",
        "LD_PRELOAD": "x",
    }
    assert inherited_env(environ) == {"HF_HUB_OFFLINE": "1", "LD_PRELOAD": "x", "OMP_NUM_THREADS": "2"}
    assert all(p.isupper() for p in BEHAVIOUR_ENV_PREFIXES)


def test_secrets_in_the_environment_never_reach_the_manifest(monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifest (published, pulled by other hosts, shown by ``coldstart snapshot inspect``) records the
    identity: a token the engine inherits or is given holds a digest there, never its value; a new token is
    still a new key (the restored engine would otherwise carry the old one)."""
    monkeypatch.setenv("HF_TOKEN", "hf_inherited_secret")
    config = EngineConfig(
        model="org/model", env={"VLLM_API_KEY": "given-secret", "VLLM_LOGGING_LEVEL": "INFO"}
    )
    identity = snapshot_identity(get_adapter("transformers"), config, CRIU, {"c": 1})
    manifest = json.dumps(identity.to_json())
    assert "hf_inherited_secret" not in manifest and "given-secret" not in manifest
    assert identity.engine["inherited_env"]["HF_TOKEN"].startswith("sha256:")
    assert identity.engine["config"]["env"]["VLLM_LOGGING_LEVEL"] == "INFO"  # not a secret: kept as it is
    monkeypatch.setenv("HF_TOKEN", "hf_rotated")
    assert key(config) != identity.key
