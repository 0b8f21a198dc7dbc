"""``--snapshot runsc --image INDEX``: the gVisor container's root filesystem is the lazily mounted image.

The image (``bench/lazy_root.py: make_rootfs``, cached in .cache/imagefs/runsc-root-KEY) is a minimal root
filesystem: this host's CPython, ``coldstart.snapshot_hooks``, a stdlib engine at ``/srv/engine.py`` and its
"weights" at ``/models/tiny``; none of them exist on the host's ``/``. Real runsc, real FUSE, real engine.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from openai import OpenAI
from support import Served, bench_module

from coldstart.engine_adapters.base import LaunchSpec
from coldstart.launcher.checkpointers.runsc import SIDECAR, RunscCheckpointer, in_root, oci_spec
from coldstart.launcher.errors import RestoreFailed, RestoreReason, UsageError


def lazy_root() -> ModuleType:
    return bench_module("lazy_root")


def test_paths_under_the_image_mount_are_rewritten_to_the_container_root() -> None:
    root = Path("/run/c/img")
    spec = LaunchSpec(
        argv=["python3", "/run/c/img/srv/engine.py", "--model=/run/c/img/models/tiny", "/run/c/imgx"],
        env={"COLDSTART_MODEL": "/run/c/img/models/tiny", "COLDSTART_PORT": "8000"},
    )
    config = oci_spec(spec, "/run/netns/x", root)
    assert config["root"]["path"] == "/run/c/img"
    assert config["process"]["args"] == ["python3", "/srv/engine.py", "--model=/models/tiny", "/run/c/imgx"]
    env = dict(e.split("=", 1) for e in config["process"]["env"])
    assert env["COLDSTART_MODEL"] == "/models/tiny" and env["HOME"] == "/root"
    assert "VIRTUAL_ENV" not in env and env["PATH"].startswith("/usr/local/sbin")  # no host variables
    assert config["process"]["cwd"] == "/"
    assert in_root("/run/c/img", root) == "/"
    host = oci_spec(spec, "/run/netns/x")  # no image root: the host's / as before
    assert host["root"]["path"] == "/" and host["process"]["args"] == spec.argv


def test_the_launchers_own_folders_are_mounted_read_only_on_the_images_mount_points(tmp_path: Path) -> None:
    spec = LaunchSpec(
        argv=[f"{tmp_path}/venv/bin/python", "/srv/cs/engine_adapters/vllm_entry.py", "serve"],
        env={"PYTHONPATH": "/srv/cs/engine_adapters/vllm_ext:/elsewhere"},
        launcher_dirs=("/srv/cs/engine_adapters", "/srv/cs/snapshot_hooks"),
    )
    with pytest.raises(
        UsageError,
        match=r"without the empty folder\(s\) /coldstart/engine_adapters, /coldstart/snapshot_hooks",
    ):
        oci_spec(spec, "/run/netns/x", tmp_path)
    for name in ("engine_adapters", "snapshot_hooks"):
        (tmp_path / "coldstart" / name).mkdir(parents=True)
    config = oci_spec(spec, "/run/netns/x", tmp_path)
    binds = [m for m in config["mounts"] if m["type"] == "bind"]
    assert binds == [
        {
            "destination": f"/coldstart/{name}",
            "type": "bind",
            "source": f"/srv/cs/{name}",
            "options": ["rbind", "ro"],
        }
        for name in ("engine_adapters", "snapshot_hooks")
    ]
    assert config["process"]["args"][:2] == ["/venv/bin/python", "/coldstart/engine_adapters/vllm_entry.py"]
    env = dict(e.split("=", 1) for e in config["process"]["env"])
    assert env["PYTHONPATH"] == "/coldstart/engine_adapters/vllm_ext:/elsewhere"
    host = oci_spec(spec, "/run/netns/x")  # the host's root has them where they are
    assert not [m for m in host["mounts"] if m["type"] == "bind"] and host["process"]["args"] == spec.argv


def _runsc_or_skip() -> RunscCheckpointer:
    from coldstart.launcher.errors import CheckpointerUnavailable

    checkpointer = RunscCheckpointer(root=Path("/nonexistent-root"))
    try:
        checkpointer.probe()
    except CheckpointerUnavailable as exc:
        pytest.skip(f"runsc unavailable here: {exc}")
    return checkpointer


def test_root_kind_is_gated_at_restore(tmp_path: Path) -> None:
    checkpointer = _runsc_or_skip()
    image = tmp_path / "image"
    image.mkdir()
    sidecar = {"config": {}, "global_flags": checkpointer.global_flags(), "root": "host"}
    (image / SIDECAR).write_text(json.dumps(sidecar))
    with pytest.raises(RestoreFailed) as failed:
        asyncio.run(checkpointer.restore(image, tmp_path / "work", "r1"))
    assert failed.value.reason == RestoreReason.GATE
    assert "taken on the host root" in str(failed.value) and "image root" in str(failed.value)


# -- end to end: coldstart-serve, runsc, FUSE ----------------------------------------------------------------


def serve_args(index: Path, tiers: Path, mnt: Path, tmp: Path, name: str, initial: int) -> list[str]:
    return [
        "custom",
        "{image}/models/tiny",
        "--image", str(index),
        "--image-tiers", str(tiers),
        "--image-mount", str(mnt),  # the same place for both launchers: the engine file's path is identity
        "--image-cache", str(tmp / f"{name}-chunks"),  # each launcher starts with an empty chunk cache
        "--snapshot", "runsc",
        "--snapshot-dir", str(tmp / "snapshots"),
        "--work-dir", str(tmp / f"{name}-work"),
        "--initial-replicas", str(initial),
        "--served-model-name", "tiny",
        "--",
        "python3", "{image}/srv/engine.py", "--model", "{model}", "--host", "{host}", "--port", "{port}",
    ]  # fmt: skip


def ask(served: Served) -> str:
    served.wait_for(lambda health: True, 60, "the proxy to listen")
    with OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=180) as client:
        answer = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0
        )
    return answer.choices[0].message.content or ""


@pytest.mark.slow
def test_runsc_replica_on_a_lazy_image_root_boots_snapshots_restores_and_answers(tmp_path: Path) -> None:
    _runsc_or_skip()
    if not Path("/dev/fuse").exists():
        pytest.skip("no /dev/fuse on this host")
    _src, cached = lazy_root().root_image()
    # A private copy of the index: the launcher writes its boot profile next to it (not into .cache).
    index = tmp_path / "rootfs.cidx"
    shutil.copyfile(cached, index)
    store = cached.parent.parent
    mnt = tmp_path / "rootfs"
    assert not Path("/srv/engine.py").exists() and not Path("/models/tiny").exists()  # only in the image

    first = Served(serve_args(index, store, mnt, tmp_path, "a", initial=1), tmp_path / "a.log")
    try:
        first.wait_ready(240)
        first.wait_for(lambda h: re.search(r"snapshot \w+ taken", first.log()), 240, "the snapshot")
        log = first.log()
        assert "holds a root filesystem: the container root with --snapshot runsc" in log, log
        (config,) = (tmp_path / "a-work").glob("launcher-*/r1/bundle/config.json")  # one launcher's folder
        bundle = json.loads(config.read_text())
        assert bundle["root"]["path"] == str(mnt)
        assert bundle["process"]["args"][:2] == ["python3", "/srv/engine.py"]
        booted = ask(first)
        assert re.fullmatch(r"(t\d+ ){5}t\d+", booted), booted
    finally:
        assert first.stop() == 0
    assert str(mnt) not in Path("/proc/mounts").read_text()

    second = Served(serve_args(index, store, mnt, tmp_path, "b", initial=0), tmp_path / "b.log")
    try:
        restored = ask(second)
        lifecycle = second.lifecycle()
        assert ("r1", "new", "restoring") in lifecycle, second.log()
        assert ("r1", "restoring", "ready") in lifecycle, second.log()
        assert not any(to == "booting" for _, _, to in lifecycle), "booted instead of restoring"
        assert restored == booted  # same weights (read from the image) and the same greedy answer
        sidecars = list((tmp_path / "snapshots").rglob(SIDECAR))
        assert [json.loads(p.read_text())["root"] for p in sidecars] == ["image"]
        assert Path(f"{index}.profile").exists()  # the first boot's read order: b prefetched it
        assert any((tmp_path / "b-chunks").rglob("*")), "nothing fetched through the image"
    finally:
        assert second.stop() == 0


@pytest.mark.slow
def test_a_checkpoint_restores_on_another_mount_point_of_the_same_image(tmp_path: Path) -> None:
    """What a second host does: its own mount point and an empty chunk cache; the container root follows."""
    from coldstart.imagefs.mount import mounted

    _runsc_or_skip()
    if not Path("/dev/fuse").exists():
        pytest.skip("no /dev/fuse on this host")
    bench = lazy_root()
    _src, index = bench.root_image()
    tiers = [str(index.parent.parent)]

    async def state(sandbox: Any) -> dict[str, Any]:
        import httpx

        await bench.wait_healthy(sandbox)
        async with httpx.AsyncClient(timeout=10) as client:
            got = (await client.get(f"{sandbox.base_url}/state")).json()
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            reply = await client.post(f"{sandbox.base_url}/v1/chat/completions", json=body)
        return {**got, "answer": reply.json()["choices"][0]["message"]["content"]}

    async def scenario() -> None:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        image = tmp_path / "ckpt"
        image.mkdir()
        with mounted(index, tmp_path / "a", tmp_path / "cache-a", tiers, record_profile=False):
            checkpointer = RunscCheckpointer(root=tmp_path / "a")
            sandbox = checkpointer.new_sandbox(tmp_path / "run", "r1")
            try:
                await sandbox.start(bench.engine_spec(str(tmp_path / "a")))
                before = await state(sandbox)
                await checkpointer.checkpoint(sandbox, image, leave_running=False)
            finally:
                await sandbox.stop(2.0)
        with mounted(index, tmp_path / "b", tmp_path / "cache-b", tiers, record_profile=False) as mount:
            restored = await RunscCheckpointer(root=tmp_path / "b").restore(image, tmp_path / "restore", "r2")
            try:
                after = await state(restored)
            finally:
                await restored.stop(2.0)
            bundle = json.loads((tmp_path / "restore" / "bundle" / "config.json").read_text())
            assert bundle["root"]["path"] == str(tmp_path / "b")
        assert after["weights"] == before["weights"] and after["answer"] == before["answer"]
        assert after["restores"] == 0  # hooks run only when the launcher calls them; the process is the same
        assert "srv" in after["root"] and "work" not in after["root"]  # the image's /, not the host's
        assert 0 < int(mount.stats["remote_bytes"]) < int(mount.stats["image_bytes"]) / 2  # lazily, a part

    asyncio.run(scenario())
