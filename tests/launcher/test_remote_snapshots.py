"""Snapshots across hosts through imagefs tiers.

Fast part (no engine): a snapshot-shaped folder committed on "host A", published into an origin store,
served by a real ``coldstart image serve`` cache server, pulled on "host B" (its own store and chunk
cache): gate before any image byte, digest failures refetched from the next tier, a cache server killed
mid-pull, no tier at all, two pullers fetching once.

Slow part (marked slow): two network namespaces (``tests/two_hosts.py``), a real ``transformers serve`` on
the tiny model, a real checkpointer, ``coldstart-serve`` on each host, a real cache server on host A.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support import ChunkServer, heap_like

from coldstart.imagefs.store import ChunkStore
from coldstart.launcher.errors import RemoteSnapshotError, RestoreReason
from coldstart.launcher.snapshots.remote import SnapshotTiers, ref_name
from coldstart.launcher.snapshots.store import SnapshotStore

CHUNK = 256 * 1024
# The two-host tests run the engine under CRIU; COLDSTART_TWO_HOSTS_CHECKPOINTER=runsc runs them under gVisor
# (both pass here).
CHECKPOINTER = os.environ.get("COLDSTART_TWO_HOSTS_CHECKPOINTER", "criu")
KEY = "0123456789abcdef01234567"


@pytest.fixture
def chunk_server(chunk_server: Callable[..., ChunkServer]) -> Callable[..., ChunkServer]:
    """The shared factory, given 30 s to come up (these tests start several servers while engines run)."""
    return functools.partial(chunk_server, ready_timeout_s=30.0)


def fake_snapshot(
    root: Path, key: str = KEY, pages_mb: int = 24, pages: bytes | None = None
) -> SnapshotStore:
    """A committed snapshot with CRIU-like files: small metadata files and one large page image (random
    bytes, which do not compress, unless ``pages`` is given)."""
    store = SnapshotStore(root)
    with store.begin(key) as pending:
        (pending.image_dir / "inventory.img").write_bytes(os.urandom(200))
        (pending.image_dir / "core-1.img").write_bytes(os.urandom(9000))
        (pending.image_dir / "pages-1.img").write_bytes(
            pages if pages is not None else os.urandom(pages_mb << 20)
        )
        (pending.image_dir / "coldstart-criu.json").write_text('{"pipes": []}')
        store.commit(pending, {"identity": {"engine": {"engine": "fake"}}, "created_at": "now"})
    return store


@pytest.fixture
def published(tmp_path: Path, chunk_server):  # type: ignore[no-untyped-def]
    """(host A's store, the origin store dir, a cache server in front of the origin)."""
    a = fake_snapshot(tmp_path / "a-snapshots")
    origin = tmp_path / "origin"
    SnapshotTiers([], publish_to=origin).publish(a.lookup(KEY))
    server = chunk_server(tmp_path / "az-cache", upstream=chunk_server(origin).url)
    return a, origin, server


def same_files(a: SnapshotStore, b: SnapshotStore, key: str = KEY) -> None:
    sa, sb = a.lookup(key), b.lookup(key)
    assert sa is not None and sb is not None
    assert sb.manifest == sa.manifest
    for rel in sa.manifest["files"]:
        assert (sb.path / rel).read_bytes() == (sa.path / rel).read_bytes()
    b.verify(sb, full=True)


def test_pull_through_cache_server_into_empty_host(tmp_path: Path, published) -> None:  # type: ignore[no-untyped-def]
    a, origin, server = published
    b = SnapshotStore(tmp_path / "b-snapshots")
    tiers = SnapshotTiers([server.url, str(origin)], cache_dir=tmp_path / "b-cache")
    found = tiers.find(KEY)
    assert found is not None and found.tier == server.public_url and found.manifest["key"] == KEY
    snap, report = tiers.pull(KEY, b)
    same_files(a, b)
    assert report.bytes == snap.total_bytes
    assert report.remote_bytes <= report.bytes * 1.01 + 64 * 1024  # + the manifest and index
    assert report.tiers[server.public_url]["bytes"] >= report.bytes  # all through the cache server
    # A second pull on B (another key's folder removed, chunks cached): nothing crosses the network.
    b.rm(KEY)
    _, again = tiers.pull(KEY, b)
    assert again.remote_bytes < 64 * 1024  # only the ref's manifest/index re-read: they are cached too
    assert again.local_bytes >= report.bytes
    same_files(a, b)


def test_a_heap_crosses_compressed_and_lands_as_it_was(tmp_path: Path, chunk_server) -> None:  # type: ignore[no-untyped-def]
    """Page images are published zstd-compressed: the store holds, and a puller fetches, a fraction of the
    image; the pulled snapshot's files are the original bytes (full re-hash) and restore as they are."""
    a = fake_snapshot(tmp_path / "a-snapshots", pages=heap_like(16 << 20))
    origin = tmp_path / "origin"
    done = SnapshotTiers([], publish_to=origin).publish(a.lookup(KEY))
    assert done.ref.compressed == ["pages-1.img"]
    assert done.ref.size < a.lookup(KEY).total_bytes / 2
    server = chunk_server(origin)
    b = SnapshotStore(tmp_path / "b-snapshots")
    snap, report = SnapshotTiers([server.url], cache_dir=tmp_path / "b-cache").pull(KEY, b)
    same_files(a, b)  # every file, and the store's full verify
    assert report.bytes == snap.total_bytes and report.published_bytes == done.ref.size
    assert report.remote_bytes <= done.ref.size + 64 * 1024  # the compressed bytes crossed, + the index
    # Publishing raw stays possible (a store read by an older coldstart): the same bytes, uncompressed.
    raw = SnapshotTiers([], publish_to=tmp_path / "raw", compress=False).publish(a.lookup(KEY))
    assert raw.ref.compressed == [] and raw.ref.size == a.lookup(KEY).total_bytes


def test_gate_refuses_before_any_image_byte(tmp_path: Path, published) -> None:  # type: ignore[no-untyped-def]
    _, origin, server = published
    b = SnapshotStore(tmp_path / "b-snapshots")
    cache = tmp_path / "b-cache"
    tiers = SnapshotTiers([server.url, str(origin)], cache_dir=cache)
    seen = []
    with pytest.raises(RemoteSnapshotError) as info:
        tiers.pull(KEY, b, gate=lambda m: seen.append(m["key"]) or ["cpu flag avx512f missing on this host"])
    assert info.value.reason == "gate" and "avx512f" in str(info.value)
    assert seen == [KEY]
    cached = [p for p in cache.rglob("*") if p.is_file()]
    assert len(cached) <= 1 and all(p.stat().st_size < 64 * 1024 for p in cached)  # the manifest at most
    assert b.lookup(KEY) is None and not [p for p in b.root.iterdir() if p.name.startswith(".tmp-")]


def test_missing_snapshot_says_so(tmp_path: Path, published) -> None:  # type: ignore[no-untyped-def]
    _, origin, server = published
    with pytest.raises(RemoteSnapshotError) as info:
        SnapshotTiers([server.url, str(origin)]).pull("f" * 24, SnapshotStore(tmp_path / "b"))
    assert info.value.reason == "missing"


def test_corrupt_chunk_on_cache_server_is_refetched_from_origin(tmp_path: Path, published) -> None:  # type: ignore[no-untyped-def]
    a, origin, server = published
    # Warm the cache server, then flip a byte of one of its page chunks.
    SnapshotTiers([server.url]).pull(KEY, SnapshotStore(tmp_path / "warm"))
    az = ChunkStore(tmp_path / "az-cache")
    victim = next(
        p for p in (tmp_path / "az-cache" / "chunks").rglob("*") if p.is_file() and p.stat().st_size == CHUNK
    )
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    b = SnapshotStore(tmp_path / "b-snapshots")
    cache = tmp_path / "b-cache"
    _, report = SnapshotTiers([server.url, str(origin)], cache_dir=cache).pull(KEY, b)
    same_files(a, b)
    assert report.tiers[f"dir:{origin}"]["hits"] >= 1  # the bad chunk came from the origin
    assert az.read(victim.name) is not None
    for path in cache.rglob("*"):  # the local cache holds only verified chunks
        if path.is_file():
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name


def test_cache_server_killed_mid_pull_falls_back_to_origin(tmp_path: Path, published) -> None:  # type: ignore[no-untyped-def]
    a, origin, server = published
    b = SnapshotStore(tmp_path / "b-snapshots")
    pulled = 0
    lock = threading.Lock()

    def progress(n: int) -> None:
        nonlocal pulled
        with lock:
            pulled += n
            if pulled >= 4 * CHUNK and server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait()

    _, report = SnapshotTiers([server.url, str(origin)], cache_dir=tmp_path / "b-cache").pull(
        KEY, b, progress=progress
    )
    same_files(a, b)
    assert report.tiers[server.public_url]["errors"] >= 1
    assert report.tiers[f"dir:{origin}"]["bytes"] > 0


def test_no_tier_has_it_fails_and_leaves_nothing(tmp_path: Path, published) -> None:  # type: ignore[no-untyped-def]
    _, _, server = published
    b = SnapshotStore(tmp_path / "b-snapshots")
    cache = tmp_path / "b-cache"

    def progress(n: int) -> None:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()

    with pytest.raises(RemoteSnapshotError) as info:
        SnapshotTiers([server.url], cache_dir=cache).pull(KEY, b, progress=progress)
    assert info.value.reason == "fetch" and "is on no tier" in str(info.value)
    assert b.lookup(KEY) is None and not [p for p in b.root.iterdir() if p.name.startswith(".tmp-")]
    for path in cache.rglob("*"):
        if path.is_file():
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name


def test_two_pullers_on_one_host_fetch_once(tmp_path: Path, published) -> None:  # type: ignore[no-untyped-def]
    a, origin, server = published
    b = SnapshotStore(tmp_path / "b-snapshots")
    reports = []

    def pull() -> None:
        tiers = SnapshotTiers([server.url, str(origin)], cache_dir=tmp_path / "b-cache")
        reports.append(tiers.pull(KEY, b)[1])

    threads = [threading.Thread(target=pull) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    same_files(a, b)
    assert sorted(r.already_local for r in reports) == [False, True]
    assert sum(r.remote_bytes for r in reports) <= a.lookup(KEY).total_bytes + 64 * 1024


def test_ls_rm_and_gc_of_the_origin(tmp_path: Path, published) -> None:  # type: ignore[no-untyped-def]
    from coldstart.imagefs.refs import gc

    _, origin, server = published
    tiers = SnapshotTiers([server.url], publish_to=origin)
    assert [s.key for s in tiers.ls()] == [KEY]
    assert gc(origin, min_age_s=0).removed_chunks == 0  # everything is named by the ref
    assert tiers.rm(KEY)
    assert tiers.ls() == [] and tiers.find(KEY) is None
    result = gc(origin, min_age_s=0)
    assert result.removed_chunks > 0 and result.kept_chunks == 0
    assert not (origin / "refs" / ref_name(KEY)).exists()


def test_cli_push_ls_inspect_pull_rm_gc(tmp_path: Path, chunk_server, capsys) -> None:  # type: ignore[no-untyped-def]
    from coldstart.launcher.cli import snapshot as cli
    from coldstart.launcher.snapshots.fingerprint import HostFingerprint
    from coldstart.launcher.snapshots.identity import SnapshotIdentity

    other_host = HostFingerprint(arch="x86_64", kernel="6.1", cpu_model="Xeon", cpu_flags=("avx512f",))
    ident = SnapshotIdentity(
        engine={"engine": "transformers", "engine_version": "5", "model": "/m", "engine_args": []},
        warmup=[],
        canary={"path": "/v1/completions", "body": {"temperature": 0}},
        checkpointer="criu",
        checkpointer_version="4.2.1",
        hooks_version="1",
        image_digest=None,
        fingerprint=other_host,
    )
    a = SnapshotStore(tmp_path / "a")
    with a.begin(ident.key) as pending:
        (pending.image_dir / "pages-1.img").write_bytes(os.urandom(3 * CHUNK + 5))
        a.commit(pending, {"identity": ident.to_json(), "canary": {"text": "hi"}})
    origin = tmp_path / "origin"
    assert (
        cli.main(["--snapshot-dir", str(a.root), "--snapshot-publish", str(origin), "push", ident.key[:6]])
        == 0
    )
    assert "pushed " + ident.key in capsys.readouterr().out
    server = chunk_server(origin)
    b = ["--snapshot-dir", str(tmp_path / "b"), "--snapshot-tiers", server.url]
    assert cli.main([*b, "ls"]) == 0
    out = capsys.readouterr().out
    assert ident.key[:12] in out and server.public_url in out
    assert cli.main([*b, "inspect", ident.key[:8]]) == 1  # another host's fingerprint: refused, says why
    out = capsys.readouterr().out
    assert '"remote"' in out and "fits this host: no:" in out
    assert cli.main([*b, "pull", ident.key[:8]]) == 1  # the gate refuses before any image byte
    assert "does not fit this host" in capsys.readouterr().err
    assert SnapshotStore(tmp_path / "b").ls() == []
    assert cli.main([*b, "pull", ident.key[:8], "--force"]) == 0
    assert "pulled " + ident.key in capsys.readouterr().out
    assert [s.key for s in SnapshotStore(tmp_path / "b").ls()] == [ident.key]
    pub = ["--snapshot-publish", str(origin)]
    assert cli.main([*pub, "rm", "--remote", ident.key[:6]]) == 0
    assert cli.main([*pub, "gc", "--remote", "--min-age", "0"]) == 0
    assert "removed 6 chunks" in capsys.readouterr().out  # 4 page chunks, the index, the manifest


# -- two hosts: real engine, real CRIU, real launchers in two network namespaces ----------------------------


@pytest.fixture(scope="module")
def host_a(tiny_model: Path):  # type: ignore[no-untyped-def]
    """Host A cold-boots the tiny model (runsc or CRIU), snapshots and publishes into its origin store;
    yields (hosts, origin, A's greedy answer, snapshot key). One engine boot for the module."""
    from coldstart.launcher.checkpointers.registry import get_checkpointer
    from coldstart.launcher.errors import CheckpointerUnavailable

    if os.geteuid() != 0:
        pytest.skip(f"network namespaces and {CHECKPOINTER} need root")
    try:
        get_checkpointer(CHECKPOINTER).probe()
    except CheckpointerUnavailable as exc:
        pytest.skip(f"{CHECKPOINTER} unavailable here: {exc}")
    from two_hosts import Launcher, TwoHosts

    # Not under /tmp: a CRIU replica runs with a private tmpfs on /tmp (criu_init), so a restore could not
    # see image files there.
    base = Path(tempfile.mkdtemp(prefix="coldstart-two-hosts-", dir="/var/tmp"))
    try:
        with TwoHosts(base) as hosts:
            origin = hosts.a.root / "origin"
            a = Launcher(
                hosts.a, tiny_model, "a1", "--snapshot-publish", str(origin), checkpointer=CHECKPOINTER
            )
            try:
                a.wait_ready()
                key = a.wait_log(r"snapshot (\w+) published").group(1)
                answer = a.complete()
            finally:
                a.stop()
            yield hosts, origin, answer, key
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _events(log: str) -> str:
    return "\n".join(line for line in log.splitlines() if "coldstart.pool" not in line)


def watch_pull_start(store: Path, then: Callable[[], None]) -> threading.Thread:
    """Call ``then`` as soon as a pull has begun writing image files into ``store`` (mid-pull)."""

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if any(store.glob(".tmp-*/image/*")):
                then()
                return
            time.sleep(0.002)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_host_b_restores_through_the_cache_server_then_from_its_local_copy(host_a, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    from two_hosts import CacheServer, Launcher

    hosts, origin, answer, key = host_a
    server = CacheServer(hosts.a, origin, hosts.a.root / "cache-1.log")
    tiers = [
        "--snapshot-tiers",
        f"{server.url},{origin}",
        "--snapshot-cache",
        str(hosts.b.root / "b1-chunks"),
    ]
    try:
        b = Launcher(hosts.b, tiny_model, "b1", *tiers, checkpointer=CHECKPOINTER)
        try:
            b.wait_ready()
            assert b.complete() == answer  # the same greedy tokens as host A
        finally:
            b.stop()
        log = _events(b.log())
        assert f"snapshot {key} pulled from {server.public_url}" in log, log
        assert f"restored from {key}" in log and "how=cold_boot" not in log, log
        # Second restore on B: from its local copy, nothing pulled.
        again = Launcher(hosts.b, tiny_model, "b1", *tiers, checkpointer=CHECKPOINTER)
        try:
            again.wait_ready()
            assert again.complete() == answer
        finally:
            again.stop()
        log = _events(again.log())
        assert f"restored from {key}" in log and "pulled" not in log, log
    finally:
        server.stop()


@pytest.mark.slow
def test_cache_server_killed_mid_pull_restores_from_the_origin(host_a, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    from two_hosts import CacheServer, Launcher

    hosts, origin, answer, key = host_a
    server = CacheServer(hosts.a, origin, hosts.a.root / "cache-2.log")
    try:
        b = Launcher(
            hosts.b,
            tiny_model,
            "b2",
            "--snapshot-tiers",
            f"{server.url},{origin}",
            initial=0,
            checkpointer=CHECKPOINTER,
        )
        watcher = watch_pull_start(b.dir / "snapshots", server.kill)
        try:
            assert b.complete() == answer  # scale from zero: the request waits for the restore
            watcher.join(1)
            assert server.proc.poll() is not None, "the cache server was never killed mid-pull"
        finally:
            b.stop()
        log = _events(b.log())
        assert "tier unreachable, trying the next one" in log, log
        assert f"snapshot {key} pulled from {server.public_url}" in log and f"restored from {key}" in log, log
    finally:
        server.stop()


@pytest.mark.slow
def test_no_tier_left_mid_pull_cold_boots_never_a_broken_replica(host_a, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    from two_hosts import CacheServer, Launcher

    hosts, origin, answer, key = host_a
    server = CacheServer(hosts.a, origin, hosts.a.root / "cache-3.log")
    try:
        b = Launcher(
            hosts.b, tiny_model, "b3", "--snapshot-tiers", server.url, initial=0, checkpointer=CHECKPOINTER
        )
        watcher = watch_pull_start(b.dir / "snapshots", server.kill)
        try:
            assert b.complete() == answer
            watcher.join(1)
        finally:
            b.stop()
        log = _events(b.log())
        assert "restore failed (fetch)" in log and "failed to start" not in log, log
        assert "how=cold_boot" in log, log
        leftovers = [p.name for p in (b.dir / "snapshots").iterdir() if p.name.startswith(".tmp-")]
        assert leftovers == []
    finally:
        server.stop()


def test_pulled_snapshot_is_rehashed_after_a_crash_before_its_fsync(
    tmp_path: Path, published, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    from coldstart.launcher.snapshots import file_digests

    _, origin, _ = published
    b = SnapshotStore(tmp_path / "b-snapshots")
    monkeypatch.setattr("coldstart.launcher.snapshots.store.PULLED_SYNC_DELAY_S", 0.0)
    snap, _ = SnapshotTiers([str(origin)]).pull(KEY, b)
    stamp = b.state_dir / f"{KEY}.unsynced"
    deadline = time.monotonic() + 30
    while stamp.exists() and time.monotonic() < deadline:  # the background fsync removes it
        time.sleep(0.01)
    assert not stamp.exists()
    hashed: list[str] = []
    real = file_digests.sha256_file
    monkeypatch.setattr(file_digests, "sha256_file", lambda p: hashed.append(str(p)) or real(p))
    b.verify(snap)
    assert hashed == []  # synced: the digests remembered at pull time are trusted
    stamp.write_text("another-boot")  # as if the machine went down before the fsync finished
    b.verify(snap)
    assert len(hashed) == len(snap.manifest["files"]) and not stamp.exists()


def test_a_bad_tier_is_a_usage_error_at_launch(tmp_path: Path) -> None:
    from coldstart.launcher.errors import UsageError

    with pytest.raises(UsageError, match="not a directory"):
        SnapshotTiers([str(tmp_path / "no-such-store")])
    with pytest.raises(UsageError, match="unknown scheme"):
        SnapshotTiers(["ftp://origin/snapshots"])


def test_publish_rehashes_first_and_refuses_a_damaged_snapshot(tmp_path: Path) -> None:
    from coldstart.launcher.errors import SnapshotCorrupt

    a = fake_snapshot(tmp_path / "a", pages_mb=1)
    snap = a.lookup(KEY)
    pages = snap.image_dir / "pages-1.img"
    data = bytearray(pages.read_bytes())
    data[7] ^= 1
    st = pages.stat()
    pages.write_bytes(bytes(data))
    os.utime(pages, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: only a re-hash sees it
    with pytest.raises(SnapshotCorrupt, match="pages-1.img sha256"):
        SnapshotTiers([], publish_to=tmp_path / "origin").publish(snap)
    assert not (tmp_path / "origin" / "refs" / ref_name(KEY)).exists()


@pytest.mark.slow
def test_host_b_pulls_ahead_at_launch_and_restores_locally(host_a, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    from two_hosts import CacheServer, Launcher

    hosts, origin, answer, key = host_a
    server = CacheServer(hosts.a, origin, hosts.a.root / "cache-4.log")
    try:
        b = Launcher(
            hosts.b, tiny_model, "b4", "--snapshot-tiers", server.url, initial=0, checkpointer=CHECKPOINTER
        )
        try:
            b.wait_log(rf"snapshot {key} pulled from")  # before any request: a buffer host pulls ahead
            server.stop()  # what follows needs no network
            assert b.complete() == answer
        finally:
            b.stop()
        log = _events(b.log())
        assert log.index("pulled from") < log.index("new -> restoring"), log
        assert f"restored from {key}" in log and "how=cold_boot" not in log, log
    finally:
        server.stop()


def test_with_a_trust_key_only_signed_refs_are_pulled(tmp_path: Path, chunk_server) -> None:  # type: ignore[no-untyped-def]
    """Refs and manifests came unsigned over plain HTTP: whoever could write a store (or the network) chose
    what a host restored. With the deployment's trust key, publishing signs the ref and pulling refuses a
    ref that is unsigned, signed with another key, or altered."""
    import json as json_

    from coldstart.imagefs.refs import ref_path
    from coldstart.launcher.snapshots.remote import ref_name, remote_for

    key_file = tmp_path / "trust.key"
    key_file.write_bytes(os.urandom(32).hex().encode())
    a = fake_snapshot(tmp_path / "a", pages_mb=1)
    signed_store, unsigned_store = tmp_path / "signed", tmp_path / "unsigned"
    publisher = remote_for(None, None, signed_store, trust_key_file=key_file)
    assert publisher is not None
    publisher.publish(a.lookup(KEY))  # type: ignore[arg-type]
    SnapshotTiers([], publish_to=unsigned_store).publish(a.lookup(KEY))  # type: ignore[arg-type]

    def puller(store: Path) -> SnapshotTiers:
        tiers = remote_for([chunk_server(store).url], None, None, trust_key_file=key_file)
        assert tiers is not None
        return tiers

    snap, _ = puller(signed_store).pull(KEY, SnapshotStore(tmp_path / "b1"))
    assert snap.key == KEY
    with pytest.raises(RemoteSnapshotError, match="not signed") as refused:
        puller(unsigned_store).pull(KEY, SnapshotStore(tmp_path / "b2"))
    assert refused.value.reason is RestoreReason.DIGEST
    ref_file = ref_path(signed_store, ref_name(KEY))  # a ref altered after signing: another index
    body = json_.loads(ref_file.read_text())
    body["index"] = "0" * 64
    ref_file.write_text(json_.dumps(body))
    with pytest.raises(RemoteSnapshotError, match="signature does not match"):
        puller(signed_store).pull(KEY, SnapshotStore(tmp_path / "b3"))
    # without a key configured, unsigned refs are pulled as before
    SnapshotTiers([chunk_server(unsigned_store).url]).pull(KEY, SnapshotStore(tmp_path / "b4"))


def test_cluster_nodes_sign_and_check_with_the_deployments_trust_key(tmp_path: Path, chunk_server) -> None:  # type: ignore[no-untyped-def]
    """On a Ray cluster the replica actor publishes and the other nodes pull ahead through ``node_tiers``:
    with ``--snapshot-trust-key`` what a node publishes is signed (a restore elsewhere, which checks, takes
    it) and what it pulls is checked (an unsigned ref is refused)."""
    from coldstart.launcher.cluster.actor import node_tiers
    from coldstart.launcher.config import ServeConfig

    key_file = tmp_path / "trust.key"
    key_file.write_bytes(os.urandom(32).hex().encode())
    config = ServeConfig(engine="example", model="m", snapshot_trust_key=key_file)
    a = fake_snapshot(tmp_path / "a", pages_mb=1)
    published, unsigned = tmp_path / "published", tmp_path / "unsigned"
    node_tiers(config, (), None, published).publish(a.lookup(KEY))
    SnapshotTiers([], publish_to=unsigned).publish(a.lookup(KEY))  # type: ignore[arg-type]

    snap, _ = node_tiers(config, (chunk_server(published).url,), None, None).pull(
        KEY, SnapshotStore(tmp_path / "b")
    )
    assert snap.key == KEY
    with pytest.raises(RemoteSnapshotError, match="not signed"):
        node_tiers(config, (chunk_server(unsigned).url,), None, None).pull(KEY, SnapshotStore(tmp_path / "c"))


def test_published_and_cached_chunks_are_private(tmp_path: Path, chunk_server) -> None:  # type: ignore[no-untyped-def]
    """Published chunks and pulled ones hold page images (the engine's memory, its environment's secrets):
    the publish store and the pull cache are folders only their owner can enter, also when they existed."""
    a = fake_snapshot(tmp_path / "a", pages_mb=1)
    store, cache = tmp_path / "published", tmp_path / "cache"
    store.mkdir(mode=0o755)
    cache.mkdir(mode=0o755)
    SnapshotTiers([], publish_to=store).publish(a.lookup(KEY))  # type: ignore[arg-type]
    SnapshotTiers([chunk_server(store).url], cache).pull(KEY, SnapshotStore(tmp_path / "b"))
    assert store.stat().st_mode & 0o777 == 0o700
    assert cache.stat().st_mode & 0o777 == 0o700 and any(cache.rglob("*"))
