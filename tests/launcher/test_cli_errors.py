"""Bad input to coldstart-serve: one line that says what to do, the right exit code, nothing left running."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support import SERVE


def run_serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SERVE, *args], capture_output=True, text=True, timeout=timeout)


def children_of(pid: int) -> list[str]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return out.stdout.split()


def test_unknown_engine_is_a_usage_error() -> None:
    result = run_serve("nosuch", "model")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "coldstart-serve: error: unknown engine 'nosuch'; valid engines: custom, sglang, transformers, vllm"
    ]


def test_missing_model_path_is_a_usage_error(tmp_path: Path) -> None:
    result = run_serve("transformers", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "coldstart make-model" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_engine_not_found_says_what_was_tried_and_how_to_install(engine: str, tmp_path: Path) -> None:
    venv = tmp_path / "no-venv"
    result = run_serve(engine, "Qwen/Qwen3-0.6B", "--engine-python", str(venv))
    assert result.returncode == 1
    assert f"engine {engine!r} not found (--engine-python {venv}: not a Python interpreter" in result.stderr
    assert "install it" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_busy_port_is_refused_before_anything_starts(tiny_model: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_serve("transformers", str(tiny_model), "--port", str(port))
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is in use" in result.stderr and "--port" in result.stderr


def test_engine_exiting_during_boot_shows_its_log_tail(tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    proc = subprocess.Popen(
        [*SERVE, "transformers", str(broken), "--port", "0", "--work-dir", str(tmp_path / "run")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 1
    first_error = next(line for line in err.splitlines() if line.startswith("coldstart-serve: error:"))
    assert "transformers exited with status" in first_error
    assert "JSONDecodeError" in first_error  # the engine's root cause, not only its last lines
    assert children_of(proc.pid) == []


def test_help_explains_the_engine_args_passthrough() -> None:
    result = subprocess.run([*SERVE, "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "passed to the engine unchanged" in result.stdout


def test_coldstart_unknown_subcommand() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "coldstart.launcher.cli.main", "nope"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "valid:" in result.stderr


def test_cuda_snapshots_refuse_tensor_parallel(tiny_model: Path) -> None:
    result = run_serve(
        "transformers", str(tiny_model), "--snapshot", "cuda", "--", "--tensor-parallel-size", "2"
    )
    assert result.returncode == 1
    assert "tensor parallel" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_per_model_flag_beside_config_is_a_usage_error(tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text('[models.a]\nengine = "transformers"\nmodel = "/a"\n')
    result = run_serve("--config", str(models), "--max-replicas", "3")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"coldstart-serve: error: --max-replicas is per model: write max_replicas = ... under [models.NAME] "
        f"in {models} (beside --config only server options go: see --help)"
    ]


def test_a_work_dir_that_cannot_be_written_is_one_line(tiny_model: Path) -> None:
    result = run_serve(
        "transformers", str(tiny_model), "--port", "0", "--snapshot", "off", "--work-dir", "/proc/nope"
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("coldstart-serve: error:")]
    assert errors == [
        "coldstart-serve: error: --work-dir /proc/nope: cannot write there (No such file or directory); "
        "pass a writable folder"
    ]
    assert "Traceback" not in result.stderr


def test_two_launchers_on_one_work_dir_get_folders_of_their_own(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Replica ids (r1, r2, ...) are per launcher: two launchers on the default --work-dir must never share
    a replica's folder. Each gets launcher-PID (private, 0700, as is the work dir even when it existed
    open); a running launcher's folder is left alone, a gone one's is removed."""
    from coldstart.launcher import server

    work = tmp_path / "run"
    work.mkdir(mode=0o755)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    (work / f"launcher-{gone.stdout.strip()}" / "r1").mkdir(parents=True)
    monkeypatch.setattr(server.os, "getpid", lambda: os.getppid())
    first = server.launcher_work_dir(work)
    (first / "r1").mkdir()
    monkeypatch.undo()
    second = server.launcher_work_dir(work)
    assert first != second and first.parent == second.parent == work
    assert (first / "r1").is_dir()  # the other launcher is alive: its replica's files stay
    assert sorted(p.name for p in work.iterdir()) == sorted([first.name, second.name])
    assert {p.stat().st_mode & 0o777 for p in (work, first, second)} == {0o700}


def test_an_unwritable_home_is_one_line(tiny_model: Path, tmp_path: Path) -> None:
    """Every default folder is under $XDG_CACHE_HOME or ~/.cache: where HOME cannot be written (a service
    user, a read-only home) the launcher says which folder and what to pass, with no traceback."""
    home = tmp_path / "home"
    home.mkdir(mode=0o555)
    env = {k: v for k, v in os.environ.items() if k != "XDG_CACHE_HOME"}
    env["HOME"] = str(home)
    argv = ["transformers", str(tiny_model), "--port", "0", "--snapshot", "off"]
    result = subprocess.run(
        ["unshare", "--map-user=65534", "--map-group=65534", "--", *SERVE, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("coldstart-serve: error:")]
    assert len(errors) == 1 and str(home) in errors[0] and "pass a writable folder" in errors[0], (
        result.stderr
    )
    assert "Traceback" not in result.stderr
