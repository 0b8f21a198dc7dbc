"""The real vLLM (CPU build, lean configuration, tiny model) under gVisor with a lazily mounted image as the
container's whole root: ``coldstart-serve vllm '{image}/models/tiny' --image ROOTFS.cidx --snapshot runsc``
on a host that has only the image's index (an empty chunk cache). The image (``bench/vllm_rootfs.py``) is a
Debian 12 root from ``debootstrap`` holding CPython, the vLLM venv and the model; the container sees
nothing of the host's files but coldstart's entry script and worker extension, mounted read-only
(``LaunchSpec.launcher_dirs``). Booted, checkpointed by ``runsc checkpoint``, scaled to zero, restored by
``runsc restore`` answering the same greedy token ids. One engine boot for the module.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from support import (
    REPO,
    Served,
    bench_module,
    make_cached_model,
    needs_runsc,
    ready_lines,
    vllm_greedy_ids,
    vllm_module_marks,
)

from coldstart.engine_adapters.vllm import ENTRY, LEAN_CPU_ARGS, LEAN_CPU_ENV
from coldstart.launcher.checkpointers.runsc import SIDECAR

MODEL = "tiny-vllm-rootfs"
PROMPT = [{"role": "user", "content": "Name a colour."}]


pytestmark = [
    *vllm_module_marks(),
    needs_runsc(),
    pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="no /dev/fuse on this host"),
]


def vllm_rootfs() -> ModuleType:
    return bench_module("vllm_rootfs")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    model = make_cached_model("tiny")
    cached = vllm_rootfs().vllm_root_image([model])
    work = tmp_path_factory.mktemp("vllm-rootfs")
    index = work / "index" / cached.name  # a copy: this boot's profile is written beside it, not the cache's
    index.parent.mkdir()
    shutil.copy(cached, index)
    python = "{image}/opt/coldstart/engines/vllm/bin/python"
    args = [
        "vllm", f"{{image}}/models/{model.name}", "--image", str(index), "--engine-python", python,
        "--image-mount", str(work / "root"), "--image-tiers", str(cached.parent.parent),
        "--image-cache", str(work / "chunks"), "--snapshot", "runsc",
        "--snapshot-dir", str(work / "snapshots"), "--work-dir", str(work / "run"),
        "--served-model-name", MODEL, "--idle-timeout", "3", "--max-replicas", "1",
        "--boot-timeout", "1200", *LEAN_CPU_ARGS,
    ]  # fmt: skip
    served = Served(args, work / "serve.log", env=LEAN_CPU_ENV)
    served.work = work  # type: ignore[attr-defined]
    try:
        served.wait_ready(timeout=1500)
        yield served
    finally:
        served.stop()


def test_vllm_in_a_debian_image_root_boots_snapshots_and_restores_the_same_greedy_tokens(
    served: Served,
) -> None:
    work: Path = served.work  # type: ignore[attr-defined]
    log = served.log()
    assert "holds a root filesystem: the container root with --snapshot runsc" in log, log
    (config,) = (work / "run").glob("launcher-*/r1/bundle/config.json")
    bundle = json.loads(config.read_text())
    assert bundle["root"]["path"] == str(work / "root")  # the image's mount is the container's /
    args = bundle["process"]["args"]
    assert args[:4] == [
        "/opt/coldstart/engines/vllm/bin/python",
        f"/coldstart/engine_adapters/{ENTRY.name}",
        "serve",
        "/models/tiny",
    ]
    binds = {m["destination"]: m["source"] for m in bundle["mounts"] if m["type"] == "bind"}
    assert binds == {
        "/coldstart/engine_adapters": str(ENTRY.parent),
        "/coldstart/snapshot_hooks": str(REPO / "snapshot_hooks"),
    }
    assert any((work / "chunks").rglob("*")), "nothing was fetched through the image"

    ids, text = vllm_greedy_ids(served, MODEL, PROMPT)
    assert ids, "vLLM returned no token ids"
    (manifest,) = (work / "snapshots").glob("*/manifest.json")
    assert json.loads(manifest.read_text())["identity"]["checkpointer"] == "runsc"
    (sidecar,) = (work / "snapshots").rglob(SIDECAR)
    assert json.loads(sidecar.read_text())["root"] == "image"

    served.wait_for(lambda h: h["replicas"] == [], timeout=120, what="scale to zero")
    restores = ready_lines(served, "restore")
    assert vllm_greedy_ids(served, MODEL, PROMPT) == (ids, text)
    assert ready_lines(served, "restore") == restores + 1, "the replica that answered was not restored"
