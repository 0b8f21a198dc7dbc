"""A launcher whose only snapshot tier is a server that answers one byte every 0.2 s: its replica's restore
hangs on the pull. SIGTERM still stops it at once, with nothing left running (before, a dripping ref kept a
replica "restoring" for 150 s and SIGTERM did not stop the launcher)."""

from __future__ import annotations

import signal
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Served, until

pytestmark = pytest.mark.slow


class _Drip(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
        self.server.requests += 1  # type: ignore[attr-defined]
        try:
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
            for _ in range(100000):
                self.wfile.write(b"x")
                self.wfile.flush()
                self.server.sent += 1  # type: ignore[attr-defined]
                time.sleep(0.2)
        except OSError:
            pass  # the launcher hung up


@pytest.fixture
def dripping() -> Iterator[socketserver.ThreadingTCPServer]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Drip)
    server.daemon_threads = True
    server.requests = server.sent = 0  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_sigterm_stops_a_launcher_stuck_pulling_from_a_dripping_tier(
    dripping: socketserver.ThreadingTCPServer, tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{dripping.server_address[1]}"
    served = Served(
        ["--recipe", "tiny-engine", "--snapshot-tiers", url]
        + ["--snapshot-dir", str(tmp_path / "snapshots"), "--work-dir", str(tmp_path / "run")],
        tmp_path / "serve.log",
        env={"XDG_CACHE_HOME": str(tmp_path / "cache")},
    )
    try:
        until(lambda: dripping.requests > 0, "the launcher asking the dripping tier", timeout=120)  # type: ignore[attr-defined]
        until(lambda: dripping.sent >= 3, "a few bytes of the ref sent: the pull is under way")  # type: ignore[attr-defined]
        started = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)
        code = served.proc.wait(30)
        took = time.monotonic() - started
    finally:
        served.stop()
    assert code == 0, served.log()[-3000:]
    assert took < 10, f"SIGTERM took {took:.1f} s:\n{served.log()[-3000:]}"
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("launcher-*")), "work left"
