"""``launcher/image.py`` with a real imagefs mount and no engine: the mount is the ``image_mount`` phase of
the end-to-end clock, what the boot fetched is ``coldstart_image_fetched_bytes`` once the boot is over, and
an engine environment that may be inside the image is looked for once it is mounted."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from coldstart.imagefs.build import build
from coldstart.launcher.config import ServeConfig
from coldstart.launcher.image import boot_over, engine_in_image, image_mounted, with_mountpoint
from coldstart.launcher.metrics import Metrics

pytestmark = pytest.mark.skipif(
    not Path("/dev/fuse").exists() or shutil.which("fusermount3") is None or os.geteuid() != 0,
    reason="FUSE mounts need /dev/fuse, fusermount3 and root",
)


def sample(metrics: Metrics, name: str) -> float:
    text = generate_latest(metrics.registry).decode()
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def test_the_mount_is_timed_and_the_boot_fetch_counted(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "weights.bin").write_bytes(os.urandom(3 << 20))
    (src / "unread.bin").write_bytes(os.urandom(1 << 20))
    index = build(src, tmp_path / "store").index_path
    config = ServeConfig(
        model="{image}",
        image=index,
        image_mount=tmp_path / "mnt",
        image_cache=tmp_path / "empty-cache",
        work_dir=tmp_path / "run",
        served_model_name="m",
    )
    metrics = Metrics()

    async def boot() -> None:
        async with image_mounted(config, metrics.for_model("m")) as mount:
            assert (mount.mountpoint / "weights.bin").read_bytes() == (src / "weights.bin").read_bytes()
            await boot_over(mount, metrics.for_model("m"))

    asyncio.run(boot())
    assert sample(metrics, 'coldstart_phase_seconds_count{model="m",phase="image_mount"}') == 1
    assert sample(metrics, 'coldstart_phase_seconds_sum{model="m",phase="image_mount"}') > 0
    # the boot read one file of two: its bytes came from the store, the other's never did
    assert sample(metrics, 'coldstart_image_fetched_bytes{model="m"}') == 3 << 20
    assert Path(f"{index}.profile").exists()  # and its read order is the image's profile
    # The next launch, on a host with an empty cache: the image as a hot tree, what the boot read fetched
    # (and counted) before the engine starts, the rest still lazy.
    again = dataclasses.replace(config, image_cache=tmp_path / "empty-cache-2")
    metrics = Metrics()

    async def relaunch() -> None:
        async with image_mounted(again, metrics.for_model("m")) as mount:
            assert mount.hot_tree is not None and mount.hot_tree.fetched == 3 << 20
            assert not (mount.mountpoint / "weights.bin").is_symlink()
            assert (mount.mountpoint / "unread.bin").is_symlink()
            assert (mount.mountpoint / "unread.bin").read_bytes() == (src / "unread.bin").read_bytes()
            await boot_over(mount, metrics.for_model("m"))

    asyncio.run(relaunch())
    assert sample(metrics, 'coldstart_image_fetched_bytes{model="m"}') == (3 << 20) + (1 << 20)


def test_no_hot_tree_where_the_image_may_be_gvisors_root(tmp_path: Path) -> None:
    """The hot tree's links name host paths: not for ``--snapshot runsc``, nor a root filesystem image."""
    from coldstart.launcher.image import hot_tree_fits

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "root" / "usr" / "bin").mkdir(parents=True)
    model = build(tmp_path / "model", tmp_path / "store").index_path
    rootfs = build(tmp_path / "root", tmp_path / "store").index_path
    config = ServeConfig(model="{image}", image=model, snapshot="criu")
    assert hot_tree_fits(config)
    assert not hot_tree_fits(dataclasses.replace(config, snapshot="runsc"))
    from coldstart.launcher.checkpointers.registry import best_available
    from coldstart.launcher.errors import CheckpointerUnavailable

    try:
        auto = best_available().name  # criu where it works (this machine), runsc where only gVisor does
    except CheckpointerUnavailable:
        auto = "off"
    assert hot_tree_fits(dataclasses.replace(config, snapshot="auto")) == (auto != "runsc")
    assert not hot_tree_fits(dataclasses.replace(config, image=rootfs))
    assert not hot_tree_fits(dataclasses.replace(config, image=None))


def test_an_engine_environment_inside_the_image_is_looked_for_after_the_mount(tmp_path: Path) -> None:
    vllm = ServeConfig(engine="vllm", model="m", image=tmp_path / "env.cidx")
    assert engine_in_image(vllm)  # no --engine-python: the set-up's path may be in the image
    assert engine_in_image(dataclasses.replace(vllm, engine_python="{image}/bin/python"))
    inside = dataclasses.replace(vllm, image_mount=tmp_path / "mnt")
    assert engine_in_image(dataclasses.replace(inside, engine_python=f"{tmp_path}/mnt/bin/python"))
    assert not engine_in_image(dataclasses.replace(inside, engine_python="/opt/venv"))
    assert not engine_in_image(dataclasses.replace(vllm, image=None, engine_python="/opt/venv"))
    where = tmp_path / "m"
    placeholders = dataclasses.replace(vllm, model="{image}/model", engine_python="{image}")
    mounted_at = with_mountpoint(placeholders, where)
    assert (mounted_at.engine_python, mounted_at.model) == (str(where), f"{where}/model")


def test_an_image_without_the_engine_is_one_line_after_the_mount(tmp_path: Path) -> None:
    from support import SERVE

    src = tmp_path / "src"
    (src / "model").mkdir(parents=True)
    (src / "model" / "config.json").write_text("{}")
    index = build(src, tmp_path / "store").index_path
    mountpoint = tmp_path / "mnt"
    done = subprocess.run(
        [
            *SERVE, "vllm", "{image}/model", "--image", str(index), "--engine-python", "{image}",
            "--image-mount", str(mountpoint), "--image-cache", str(tmp_path / "chunks"),
            "--work-dir", str(tmp_path / "run"), "--snapshot", "off", "--port", "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("coldstart-serve:")]
    assert len(errors) == 1 and f"--engine-python {mountpoint}" in errors[0], done.stderr
    assert "coldstart image build VENV" in errors[0]  # the fix, for an image
    assert "Traceback" not in done.stderr
    assert str(mountpoint) not in Path("/proc/mounts").read_text()  # unmounted on the way out
