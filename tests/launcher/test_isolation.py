"""Only the launcher reaches an engine; engines die with their launcher; a new launcher cleans what a
killed one left. Real processes, real network namespaces, a real unprivileged user (``nobody``)."""

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

from coldstart.engine_adapters.base import LaunchSpec
from coldstart.launcher.process import free_port_pair, running
from coldstart.launcher.sandboxes.netns import NETNS_DIR, NetNamespace, cleanup_stale, processes_in
from coldstart.launcher.sandboxes.plain import PlainSandbox

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and iptables need root")

CONNECT = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()"


def connects(host: str, port: int, user: str | None = None) -> bool:
    argv = [sys.executable, "-c", CONNECT, host, str(port)]
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0


SERVE_TWO_PORTS = textwrap.dedent(
    """
    import socket, sys, time
    ports = [int(sys.argv[2]), int(sys.argv[2]) + 1]
    socks = [socket.create_server((sys.argv[1], p)) for p in ports]
    print("listening", flush=True)
    time.sleep(600)
    """
)


def test_only_root_reaches_a_plain_sandbox_engine_and_its_hooks_port() -> None:
    async def main() -> None:
        port = free_port_pair()
        sandbox = PlainSandbox("isolation", port=port)
        await sandbox.start(LaunchSpec(argv=[sys.executable, "-c", SERVE_TWO_PORTS, "127.0.0.1", str(port)]))
        try:
            await asyncio.to_thread(until, lambda: connects("127.0.0.1", port), "engine listening")
            for p in (port, port + 1):
                assert await asyncio.to_thread(connects, "127.0.0.1", p)
                assert not await asyncio.to_thread(connects, "127.0.0.1", p, "nobody")
        finally:
            await sandbox.stop(1.0)
        # The rule goes with the sandbox.
        rules = subprocess.run(["iptables", "-w", "-S", "COLDSTART"], capture_output=True, text=True).stdout
        assert f"--dport {port}:{port + 1}" not in rules

    asyncio.run(main())


def test_only_root_reaches_a_replica_address() -> None:
    ns = NetNamespace.create()
    server = subprocess.Popen(
        [*ns.enter_argv(), sys.executable, "-c", SERVE_TWO_PORTS, "0.0.0.0", "8000"], stdout=subprocess.PIPE
    )
    try:
        assert server.stdout is not None and server.stdout.readline() == b"listening\n"
        assert connects(ns.guest_ip, 8000)
        assert connects(ns.guest_ip, 8001)
        assert not connects(ns.guest_ip, 8000, "nobody")  # the engine
        assert not connects(ns.guest_ip, 8001, "nobody")  # its hooks channel
    finally:
        server.kill()
        server.wait()
        ns.delete()


LAUNCHER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from coldstart.engine_adapters.base import LaunchSpec
    from coldstart.launcher.sandboxes.plain import PlainSandbox

    async def main():
        sandboxes = [PlainSandbox("plain")]
        if sys.argv[1] == "criu":
            from coldstart.launcher.checkpointers.criu import CriuSandbox, find_criu
            sandboxes.append(CriuSandbox(Path(sys.argv[2]), "r1", find_criu()))
        for sandbox in sandboxes:
            await sandbox.start(LaunchSpec(argv=["sleep", "600"]))
        pids = [p for s in sandboxes for p in s.host_pids()]
        print(" ".join(map(str, pids)), flush=True)
        await asyncio.sleep(600)

    asyncio.run(main())
    """
)


def test_engines_die_with_a_sigkilled_launcher(tmp_path: Path) -> None:
    from coldstart.launcher.checkpointers.criu import find_criu

    kind = "criu" if find_criu() else "plain"
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, kind, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert launcher.stdout is not None
    engines = [int(p) for p in launcher.stdout.readline().split()]
    assert len(engines) >= (2 if kind == "criu" else 1) and all(running(p) for p in engines)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    until(lambda: not any(running(p) for p in engines), "engines gone with their launcher", timeout=20.0)
    # The namespace the launcher could not delete is found and removed by the next start.
    stale = [line for line in cleanup_stale() if str(launcher.pid) in line]
    if kind == "criu":
        assert any("network namespace" in line for line in stale), stale


LEAKY_LAUNCHER = textwrap.dedent(
    """
    import os, subprocess
    from coldstart.launcher.sandboxes.netns import NetNamespace
    ns = NetNamespace.create()
    # An engine started without dying with us (as before the fix), then the launcher dies uncleanly.
    engine = subprocess.Popen([*ns.enter_argv(), "sleep", "600"], start_new_session=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(ns.name, engine.pid, flush=True)
    os._exit(0)
    """
)


def test_next_start_kills_and_removes_what_a_dead_launcher_left() -> None:
    out = subprocess.run([sys.executable, "-c", LEAKY_LAUNCHER], capture_output=True, text=True, check=True)
    name, engine = out.stdout.split()
    assert running(int(engine)) and processes_in(NETNS_DIR / name) == [int(engine)]
    removed = cleanup_stale()
    assert any(f"{name}" in line for line in removed), removed
    # The kill is ours unless another launcher starting on this host cleaned it first (same code).
    killed = [line for line in removed if "killed 1 process" in line and engine in line]
    assert killed or not running(int(engine)), removed
    until(lambda: not running(int(engine)), "the leaked engine killed", timeout=20.0)
    assert not (NETNS_DIR / name).exists()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f"csh{name.split('-')[2]}" not in links
