"""``coldstart-serve --image``: the engine's model comes from a lazily mounted imagefs image."""

from __future__ import annotations

import subprocess
from pathlib import Path

import openai
import pytest

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
