"""Owned child processes (launcher/process.py): the exec shim that ties them to the launcher, the bounded
engine log, the root-cause lines of a failed engine."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from support import until

from coldstart.launcher.process import (
    EngineLog,
    die_with_launcher,
    one_line_cause,
    root_cause,
    running,
    signal_listed,
    spawn,
    terminate,
)

# What vLLM's CPU build printed when 92% of RAM was not free (this-machine.md), cut down: the reason comes
# first, then a traceback in the API server that ends "See root cause above".
VLLM_REFUSAL = (
    """\
INFO 11-27 10:00:01 [api_server.py:1000] vLLM API server version 0.32.0
(APIServer pid=41) WARNING 12-06 03:32:53 [system_utils.py:255] Found ulimit of 20000 and failed to \
automatically increase with error current limit exceeds maximum limit. This can cause fd limit errors like \
`OSError: [Errno 24] Too many open files`. Consider increasing with ulimit -n
WARNING 11-27 10:00:02 [cpu.py:100] Pin memory is not supported on CPU.
(EngineCore pid=42) ERROR 11-27 10:00:09 [core.py:700] EngineCore failed to start.
(EngineCore pid=42) ERROR 11-27 10:00:09 [core.py:700] Traceback (most recent call last):
(EngineCore pid=42) ERROR 11-27 10:00:09 [core.py:700]   File "/v/core.py", line 690, in run_engine_core
(EngineCore pid=42) ERROR 11-27 10:00:09 [core.py:700] ValueError: Available memory on node 0 \
(21.29/23.54 GiB) on startup is less than desired CPU memory utilization (0.92, 21.66 GiB).
"""
    + "\n".join(f'  File "/v/x{i}.py", line {i}, in f{i}' for i in range(30))
    + """
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
"""
)


def test_root_cause_is_the_memory_line_not_the_last_lines() -> None:
    lines = VLLM_REFUSAL.splitlines()
    assert one_line_cause(lines) == (
        "ValueError: Available memory on node 0 (21.29/23.54 GiB) on startup is less than desired CPU memory "
        "utilization (0.92, 21.66 GiB)."
    )
    cause = root_cause(lines)
    assert len(cause) == 1 and "less than desired" in cause[0]  # no traceback lines, no "see above"
    assert "less than desired" not in "\n".join(lines[-20:])  # what the error used to show
    assert root_cause(["usage: vllm serve", "vllm serve: error: unrecognized arguments: --bogus"]) == [
        "vllm serve: error: unrecognized arguments: --bogus"
    ]
    assert root_cause(["INFO all good", "Uvicorn running on http://0.0.0.0:8000"]) == []


def test_engine_log_is_private_and_bounded(tmp_path: Path) -> None:
    path = tmp_path / "r1" / "engine.log"
    log = EngineLog(path, max_bytes=1000)
    for i in range(100):
        log.write(f"line {i:04d} of the engine\n".encode())
    log.close()
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.stat().st_size <= 1000 and Path(f"{path}.1").stat().st_size <= 1000
    assert path.read_text().splitlines()[-1] == "line 0099 of the engine"


def test_spawn_keeps_output_in_the_log_and_the_pid_is_the_programs(tmp_path: Path) -> None:
    async def main() -> None:
        argv = [sys.executable, "-c", "import sys; print('hello'); sys.stdout.flush(); raise SystemExit(3)"]
        proc, tail = await spawn(argv, None, None, "t", tmp_path / "engine.log")
        assert await proc.wait() == 3
        assert await tail.wait_eof(5)
        await tail.close()
        assert (tmp_path / "engine.log").read_text() == "hello\n"
        proc, tail = await spawn(["sleep", "30"], None, None, "t")
        until(lambda: Path(f"/proc/{proc.pid}/cmdline").read_bytes() == b"sleep\x0030\x00", "exec into sleep")
        await terminate(proc, 1)
        await tail.close()

    asyncio.run(main())


def test_a_missing_program_raises_in_the_launcher() -> None:
    with pytest.raises(FileNotFoundError):
        die_with_launcher(["no-such-program-here"], {"PATH": "/usr/bin"})


def test_children_die_with_a_launcher_killed_by_sigkill(tmp_path: Path) -> None:
    """The death signal is set by the exec shim (no ``preexec_fn``, unsafe with threads): a launcher with
    threads, SIGKILLed, takes its engine with it."""
    launcher = textwrap.dedent(
        """
        import subprocess, sys, threading, time
        from coldstart.launcher.process import die_with_launcher
        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
        child = subprocess.Popen(die_with_launcher(["sleep", "60"]), start_new_session=True)
        print(child.pid, flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    until(lambda: Path(f"/proc/{child}/cmdline").read_bytes().startswith(b"sleep"), "the child execs sleep")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    until(lambda: not running(child), "the child dies with its launcher", timeout=10)


def test_criu_advertises_the_tcp_mode_it_dumps_with() -> None:
    """It advertised "tcp-close" while dumping and restoring with --tcp-established."""
    from coldstart.launcher.checkpointers import criu
    from coldstart.launcher.errors import CheckpointerUnavailable

    try:
        capabilities = criu.CriuCheckpointer().probe().capabilities
    except CheckpointerUnavailable as exc:
        pytest.skip(str(exc))
    assert "--tcp-established" in criu.DUMP_FLAGS and "--tcp-established" in criu.RESTORE_FLAGS
    assert "tcp-established" in capabilities and "tcp-close" not in capabilities


def test_firewall_error_is_in_the_one_tree() -> None:
    from coldstart.launcher import errors
    from coldstart.launcher.sandboxes import firewall

    assert firewall.FirewallError is errors.FirewallError and issubclass(
        errors.FirewallError, errors.NetnsError
    )
    assert "FirewallError" in (errors.__doc__ or "")


def test_nofile_limit_raised_and_local_emfile_is_not_an_engine_failure() -> None:
    """A launcher at a soft limit of 1024 ran out of descriptors under 2,000 idle connections, and its
    health probes' EMFILE counted against healthy engines. In a child limited to 64 descriptors: the
    probe's error is recognised as local, and ``raise_nofile_limit`` lifts the soft limit to the hard."""
    script = textwrap.dedent(
        """
        import resource, socket, httpx
        from coldstart.launcher.process import is_local_exhaustion, raise_nofile_limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        server = socket.create_server(("127.0.0.1", 0))
        held = []
        try:
            while True:
                held.append(socket.socket())
        except OSError:
            pass
        try:
            httpx.get(f"http://127.0.0.1:{server.getsockname()[1]}/health", timeout=2)
        except Exception as exc:
            print("local" if is_local_exhaustion(exc) else f"not local: {exc!r}")
        for s in held:
            s.close()
        try:
            httpx.get("http://127.0.0.1:1/health", timeout=2)
        except Exception as exc:
            print("local" if is_local_exhaustion(exc) else "engine")
        old, new = raise_nofile_limit()
        print(old, new == resource.getrlimit(resource.RLIMIT_NOFILE)[0] and new > 64)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.split("\n")[:3] == ["local", "engine", "64 True"], done.stdout + done.stderr


def test_a_pid_handle_never_signals_a_reused_pid() -> None:
    """Engines the launcher did not fork (CRIU-restored) were killed by PID number; through a pidfd a
    signal reaches the process the handle was taken for, or nobody once it is gone."""
    from coldstart.launcher.process import PidHandle

    child = subprocess.Popen(["sleep", "30"])
    handle = PidHandle(child.pid)
    assert handle.send(signal.SIGTERM)
    child.wait(10)  # reaped: the number is free for another process
    assert not handle.send(signal.SIGKILL)
    handle.close()


def test_signal_listed_hits_only_what_is_still_listed_through_its_pidfd() -> None:
    """Processes we did not fork (a dead launcher's namespace, a Ray node's) are signalled through pidfds
    taken before the listing is read again: one that left the listing in between (it exited; its PID may
    belong to someone else by then) is not signalled."""
    kept = subprocess.Popen(["sleep", "60"])
    left = subprocess.Popen(["sleep", "60"])
    listings = iter([[kept.pid, left.pid], [kept.pid]])
    try:
        assert signal_listed(lambda: next(listings), signal.SIGTERM) == [kept.pid]
        assert kept.wait(10) == -signal.SIGTERM
        assert left.poll() is None
    finally:
        for proc in (kept, left):
            proc.kill()
            proc.wait()
