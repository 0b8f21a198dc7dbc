"""``launcher/image.py`` with a real imagefs mount and no engine: the mount is the ``image_mount`` phase of
the end-to-end clock, and what the boot fetched is ``coldstart_image_fetched_bytes`` once the boot is
over."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from coldstart.imagefs.build import build
from coldstart.launcher.config import ServeConfig
from coldstart.launcher.image import boot_over, image_mounted
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
