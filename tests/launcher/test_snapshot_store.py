"""Snapshot store, identity and compatibility gate: real files, no engine."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from coldstart.launcher.checkpointers.base import CheckpointerInfo
from coldstart.launcher.errors import SnapshotError
from coldstart.launcher.snapshots.fingerprint import HostFingerprint, host_fingerprint, incompatibilities
from coldstart.launcher.snapshots.identity import SnapshotIdentity
from coldstart.launcher.snapshots.store import SnapshotCorrupt, SnapshotStore

HOST = HostFingerprint(arch="x86_64", kernel="6.18.44", cpu_model="Xeon", cpu_flags=("avx2", "sse4_2"))


def identity(**changes: object) -> SnapshotIdentity:
    base = SnapshotIdentity(
        engine={"engine": "transformers", "engine_version": "5.23", "model": "/m", "engine_args": []},
        warmup=[["/v1/chat/completions", {"max_tokens": 4}]],
        canary={"path": "/v1/chat/completions", "body": {"temperature": 0}},
        checkpointer="criu",
        checkpointer_version="4.2.1",
        hooks_version="1.1",
        image_digest=None,
        fingerprint=HOST,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def write_snapshot(store: SnapshotStore, ident: SnapshotIdentity, pages: bytes = b"x" * 4096) -> None:
    with store.begin(ident.key) as pending:
        (pending.image_dir / "pages-1.img").write_bytes(pages)
        (pending.image_dir / "core-1.img").write_bytes(b"core")
        store.commit(pending, {"identity": ident.to_json(), "canary": {"text": "hi"}})


def test_commit_is_atomic_and_lists_sizes_and_digests(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    ident = identity()
    with store.begin(ident.key) as pending:
        (pending.image_dir / "pages-1.img").write_bytes(b"abc")
        assert not store.has(ident.key), "visible before commit"
        assert pending.path.name.startswith(".tmp-")
        snap = store.commit(pending, {"identity": ident.to_json()})
    assert store.has(ident.key)
    assert snap.manifest["files"]["image/pages-1.img"]["size"] == 3
    assert snap.total_bytes == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []
    store.verify(store.lookup(ident.key))  # type: ignore[arg-type]


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    with pytest.raises(RuntimeError), store.begin("k1") as pending:
        (pending.image_dir / "pages-1.img").write_bytes(b"abc")
        raise RuntimeError("checkpoint failed")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:100]), "has 100 bytes"),
        (lambda p: p.write_bytes(b"y" + p.read_bytes()[1:]), "sha256"),
        (lambda p: p.unlink(), "missing"),
    ],
    ids=["truncated", "flipped-byte", "missing"],
)
def test_verify_names_the_damaged_file(tmp_path: Path, damage, expected: str) -> None:  # type: ignore[no-untyped-def]
    store = SnapshotStore(tmp_path)
    ident = identity()
    write_snapshot(store, ident)
    snap = store.lookup(ident.key)
    assert snap is not None
    store.verify(snap)  # cached digests from the commit
    damage(snap.path / "image" / "pages-1.img")
    with pytest.raises(SnapshotCorrupt, match=expected) as info:
        store.verify(snap)
    assert "image/pages-1.img" in str(info.value)


def test_flipped_byte_with_same_stat_caught_by_full_verify(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    ident = identity()
    write_snapshot(store, ident)
    snap = store.lookup(ident.key)
    assert snap is not None
    pages = snap.path / "image" / "pages-1.img"
    st = pages.stat()
    with open(pages, "r+b") as f:
        f.write(b"y")
    os.utime(pages, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back; ctime cannot be
    with pytest.raises(SnapshotCorrupt):
        store.verify(snap)
    with pytest.raises(SnapshotCorrupt):
        store.verify(snap, full=True)


def test_unreadable_manifest_is_corrupt(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    ident = identity()
    write_snapshot(store, ident)
    (tmp_path / ident.key / "manifest.json").write_text("{not json")
    with pytest.raises(SnapshotCorrupt, match="manifest"):
        store.lookup(ident.key)


def test_replacing_a_snapshot_swaps_whole_folders(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    ident = identity()
    write_snapshot(store, ident, b"old")
    write_snapshot(store, ident, b"newer")
    snap = store.lookup(ident.key)
    assert snap is not None and snap.manifest["files"]["image/pages-1.img"]["size"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ident.key, ".state"])


def test_find_rm_gc(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    a, b = identity(), identity(hooks_version="2.0")
    write_snapshot(store, a)
    write_snapshot(store, b)
    assert {s.key for s in store.ls()} == {a.key, b.key}
    assert store.find(a.key[:10]).key == a.key
    with pytest.raises(SnapshotError, match="no snapshot"):
        store.find("zzzz")
    # leftovers: an unfinished write of a dead process, trash, a quarantined snapshot
    (tmp_path / ".tmp-k-999999999-abc").mkdir()
    (tmp_path / f".tmp-k-{os.getpid()}-abc").mkdir()  # ours, still being written: kept
    store.quarantine(store.find(b.key))
    removed = store.gc()
    assert ".tmp-k-999999999-abc" in removed and any(n.startswith(".bad-") for n in removed)
    assert (tmp_path / f".tmp-k-{os.getpid()}-abc").exists()
    assert store.gc(older_than_s=3600) == []
    assert store.gc(older_than_s=3600, now=time.time() + 7200) == [a.key]
    assert store.ls() == []


def write_with_weights(store: SnapshotStore, ident: SnapshotIdentity, weights: dict[str, bytes]) -> None:
    """As the snapshot manager does with file-backed weights: the engine writes content-addressed files
    under ``<store>/weights``, each hard-linked into the snapshot (``weights_in_use`` held until then)."""
    held = contextlib.ExitStack()
    with held:
        held.enter_context(store.weights_in_use())
        store.weights_dir.mkdir(parents=True, exist_ok=True)
        for name, data in weights.items():
            if not (store.weights_dir / name).exists():
                (store.weights_dir / name).write_bytes(data)
        with store.begin(ident.key) as pending:
            (pending.image_dir / "weights").mkdir()
            for name in weights:
                os.link(store.weights_dir / name, pending.image_dir / "weights" / name)
            held.close()
            (pending.image_dir / "pages-1.img").write_bytes(b"p")
            files = {name: len(data) for name, data in weights.items()}
            store.commit(pending, {"identity": ident.to_json(), "weights": {"files": files}})


def weight_files(store: SnapshotStore) -> set[str]:
    return {p.name for p in store.weights_dir.iterdir()}


def test_weight_files_go_with_the_last_snapshot_that_uses_them(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    a, b = identity(), identity(hooks_version="2.0")
    write_with_weights(store, a, {"shared": b"s" * 10, "only-a": b"a"})
    write_with_weights(store, b, {"shared": b"s" * 10, "only-b": b"b"})
    (store.weights_dir / "orphan").write_bytes(b"o")  # written by a dump that failed before linking
    store.rm(a.key)
    assert weight_files(store) == {"shared", "only-b"}  # only-a and the orphan went with it
    write_with_weights(store, b, {"shared": b"s" * 10, "new-b": b"n"})  # b replaced
    assert weight_files(store) == {"shared", "new-b"}
    store.quarantine(store.find(b.key))  # a quarantined snapshot keeps its files until gc removes it
    assert store.gc_weights() == [] and weight_files(store) == {"shared", "new-b"}
    assert sorted(n for n in store.gc() if n.startswith("weights/")) == ["weights/new-b", "weights/shared"]
    assert weight_files(store) == set()


def test_weight_files_named_in_use_or_mapped_are_kept(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    a = identity()
    write_with_weights(store, a, {"linked": b"l"})
    snap = store.find(a.key)
    (snap.image_dir / "weights" / "linked").unlink()  # a snapshot that names its file without a link
    (store.weights_dir / "being-written").write_bytes(b"w")
    with store.weights_in_use():  # a dump between writing its weight files and linking them
        assert store.gc_weights() == []
    assert weight_files(store) == {"linked", "being-written"}
    (store.weights_dir / "mapped").write_bytes(b"m" * 4096)
    mapper = subprocess.Popen(  # a replica restored from a snapshot since removed: it maps the file
        [sys.executable, "-c", MAPPER, str(store.weights_dir / "mapped")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert mapper.stdout is not None and mapper.stdout.readline() == "mapped\n"
        assert store.gc_weights() == ["weights/being-written"]
        assert weight_files(store) == {"linked", "mapped"}
    finally:
        mapper.communicate("")  # stdin closed: it exits
    assert store.gc_weights() == ["weights/mapped"]
    store.rm(a.key)
    assert weight_files(store) == set()


MAPPER = """
import mmap, sys
with open(sys.argv[1], "rb") as f:
    m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
