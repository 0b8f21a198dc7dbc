"""Remote tiers against hostile servers (imagefs/tiers.py, and the pulls of launcher/snapshots/remote.py):
a ref that drips one byte at a time, a ref that claims or streams gigabytes. Before, a dripping ref kept a
replica restoring for 150 s (SIGTERM did not stop the launcher) and a 1.5 GB ref took it to 1.55 GB RSS."""

from __future__ import annotations

import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coldstart.imagefs.errors import TierError
from coldstart.imagefs.tiers import MAX_REF_BYTES, HttpTier
from coldstart.launcher.errors import RemoteSnapshotError
from coldstart.launcher.snapshots.remote import SnapshotTiers
from coldstart.launcher.snapshots.store import SnapshotStore


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        path = self.rfile.readline().split()[1].decode()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
        self.server.requests.append(path)  # type: ignore[attr-defined]
        out = self.wfile
        try:
            if path.endswith("drip"):  # announces 1000 bytes, sends one every 0.2 s
                out.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
                for _ in range(1000):
                    out.write(b"x")
                    out.flush()
                    time.sleep(0.2)
            elif path.endswith("huge"):  # claims 1.5 GB
                out.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1500000000\r\n\r\n" + b"{" * 65536)
            elif path.endswith("endless"):  # no length, 64 KiB chunks for ever
                out.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                while True:
                    out.write(b"10000\r\n" + b"x" * 65536 + b"\r\n")
            else:
                out.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        except OSError:
            pass  # the client hung up: what the tests want


@pytest.fixture
def hostile() -> Iterator[tuple[str, list[str]]]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.requests = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.requests  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()


def test_a_dripping_answer_ends_at_the_request_deadline(hostile: tuple[str, list[str]]) -> None:
    url, _ = hostile
    started = time.monotonic()
    with pytest.raises(TierError, match="took more than 1 s"):
        HttpTier(url, deadline_s=1.0).get_ref("drip")
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("name", ["huge", "endless"])
def test_an_oversized_ref_is_refused_without_reading_it(hostile: tuple[str, list[str]], name: str) -> None:
    url, _ = hostile
    started = time.monotonic()
    with pytest.raises(TierError, match=f"more than the {MAX_REF_BYTES} (bytes )?allowed"):
        HttpTier(url).get_ref(name)
    assert time.monotonic() - started < 5


def _pull_in_thread(tiers: SnapshotTiers, key: str, store: SnapshotStore) -> tuple[threading.Thread, list]:  # type: ignore[type-arg]
    outcome: list = []  # type: ignore[type-arg]

    def run() -> None:
        try:
            tiers.pull(key, store)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_close_cancels_a_pull_in_progress(hostile: tuple[str, list[str]], tmp_path: Path) -> None:
    """What the launcher's shutdown calls: the pull stuck on a dripping ref ends at once."""
    url, requests = hostile
    tiers = SnapshotTiers([url])
    thread, outcome = _pull_in_thread(tiers, "drip", SnapshotStore(tmp_path / "store"))
    deadline = time.monotonic() + 10
    while not any(r.endswith("snapshot.drip") for r in requests):
        assert time.monotonic() < deadline, "the pull never asked for the ref"
        time.sleep(0.02)
    time.sleep(0.3)  # a few drips in
    started = time.monotonic()
    tiers.close()
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - started < 2
    assert isinstance(outcome[0], RemoteSnapshotError) and "cancelled" in str(outcome[0])


def test_a_pull_ends_at_its_deadline(hostile: tuple[str, list[str]], tmp_path: Path) -> None:
    url, _ = hostile
    tiers = SnapshotTiers([url], pull_deadline_s=1.0)
    started = time.monotonic()
    thread, outcome = _pull_in_thread(tiers, "drip", SnapshotStore(tmp_path / "store"))
    thread.join(10)
    assert not thread.is_alive() and time.monotonic() - started < 3
    assert isinstance(outcome[0], RemoteSnapshotError) and "not pulled within 1 s" in str(outcome[0])
