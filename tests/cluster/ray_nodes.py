"""A real two-node Ray cluster on one machine: two network namespaces on a bridge, one coldstart node in each.

    root netns  brray-<pid> 10.221.0.254/24  the gateway (the test, through Ray Client ray://10.221.0.1:10001)
    node A      csray-a-<pid>: 10.221.0.1    ``coldstart node start --head``, 1 unit, its own snapshot store
    node B      csray-b-<pid>: 10.221.0.2    ``coldstart node start --address 10.221.0.1:6379``, 1 unit

Each node has its own Ray ``--temp-dir`` (they share the file system), its own snapshot directory and work
directory; both publish into one origin chunk store and pull from it (the directory tier a cache server
would front). Nodes enter their namespace with ``nsenter --net`` only (CRIU restores files at the paths the
engine mapped, so both nodes see one file tree, as two machines with the same model would).

Ray's node failure detection is tuned down (health checks every 500 ms, 4 misses) so a killed node is seen
in ~2 s instead of ~15-30 s. ``ray stop`` is never used (it stops every Ray process of the machine): a node
is stopped by its temp dir (``coldstart node stop``) and then by the PIDs left in its namespace.
Used by ``tests/cluster/`` and ``bench/cluster.py`` (run them under ``flock /tmp/coldstart-heavy.lock``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SUBNET = "10.221.0"
# Ray 2.60 turns token authentication on by itself where ~/.ray/auth_token exists (a Ray run on this
# machine may have written one), and a node or driver that did not read the same token is refused
# ("InvalidAuthToken"): the test cluster runs without, for every process of it (nodes, this gateway).
AUTH_ENV = {"RAY_AUTH_MODE": "disabled"}
HEALTH_ENV = {
    **AUTH_ENV,
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "4",
}


def _ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def netns_pids(netns: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
    return [int(p) for p in done.stdout.split()]


@dataclass
class Node:
    name: str  # "a" or "b"
    netns: str
    ip: str
    root: Path  # snapshot and work dirs
    temp_dir: Path  # Ray's (short: unix socket paths are bounded)
    alive: bool = False

    def enter(self) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns}"]

    @property
    def snapshot_dir(self) -> Path:
        return self.root / "snapshots"


class RayNodes:
    """``with RayNodes(root) as cluster:``; on exit no namespace, bridge, Ray process or temp dir is left."""

    def __init__(self, root: Path, units: int = 1) -> None:
        pid = os.getpid()
        self.root = Path(root)
        self.units = units
        self.bridge = f"brray{pid % 100000}"
        self.origin = self.root / "origin"
        self.a = Node("a", f"csray-a-{pid}", f"{SUBNET}.1", self.root / "a", Path(f"/tmp/csray-{pid}-a"))
        self.b = Node("b", f"csray-b-{pid}", f"{SUBNET}.2", self.root / "b", Path(f"/tmp/csray-{pid}-b"))
        self.address = f"ray://{self.a.ip}:10001"
        self.gcs = f"{self.a.ip}:6379"

    @property
    def nodes(self) -> tuple[Node, Node]:
        return (self.a, self.b)

    def __enter__(self) -> RayNodes:
        self._saved_env = {k: os.environ.get(k) for k in AUTH_ENV}
        os.environ.update(AUTH_ENV)  # this process (the gateway) and its children; restored on exit
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{SUBNET}.254/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for node in self.nodes:
                node.root.mkdir(parents=True, exist_ok=True)
                veth = f"vray{node.name}{os.getpid() % 100000}"
                _ip("netns", "add", node.netns)
                _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", node.netns)
                _ip("link", "set", veth, "master", self.bridge, "up")
                _ip("-n", node.netns, "addr", "add", f"{node.ip}/24", "dev", "eth0")
                _ip("-n", node.netns, "link", "set", "eth0", "up")
                _ip("-n", node.netns, "link", "set", "lo", "up")
            self.start_node(self.a)
            self.start_node(self.b)
        except BaseException:
            self.__exit__()
            raise
        return self

    def start_node(self, node: Node, attempts: int = 3) -> None:
        """``coldstart node start`` in the node's namespace; tried again (after stopping what the failed
        try left) when a loaded machine makes Ray miss its own deadlines (GCS connection, raylet start)."""
        argv = [sys.executable, "-m", "coldstart.launcher.cli.main", "node", "start"]
        argv += ["--head"] if node is self.a else ["--address", self.gcs]
        argv += ["--node-ip", node.ip, "--units", str(self.units), "--temp-dir", str(node.temp_dir)]
        argv += ["--snapshot-dir", str(node.snapshot_dir), "--work-dir", str(node.root / "work")]
        argv += ["--snapshot-publish", str(self.origin), "--snapshot-tiers", str(self.origin)]
        log = node.root / "ray-start.log"
        for attempt in range(attempts):
            with open(log, "ab") as out:
                done = subprocess.run(
                    [*node.enter(), *argv],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **HEALTH_ENV},
                    timeout=180,
                )
            if done.returncode == 0:
                node.alive = True
                return
            if attempt + 1 < attempts:
                self.stop_node(node, force=True)
                shutil.rmtree(node.temp_dir, ignore_errors=True)
                time.sleep(2.0)
        raise RuntimeError(f"node {node.name} did not start: {log.read_text()[-2000:]}")

    def kill_node(self, node: Node) -> None:
        """The node dies: every process in its namespace SIGKILLed (raylet first), the namespace removed."""
        pids = netns_pids(node.netns)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait_gone(pids)
        _ip("netns", "del", node.netns, check=False)
        node.alive = False

    def stop_node(self, node: Node, force: bool = False) -> None:
        if node.alive or force or Path(f"/run/netns/{node.netns}").exists():
            subprocess.run(
                [sys.executable, "-m", "coldstart.launcher.cli.main", "node", "stop"]
                + ["--temp-dir", str(node.temp_dir), "--grace", "5"],
                capture_output=True,
                timeout=60,
            )
            if Path(f"/run/netns/{node.netns}").exists():
                left = netns_pids(node.netns)
                for pid in left:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                _wait_gone(left)
        node.alive = False

    def __exit__(self, *exc: object) -> None:
        for node in (self.b, self.a):  # the worker first: the head's GCS outlives it
            self.stop_node(node)
            _ip("netns", "del", node.netns, check=False)
            logs = node.temp_dir / "session_latest" / "logs"  # kept beside the node's files (tmp_path)
            if logs.is_dir():
                shutil.copytree(logs, node.root / "ray-logs", dirs_exist_ok=True)
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        _ip("link", "del", self.bridge, check=False)
        for key, value in getattr(self, "_saved_env", {}).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    def leftovers(self) -> list[str]:
        """What this cluster left on the machine (empty after ``__exit__``)."""
        left = []
        for node in self.nodes:
            if Path(f"/run/netns/{node.netns}").exists():
                left.append(f"netns {node.netns}")
            if node.temp_dir.exists():
                left.append(f"temp dir {node.temp_dir}")
            needle = str(node.temp_dir).encode()
            for proc in Path("/proc").iterdir():
                if proc.name.isdigit():
                    with contextlib.suppress(OSError):
                        if needle in (proc / "cmdline").read_bytes():
                            left.append(f"process {proc.name}")
        if Path(f"/sys/class/net/{self.bridge}").exists():
            left.append(f"bridge {self.bridge}")
        return left


def _wait_gone(pids: list[int], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.02)
