"""A Python venv with torch built as an image: ``import torch`` from the mount with an empty local cache and
only the origin tier, then a second boot that prefetches from the first boot's profile."""

from __future__ import annotations

import subprocess

import pytest

from coldstart.imagefs.profile import read_profile

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fuse")]

IMPORT = "import torch; print('torch', torch.__version__, torch.ones(3).sum().item())"


def _import_torch(mnt) -> str:
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    proc = subprocess.run(
        [str(mnt / "bin" / "python"), "-I", "-W", "ignore", "-c", IMPORT],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_import_torch_from_the_mount(tmp_path, torch_image_fixture, mount_image) -> None:
    _, image = torch_image_fixture
    origin = str(image.index_path.parent.parent)
    profile = tmp_path / "torch.profile"
    with mount_image(image.index_path, [origin], cache=tmp_path / "cold1", profile_path=profile) as m:
        out = _import_torch(m.mountpoint)
        assert out.startswith("torch 2.13.0") and out.strip().endswith("3.0")
        assert (
            str(m.mountpoint)
            in subprocess.run(
                [str(m.mountpoint / "bin" / "python"), "-I", "-c", "import sys; print(sys.prefix)"],
                capture_output=True,
                text=True,
            ).stdout
        )
        m.save_profile()
    first = m.stats
    assert first["tiers"][f"dir:{origin}"]["hits"] > 0  # everything came from the origin
    assert 0 < first["remote_bytes"] < first["image_bytes"]  # lazily: only part of the image
    recorded = read_profile(profile, image.digest)
    assert recorded

    with mount_image(image.index_path, [origin], cache=tmp_path / "cold2", profile_path=profile) as m:
        out = _import_torch(m.mountpoint)
        assert out.startswith("torch 2.13.0")
    second = m.stats
    assert second["profile_chunks"] == len(recorded)
    assert second["prefetched"] > 0  # fetched ahead of the boot's reads
