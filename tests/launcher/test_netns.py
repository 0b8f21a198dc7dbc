"""Per-replica network namespaces (launcher/sandboxes/netns.py): made on the restore path without a process.

Each replica start ran seven ``ip`` processes and four ``iptables`` checks; now a namespace, its veth pair
and addresses are made through netlink (pyroute2) from a short-lived thread. Needs root (skipped otherwise).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support import until

from coldstart.launcher.sandboxes import firewall, netns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def test_a_namespace_is_made_without_spawning_a_process(monkeypatch: pytest.MonkeyPatch) -> None:
    firewall.ensure_replica_subnet_guarded()  # the base rules, once per launcher process

    def no_process(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a process was spawned on the restore path: {args[0]!r}")

    with monkeypatch.context() as m:
        m.setattr(subprocess, "run", no_process)
        m.setattr(subprocess, "Popen", no_process)
        ns = netns.NetNamespace.create()
        ns.set_guest_address()  # what runsc does before each start
    try:
        assert Path(ns.path).exists() and netns._mount_point(ns.path)
        inside = subprocess.run(["ip", "-n", ns.name, "-o", "addr"], capture_output=True, text=True).stdout
        assert f"eth0    inet {ns.guest_ip}/30" in inside and "lo    inet 127.0.0.1/8" in inside
        host = subprocess.run(["ip", "-o", "addr", "show", ns.host_if], capture_output=True, text=True).stdout
        assert f"inet {ns.host_ip}/30" in host
        # the engine inside listens on 0.0.0.0; the launcher reaches it at the guest address
        server = subprocess.Popen(
            [*ns.enter_argv(), sys.executable, "-c", _SERVER],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        with socket.create_connection((ns.guest_ip, 8000), timeout=5) as conn:
            assert conn.recv(5) == b"hello"
        server.wait(10)
    finally:
        ns.delete()
    assert not Path(ns.path).exists()
    until(
        lambda: subprocess.run(["ip", "link", "show", ns.host_if], capture_output=True).returncode != 0,
        "the veth to go with its namespace",
    )


_SERVER = """
import socket
s = socket.create_server(("0.0.0.0", 8000))
print("listening", flush=True)
c, _ = s.accept()
c.sendall(b"hello")
c.close()
"""
