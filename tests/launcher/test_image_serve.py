"""``coldstart-serve --image``: the engine's model comes from a lazily mounted imagefs image."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import openai
import pytest
from support import ready_lines

from coldstart.imagefs.build import build

pytestmark = pytest.mark.slow


def mounts() -> str:
    return Path("/proc/mounts").read_text()


def test_serve_a_model_from_an_image(serve, tiny_model: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if not Path("/dev/fuse").exists():
        pytest.skip("no /dev/fuse on this host")
    result = build(tiny_model, tmp_path / "store")
    mountpoint = tmp_path / "mnt"
    served = serve(
        [
            "transformers",
            "{image}",
            "--image",
            str(result.index_path),
            "--image-mount",
            str(mountpoint),
            "--image-cache",
            str(tmp_path / "chunks"),
            "--served-model-name",
            "tiny",
            "--work-dir",
            str(tmp_path / "run"),
        ]
    )
    served.wait_ready()
    assert str(mountpoint) in mounts()
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert reply.choices[0].message.content is not None
    assert "image " in served.log() and "mounted at" in served.log()
    assert served.stop() == 0
    assert str(mountpoint) not in mounts()  # unmounted cleanly on SIGTERM
    assert Path(str(result.index_path) + ".profile").exists()  # what the boot read, for the next prefetch


def test_missing_image_index_is_a_usage_error(tmp_path: Path) -> None:
    from support import SERVE

    done = subprocess.run(
        [*SERVE, "transformers", "{image}", "--image", str(tmp_path / "nope.cidx")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "no such index" in done.stderr and "coldstart image build" in done.stderr


def test_a_relaunch_shows_the_image_as_a_hot_tree_and_restores_from_it(
    serve, tiny_model: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The first launch records the boot profile; the next shows the image as local copies of what the boot
    read (links into the lazy mount for the rest), boots from them, snapshots with CRIU (both mounts kept
    external) and restores a replica that answers the same."""
    if not Path("/dev/fuse").exists():
        pytest.skip("no /dev/fuse on this host")
    from coldstart.imagefs.mount import lazy_root_for

    result = build(tiny_model, tmp_path / "store")
    mountpoint = tmp_path / "mnt"
    args = [
        "transformers", "{image}", "--image", str(result.index_path), "--image-mount", str(mountpoint),
        "--image-cache", str(tmp_path / "chunks"), "--served-model-name", "tiny",
        "--work-dir", str(tmp_path / "run"),
        "--snapshot", "criu", "--snapshot-dir", str(tmp_path / "snapshots"), "--idle-timeout", "2",
        "--max-replicas", "1",
    ]  # fmt: skip
    first = serve(args)
    first.wait_ready()
    assert first.stop() == 0
    assert Path(str(result.index_path) + ".profile").exists()
    assert "hot tree" not in first.log()
    # The snapshot the first launch took mapped files of the plain mount: set it aside, so that this launch
    # boots from the hot tree and snapshots that.
    (tmp_path / "snapshots").rename(tmp_path / "snapshots-first")
    served = serve(args)
    served.wait_ready()
    assert re.search(r"shown as a hot tree: \d+ files .*\(built in", served.log()), served.log()[-2000:]
    assert str(lazy_root_for(mountpoint)) in mounts()
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)

    def ask() -> str | None:
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
        )
        return reply.choices[0].message.content

    before = ask()
    served.wait_for(lambda h: h["replicas"] == [], timeout=120, what="scale to zero")
    assert re.search(r"snapshot \w+ taken", served.log()), served.log()[-3000:]
    assert ask() == before
    assert ready_lines(served, "restore") == 1, served.log()[-3000:]
    assert served.stop() == 0
    assert str(mountpoint) not in mounts() and str(lazy_root_for(mountpoint)) not in mounts()
