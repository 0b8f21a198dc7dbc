"""The package as a user installs it: a wheel built from this tree, installed into a fresh venv.

CI and the README install coldstart editable, which finds every folder of the tree whether or not the
package lists it; a wheel has only what the build found (it once lacked ``launcher/checkpointers`` and
``pool/providers``, and ``coldstart-serve`` failed to import). The fresh venv gets coldstart's base
dependencies only: no torch, no nvidia-ml-py, no numpy, as on a CPU-only host.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOP = ["launcher", "engine_adapters", "snapshot_hooks", "imagefs", "pool", "recipes"]

pytestmark = pytest.mark.slow


def _run(*cmd: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    built = _run(
        sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, REPO
    )
    assert built.returncode == 0, built.stderr
    (found,) = out.glob("coldstart-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("venv") / "v"
    assert _run(sys.executable, "-m", "venv", root).returncode == 0
    installed = _run(root / "bin" / "pip", "install", "-q", wheel, timeout=600)
    assert installed.returncode == 0, installed.stderr[-2000:]
    return root / "bin"


def test_wheel_has_every_package_of_the_tree(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for top in TOP:
        for init in (REPO / top).rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            member = "coldstart/" + str(init.relative_to(REPO))
            assert member in names, f"{member} is missing from the wheel"
    assert "coldstart/recipes/vllm-qwen3-0.6b.toml" in names
    assert "coldstart/recipes/examples/tiny_engine.py" in names


def test_installed_commands_run(venv: Path) -> None:
    for cmd in (["coldstart", "--help"], ["coldstart-serve", "--help"]):
        result = _run(venv / cmd[0], *cmd[1:])
        assert result.returncode == 0, result.stderr
        assert "usage" in result.stdout.lower()
    doctor = _run(venv / "coldstart", "doctor")
    assert doctor.returncode in (0, 1), doctor.stderr  # 1: no checkpointer works on this host
    assert "Traceback" not in doctor.stderr and "--snapshot auto" in doctor.stdout


def test_cpu_only_install_serves_without_nvidia_ml_py_or_numpy(venv: Path) -> None:
    """What ``coldstart-serve`` does first: a pool over this host's GPUs, CPU slots where none can be seen."""
    probe = (
        "import asyncio, importlib.util\n"
        "assert importlib.util.find_spec('pynvml') is None and importlib.util.find_spec('numpy') is None\n"
        "import coldstart.launcher.server\n"
        "from coldstart.pool import pool_for_host\n"
        "async def main():\n"
        "    pool = pool_for_host(cpu_slots=1, target_idle=1)\n"
        "    await pool.start()\n"
        "    unit = await pool.acquire(timeout=10)\n"
        "    print(pool.kind, unit.device.uuid)\n"
        "    await pool.close()\n"
        "asyncio.run(main())\n"
    )
    result = _run(venv / "python", "-c", probe)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "cpu"