print("mapped", flush=True)
sys.stdin.read()
"""


def test_key_changes_with_what_shapes_the_process_not_with_the_host() -> None:
    base = identity()
    assert identity().key == base.key
    assert identity(engine={**base.engine, "engine_args": ["--dtype", "bfloat16"]}).key != base.key
    assert identity(hooks_version="9").key != base.key
    assert identity(image_digest="abc").key != base.key
    # gate fields: found under the same key, then refused with the reason
    assert identity(checkpointer_version="4.3").key == base.key
    assert identity(fingerprint=dataclasses.replace(HOST, kernel="6.1")).key == base.key
    assert SnapshotIdentity.from_json(json.loads(json.dumps(base.to_json()))) == base


def test_gate_names_the_differing_field() -> None:
    here = identity()
    avx512 = dataclasses.replace(HOST, cpu_flags=("avx2", "avx512f", "sse4_2"))
    assert here.gate(identity()) == []
    assert here.gate(identity(fingerprint=avx512)) == ["cpu flag avx512f missing on this host"]
    assert here.gate(identity(checkpointer_version="4.1.1")) == ["criu 4.1.1 != 4.2.1 on this host"]
    other_kernel = dataclasses.replace(HOST, kernel="6.1.0-18-amd64")
    assert here.gate(identity(fingerprint=other_kernel)) == ["kernel 6.1.0-18-amd64 != 6.18.44 on this host"]
    gpu = dataclasses.replace(HOST, gpu={"gpu_driver_version": "570.1"})
    assert incompatibilities(gpu, HOST) == ["gpu driver version 570.1 != none on this host"]
    fewer = dataclasses.replace(HOST, cpu_flags=("sse4_2",))
    assert incompatibilities(fewer, HOST) == [], "a host with more CPU features may restore"


def test_this_host_fingerprint_is_real() -> None:
    fp = host_fingerprint()
    assert fp.kernel == os.uname().release
    assert fp.cpu_flags, "no CPU flags read from /proc/cpuinfo"
    assert incompatibilities(fp, fp) == []


def test_checkpointer_info_is_part_of_identity() -> None:
    from coldstart.engine_adapters.registry import get_adapter
    from coldstart.launcher.snapshots.identity import snapshot_identity

    adapter = get_adapter("transformers")
    from coldstart.engine_adapters.base import EngineConfig

    config = EngineConfig(model="org/model")
    criu = snapshot_identity(adapter, config, CheckpointerInfo("criu", "4.2.1"), {"c": 1})
    runsc = snapshot_identity(adapter, config, CheckpointerInfo("runsc", "20240729.0"), {"c": 1})
    assert criu.key != runsc.key


def test_cli_snapshot_ls_inspect_rm_gc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from coldstart.launcher.cli import snapshot as cli_snapshot

    store = SnapshotStore(tmp_path)
    ident = identity()
    write_snapshot(store, ident)
    base = ["--snapshot-dir", str(tmp_path)]
    assert cli_snapshot.main([*base, "ls"]) == 0
    out = capsys.readouterr().out
    assert ident.key[:12] in out and "criu 4.2.1" in out
    # a fingerprint from "another host": inspect says why it does not fit (exit 1), and --verify re-hashes
    assert cli_snapshot.main([*base, "inspect", ident.key[:8], "--verify"]) == 1
    out = capsys.readouterr().out
    assert "fits this host: no:" in out and "verified: 2 files" in out
    assert cli_snapshot.main([*base, "rm", "nope"]) == 1
    assert "no snapshot 'nope'" in capsys.readouterr().err
    assert cli_snapshot.main([*base, "rm", ident.key[:6]]) == 0
    assert cli_snapshot.main([*base, "gc"]) == 0
    assert "nothing to remove" in capsys.readouterr().out
    assert store.ls() == []


def test_cli_doctor_lists_checkpointers(capsys: pytest.CaptureFixture[str]) -> None:
    from coldstart.launcher.cli import doctor as cli_doctor

    code = cli_doctor.main([])
    out = capsys.readouterr().out
    for row in ("root", "network namespaces", "fuse", "criu", "runsc", "--snapshot auto", "nvidia driver"):
        assert row in out
    import re

    assert code == (0 if re.search(r"^(criu|runsc)\s+ok\s", out, flags=re.MULTILINE) else 1), out


def test_canary_request_chat_or_completion() -> None:
    from coldstart.engine_adapters.base import EngineConfig
    from coldstart.engine_adapters.registry import get_adapter
    from coldstart.launcher.config import Canary
    from coldstart.launcher.snapshots.canary import canary_request

    adapter, config = get_adapter("transformers"), EngineConfig(model="org/model")
    chat = canary_request(adapter, config, Canary("The capital of France is", 8))
    assert chat.path == "/v1/chat/completions" and chat.body["temperature"] == 0
    assert chat.body["messages"] == [{"role": "user", "content": "The capital of France is"}]
    completion = canary_request(adapter, config, Canary("The capital of France is", 8, chat=False))
    assert completion.to_json() == {
        "path": "/v1/completions",
        "body": {
            "model": "org/model",
            "max_tokens": 8,
            "temperature": 0,
            "prompt": "The capital of France is",
        },
    }


def _chat(text: str, ids: list[int] | None = None, logprobs: list[float] | None = None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
    if ids is not None:
        choice["token_ids"] = ids
    if logprobs is not None:
        choice["logprobs"] = {"content": [{"token": "x", "logprob": lp} for lp in logprobs]}
    return {"choices": [choice], "usage": {"completion_tokens": len(ids or [1])}}


def test_canary_compares_token_ids_not_only_text() -> None:
    """Ids that decode to "" used to pass as two equal empty strings."""
    from coldstart.launcher.snapshots.canary import CanaryAnswer

    recorded = CanaryAnswer.from_response(_chat("", [151000, 150999]))
    recorded.require_meaningful()  # ids alone are evidence
    assert CanaryAnswer.from_response(_chat("", [151000, 150999])).mismatch(recorded) == ""
    assert "token ids" in CanaryAnswer.from_response(_chat("", [151000, 7])).mismatch(recorded)
    # logprobs compared within a tolerance where the engine gives them
    with_lp = CanaryAnswer.from_response(_chat("hi", [5], [-0.25]))
    assert CanaryAnswer.from_response(_chat("hi", [5], [-0.2500001])).mismatch(with_lp) == ""
    assert "logprobs" in CanaryAnswer.from_response(_chat("hi", [5], [-1.5])).mismatch(with_lp)
    # a manifest round trip keeps everything
    assert CanaryAnswer.from_json(with_lp.to_json()) == with_lp


def test_vacuous_canary_is_refused() -> None:
    from coldstart.launcher.snapshots.canary import CanaryAnswer, VacuousCanary

    with pytest.raises(VacuousCanary, match="no text, no token ids and no logprobs"):
        CanaryAnswer.from_response(_chat("")).require_meaningful()


def test_store_folders_are_0700_and_snapshot_files_0600(tmp_path: Path) -> None:
    """Page images hold the engine's memory and environment (HF_TOKEN=...): CRIU wrote them 0644 into
    0755 folders, readable by any local user."""
    root = tmp_path / "snapshots"
    root.mkdir(mode=0o755)  # an existing folder is made private too
    store = SnapshotStore(root)
    ident = identity()
    with store.begin(ident.key) as pending:
        page = pending.image_dir / "pages-1.img"
        page.write_bytes(b"HF_TOKEN=hf_secret")
        os.chmod(page, 0o644)
        snap = store.commit(pending, {"identity": ident.to_json()})
    store.touch_used(snap)
    assert root.stat().st_mode & 0o777 == 0o700
    assert snap.path.stat().st_mode & 0o777 == 0o700 and store.state_dir.stat().st_mode & 0o777 == 0o700
    for file in snap.path.rglob("*"):
        if file.is_file():
            assert file.stat().st_mode & 0o777 == 0o600, file
    store.verify(snap, full=True)  # still whole after the chmod
