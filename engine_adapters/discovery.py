"""Finding an engine where its user installed it: its own environment, never coldstart's.

An engine (vLLM, SGLang) pins its own torch and transformers, so it lives in a venv of its own. Where to
look, first hit wins:
1. the interpreter the user named (``--engine-python``: a venv folder, its python, or its console script);
   when named, nothing else is tried;
2. the engine's command on PATH (``vllm``): the interpreter of its ``#!`` line;
3. where ``.ci/setup`` installs it: ``/opt/coldstart/engines/<engine>`` (``COLDSTART_ENGINES`` moves it);
4. coldstart's own interpreter, when the engine happens to be importable there.
Each candidate is asked (a short subprocess in that environment, ``<engine>_entry.py probe``) for its
version, device and capabilities; a failed candidate's reason is kept for the error message.
"""

from __future__ import annotations

import abc
import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

from coldstart.engine_adapters.base import EngineAdapter, EngineEnvironment, interpreter_of
from coldstart.engine_adapters.errors import EngineNotInstalled

PROBE_TIMEOUT_S = 180.0  # importing torch on a busy 2-core machine can take tens of seconds


def engines_root() -> Path:
    return Path(os.environ.get("COLDSTART_ENGINES") or "/opt/coldstart/engines")


@functools.lru_cache(maxsize=32)
def probe(python: str, entry: str) -> tuple[dict[str, object] | None, str]:
    """(report, "") from ``python entry probe``, or (None, why it failed). Cached per interpreter."""
    try:
        done = subprocess.run(
            [python, entry, "probe"],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{python} did not run: {exc}"
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    try:
        report = json.loads(lines[-1]) if lines else None
    except ValueError:
        report = None
    if done.returncode != 0 or not isinstance(report, dict) or "error" in report:
        why = (report or {}).get("error") if isinstance(report, dict) else None
        if not why:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            why = f"exit {done.returncode}: {tail[:200]}"
        return None, str(why)
    return report, ""


def find_environment(
    engine: str, module: str, entry: Path, explicit: str | None, install_hint: str
) -> EngineEnvironment:
    """The first environment where ``engine`` runs, or ``EngineNotInstalled`` saying what was tried."""
    candidates: list[tuple[str, str | None]] = []
    if explicit:
        candidates.append((f"--engine-python {explicit}", interpreter_of(explicit)))
    else:
        on_path = shutil.which(engine)
        if on_path:
            candidates.append((f"'{engine}' on PATH ({on_path})", interpreter_of(on_path)))
        setup_venv = engines_root() / engine
        if (setup_venv / "bin" / "python").exists():
            candidates.append((f"the set-up's venv {setup_venv}", str(setup_venv / "bin" / "python")))
        if importlib.util.find_spec(module) is not None:
            candidates.append(("coldstart's own environment", sys.executable))
    tried = []
    for how, python in candidates:
        if python is None:
            tried.append(f"{how}: not a Python interpreter, venv or console script")
            continue
        report, why = probe(python, str(entry))
        if report is None:
            tried.append(f"{how}: {why}")
            continue
        return EngineEnvironment(
            python=python,
            distribution=str(report["distribution"]),
            version=str(report["version"]),
            device=str(report["device"]),
            sleep_mode=bool(report.get("sleep_mode")),
            found_by=how,
        )
    looked = "; ".join(tried) if tried else f"no '{engine}' on PATH and nothing in {engines_root() / engine}"
    raise EngineNotInstalled(f"engine {engine!r} not found ({looked}): {install_hint}")


class OwnEnvironmentAdapter(EngineAdapter):
    """An engine that lives in an environment of its own (vLLM, SGLang), found by ``find_environment``
    through its ``entry`` file on first use (or given, as the contract tests do)."""

    own_environment: ClassVar[bool] = True
    entry: ClassVar[Path]  # our ``<engine>_entry.py``, run by the engine's interpreter

    def __init__(
        self, engine_python: str | None = None, environment: EngineEnvironment | None = None
    ) -> None:
        self.engine_python = engine_python
        self._environment = environment

    @abc.abstractmethod
    def install_hint(self) -> str:
        """How to install the engine, for the one-line error when no environment has it."""

    @property
    def environment(self) -> EngineEnvironment:
        if self._environment is None:
            self._environment = find_environment(
                self.name, self.name, self.entry, self.engine_python, self.install_hint()
            )
        return self._environment
