"""The ``custom`` adapter: launch spec, identity, and hook failures as the launcher sees them, against a
real engine process built on another web stack (stdlib http.server)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from coldstart.engine_adapters.base import EngineConfig
from coldstart.engine_adapters.custom import CustomAdapter
from coldstart.engine_adapters.errors import EngineCallFailed, EngineNotInstalled
from coldstart.engine_adapters.registry import get_adapter

from .conftest import FAULTY_ENGINE, Engine

ARGS = ("{python}", str(FAULTY_ENGINE), "--host", "{host}", "--port", "{port}")


@pytest.fixture
def faulty(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Engine]:
    engine = Engine(ARGS, "faulty", tmp_path / "engine.log", {"FAULTY_FAIL": request.param})
    try:
        engine.wait_healthy(60)
        yield engine
    finally:
        engine.stop()


def test_launch_spec_fills_placeholders_and_control_env() -> None:
    adapter = get_adapter("custom")
    assert isinstance(adapter, CustomAdapter)
    config = EngineConfig(model="my-model", engine_args=ARGS, host="0.0.0.0", port=9000)
    spec = adapter.launch_spec(config)
    assert spec.argv == [sys.executable, str(FAULTY_ENGINE), "--host", "0.0.0.0", "--port", "9000"]
    assert spec.env["COLDSTART_CONTROL_HOST"] == "0.0.0.0" and spec.env["COLDSTART_CONTROL_PORT"] == "9001"
    identity = adapter.identity(config)
    assert identity["engine"] == "custom" and str(FAULTY_ENGINE) in identity["engine_files"]


def test_missing_command_is_named() -> None:
    adapter = CustomAdapter()
    with pytest.raises(EngineNotInstalled, match="needs the command that serves the model after --"):
        adapter.launch_spec(EngineConfig(model="m"))
    with pytest.raises(EngineNotInstalled, match="command 'no-such-server' not found"):
        adapter.launch_spec(EngineConfig(model="m", engine_args=("no-such-server",)))


@pytest.mark.parametrize("faulty", [""], indirect=True)
def test_phases_on_another_web_stack(faulty: Engine) -> None:
    faulty.call("before_checkpoint")
    assert httpx.get(f"{faulty.base_url}/health").json()["weights"] == "host"
    faulty.call("after_restore")
    assert httpx.get(f"{faulty.base_url}/health").json() == {
        "status": "ok",
        "weights": "device",
        "hooks": "serving",
    }


@pytest.mark.parametrize("faulty", ["before"], indirect=True)
def test_failing_before_hook_aborts_checkpoint_and_engine_keeps_serving(faulty: Engine) -> None:
    with pytest.raises(EngineCallFailed) as info:
        faulty.call("before_checkpoint")
    message = str(info.value)
    assert (
        "checkpoint aborted: before_checkpoint hook 'check_idle' failed: RuntimeError: simulated" in message
    )
    assert "keeps serving" in message
    # rolled back: the weights went back, the engine is healthy and a later checkpoint may be tried
    assert httpx.get(f"{faulty.base_url}/health").json() == {
        "status": "ok",
        "weights": "device",
        "hooks": "serving",
    }
    assert faulty.healthy()


@pytest.mark.parametrize("faulty", ["after"], indirect=True)
def test_failing_after_hook_marks_replica_for_discard(faulty: Engine) -> None:
    faulty.call("before_checkpoint")
    with pytest.raises(EngineCallFailed, match="discard this replica: after_restore hook 'reload' failed"):
        faulty.call("after_restore")
    assert not faulty.healthy()  # the launcher's health probe now refuses it: cold boot instead
