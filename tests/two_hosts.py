"""Two "hosts" on one machine for snapshots across hosts: two network namespaces on a bridge, each with its
own directories and its own ``coldstart-serve``; a ``coldstart image serve`` cache server on host A.

    root netns   br13-<pid> 10.213.0.254/24      (the test or benchmark talks to both hosts from here)
    host A       cs13a-<pid>: eth0 10.213.0.1/24 (launcher, cache server)
    host B       cs13b-<pid>: eth0 10.213.0.2/24 (launcher)

Processes enter a host with ``nsenter --net`` only (no mount namespace: CRIU restores files at the paths
the engine mapped, so both hosts see one file tree, as two machines with the same image and model would).
Used by ``tests/launcher/test_remote_snapshots.py`` and ``bench/snapshot_hosts.py``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from support import write_token

SUBNET = "10.213.0"
PROXY_PORT = 8000
CACHE_PORT = 8700


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Host:
    name: str  # "a" or "b"
    netns: str
    ip: str
    root: Path

    def enter(self) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns}"]


class TwoHosts:
    """Create with ``with TwoHosts(root) as hosts:``; everything is removed on exit."""

    def __init__(self, root: Path) -> None:
        pid = os.getpid()
        self.bridge = f"br13-{pid % 100000}"
        self.root = Path(root)
        self.a = Host("a", f"cs13a-{pid}", f"{SUBNET}.1", self.root / "a")
        self.b = Host("b", f"cs13b-{pid}", f"{SUBNET}.2", self.root / "b")

    def __enter__(self) -> TwoHosts:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{SUBNET}.254/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for host in (self.a, self.b):
                host.root.mkdir(parents=True, exist_ok=True)
                veth = f"v13{host.name}{os.getpid() % 100000}"
                _ip("netns", "add", host.netns)
                _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
                _ip("link", "set", veth, "master", self.bridge, "up")
                _ip("-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
                _ip("-n", host.netns, "link", "set", "eth0", "up")
                _ip("-n", host.netns, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for host in (self.a, self.b):
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


class Proc:
    """A process on a host, its output in a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, host: Host, argv: list[str], log: Path) -> None:
        self.host = host
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*host.enter(), *argv], stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: the way a crashed server goes."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, grace_s: float = 60.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


class CacheServer(Proc):
    def __init__(self, host: Host, store: Path, log: Path, upstream: str | None = None) -> None:
        token = write_token(log.with_suffix(".token"))
        argv = [sys.executable, "-m", "coldstart.imagefs.cli", "serve", "--store", str(store)]
        argv += ["--host", host.ip, "--port", str(CACHE_PORT), "--token-file", str(log.with_suffix(".token"))]
        argv += ["--upstream", upstream] if upstream else []
        super().__init__(host, argv, log)
        self.public_url = f"http://{host.ip}:{CACHE_PORT}"  # what logs and reports name
        self.url = f"http://:{token}@{host.ip}:{CACHE_PORT}"  # the tier URL carries the server's token
        wait_until(lambda: _ok(f"{self.url}/healthz"), 30, "the cache server", self)


class Launcher(Proc):
    """``coldstart-serve transformers MODEL --snapshot criu|runsc`` on a host; its proxy on the host's IP."""

    def __init__(
        self, host: Host, model: Path, name: str, *extra: str, initial: int = 1, checkpointer: str = "criu"
    ) -> None:
        self.dir = host.root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "coldstart.launcher.cli.serve", "transformers", str(model)]
        argv += ["--host", host.ip, "--port", str(PROXY_PORT), "--snapshot", checkpointer]
        argv += ["--snapshot-dir", str(self.dir / "snapshots"), "--work-dir", str(self.dir / "work")]
        argv += ["--initial-replicas", str(initial), "--idle-timeout", "0", *extra]
        super().__init__(host, argv, self.dir / "serve.log")
        self.url = f"http://{host.ip}:{PROXY_PORT}"

    def wait_listening(self, timeout: float = 60.0) -> None:
        """The proxy answers (with or without a replica)."""
        wait_until(lambda: _ok(f"{self.url}/health", any_status=True), timeout, "the proxy to listen", self)

    def wait_ready(self, timeout: float = 300.0) -> None:
        def ready() -> bool:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                return bool(httpx.get(f"{self.url}/health", timeout=2, trust_env=False).json()["ready"])
            return False

        wait_until(ready, timeout, "a ready replica", self)

    def wait_log(self, pattern: str, timeout: float = 120.0) -> re.Match[str]:
        found: list[re.Match[str]] = []

        def seen() -> bool:
            match = re.search(pattern, self.log())
            if match:
                found.append(match)
            return match is not None

        wait_until(seen, timeout, f"log line /{pattern}/", self)
        return found[0]

    def complete(self, prompt: str = "hello there", max_tokens: int = 8) -> dict[str, object]:
        """A greedy completion: its text, token count and (where the engine reports them) token logprobs."""
        body = {
            "model": self.model_name,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "logprobs": True,
        }
        self.wait_listening()
        response = httpx.post(f"{self.url}/v1/chat/completions", json=body, timeout=300, trust_env=False)
        response.raise_for_status()
        data = response.json()
        choice = data["choices"][0]
        tokens = [t.get("token") for t in ((choice.get("logprobs") or {}).get("content") or [])]
        return {
            "text": choice["message"]["content"],
            "tokens": tokens,
            "completion_tokens": data.get("usage", {}).get("completion_tokens"),
        }

    @property
    def model_name(self) -> str:
        return str(self.proc.args[self.proc.args.index("transformers") + 1])  # type: ignore[union-attr]


def _ok(url: str, any_status: bool = False) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        status = httpx.get(url, timeout=1, trust_env=False).status_code
        return any_status or status == 200
    return False


def wait_until(predicate, timeout: float, what: str, proc: Proc | None = None) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.proc.poll() is not None:
            raise AssertionError(f"{what}: process exited {proc.proc.returncode}:\n{proc.log()[-4000:]}")
        if predicate():
            return
        time.sleep(0.05)
    tail = proc.log()[-4000:] if proc is not None else ""
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{tail}")
