"""The HTTP cache server and origin, and mounts reading through them (real servers, real FUSE)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import httpx
import pytest

from coldstart.imagefs.build import build
from coldstart.imagefs.store import ChunkStore


def test_cache_server_fills_from_upstream(tmp_path, chunk_server) -> None:
    origin_store = tmp_path / "origin"
    digest, _ = ChunkStore(origin_store).put(b"payload" * 1000)
    origin = chunk_server(origin_store)
    cache = chunk_server(tmp_path / "az-cache", upstream=origin.url)
    url = f"{cache.url}/chunks/{digest.hex()}"
    assert httpx.get(url).content == b"payload" * 1000
    assert ChunkStore(tmp_path / "az-cache").read(digest.hex()) == b"payload" * 1000  # kept
    origin.stop()
    assert httpx.get(url).content == b"payload" * 1000  # now served from its own store
    assert httpx.get(f"{cache.url}/chunks/{'0' * 64}").status_code == 502  # miss, upstream gone
    assert httpx.get(f"{cache.url}/chunks/not-a-digest").status_code == 400


def test_cache_server_refuses_bad_upstream_bytes(tmp_path, chunk_server) -> None:
    origin_store = tmp_path / "origin"
    good = b"good bytes"
    digest = hashlib.sha256(good).hexdigest()
    ChunkStore(origin_store).write(digest, b"evil bytes")
    origin = chunk_server(origin_store)
    cache = chunk_server(tmp_path / "az-cache", upstream=origin.url)
    assert httpx.get(f"{cache.url}/chunks/{digest}").status_code == 502
    assert ChunkStore(tmp_path / "az-cache").read(digest) is None


@pytest.mark.usefixtures("fuse")
def test_reads_continue_from_origin_when_cache_server_dies(tmp_path, chunk_server, mount_image) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(8 << 20)
    (src / "big.bin").write_bytes(data)
    store = tmp_path / "store"
    result = build(src, store, chunk_size=64 * 1024)
    cache_server = chunk_server(tmp_path / "az-cache", upstream=chunk_server(store).url)
    with mount_image(result.index_path, [cache_server.url, str(store)], read_ahead_kb=128) as m:
        with open(m.mountpoint / "big.bin", "rb") as f:
            head = f.read(256 * 1024)
            cache_server.stop()  # mid-read
            rest = f.read()
        assert head + rest == data
    tiers = m.stats["tiers"]
    assert tiers[cache_server.public_url]["hits"] >= 1
    assert tiers[cache_server.public_url]["errors"] >= 1
    assert tiers[f"dir:{store}"]["hits"] >= 1


@pytest.mark.usefixtures("fuse")
def test_http_origin_only(tmp_path, chunk_server, mount_image) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(300_000))
    store = tmp_path / "store"
    result = build(src, store, chunk_size=64 * 1024)
    origin = chunk_server(store)
    with mount_image(result.index_path, [origin.url]) as m:
        assert (m.mountpoint / "f").read_bytes() == (src / "f").read_bytes()
    assert m.stats["remote_bytes"] == 300_000


def test_the_server_answers_only_requests_with_its_token(tmp_path: Path, chunk_server) -> None:  # type: ignore[no-untyped-def]
    """A store of snapshots holds engines' memory and environment (HF_TOKEN=...); it was served to anyone."""
    from coldstart.imagefs.errors import TierError
    from coldstart.imagefs.refs import publish
    from coldstart.imagefs.tiers import HttpTier

    src = tmp_path / "src"
    src.mkdir()
    (src / "pages.img").write_bytes(b"HF_TOKEN=hf_secret")
    publish(src, tmp_path / "store", "snapshot.k1")
    server = chunk_server(tmp_path / "store")
    open_url = server.public_url
    assert httpx.get(f"{open_url}/healthz").status_code == 200
    for path in ("/refs", "/refs/snapshot.k1", f"/chunks/{'0' * 64}"):
        assert httpx.get(f"{open_url}{path}").status_code == 401
        assert httpx.get(f"{open_url}{path}", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(
            f"{open_url}{path}", headers={"Authorization": f"Bearer {server.token}"}
        ).status_code in (
            200,
            404,
        )
    with pytest.raises(TierError, match="needs its token"):
        HttpTier(open_url).get_ref("snapshot.k1")
    tier = HttpTier(server.url)  # http://:TOKEN@host:port
    assert tier.get_ref("snapshot.k1") and tier.name == open_url  # the token is in no name or log


def test_serve_requires_a_token_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from coldstart.imagefs import cli

    assert cli.main(["serve", "--store", str(tmp_path)]) == 2
    assert "--token-file" in capsys.readouterr().err
    assert cli.main(["serve", "--help"]) == 0
    assert "Requires a token" in " ".join(capsys.readouterr().out.split())
