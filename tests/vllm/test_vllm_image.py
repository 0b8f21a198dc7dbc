"""The real vLLM (CPU build, lean configuration) serving a model from a lazily mounted imagefs image on a
host that has only the image's index (an empty chunk cache: every byte comes from the origin store on
demand), checkpointed by CRIU with the model's files under the FUSE mount, restored with the same greedy
token ids (the image mount is kept in the replica's mount namespace and is external to the dump:
``CriuCheckpointer(external_mounts=...)``). Measured here: cold boot 39.1 s, snapshot 954 MB + 7.7 MB weight
files, restore 0.62 s; 1.2 MB fetched (the tiny model).

vLLM itself runs from its own venv on the host here; ``test_vllm_env_image.py`` runs it from an image of
that venv (``--engine-python '{image}'``: the launcher asks the engine's version once the image is mounted).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Served, make_cached_model, vllm_greedy_ids, vllm_module_marks

from coldstart.engine_adapters.vllm import LEAN_CPU_ARGS, LEAN_CPU_ENV
from coldstart.imagefs.build import build

MODEL = "tiny-vllm-image"
PROMPT = [{"role": "user", "content": "Name a colour."}]

pytestmark = [
    *vllm_module_marks(),
    pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="no /dev/fuse on this host"),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, Path, Path]]:
    work = tmp_path_factory.mktemp("vllm-image")
    index = build(make_cached_model("tiny"), work / "origin").index_path
    chunks = work / "chunks"  # empty: only the index is on this "host"
    args = [
        "vllm", "{image}", "--image", str(index), "--image-mount", str(work / "mnt"),
        "--image-cache", str(chunks), "--snapshot", "criu", "--snapshot-dir", str(work / "snapshots"),
        "--work-dir", str(work / "run"), "--served-model-name", MODEL, "--idle-timeout", "3",
        "--max-replicas", "1", "--boot-timeout", "600", *LEAN_CPU_ARGS,
    ]  # fmt: skip
    served = Served(args, work / "serve.log", env=LEAN_CPU_ENV)
    try:
        served.wait_ready(timeout=600)
        yield served, index, chunks
    finally:
        served.stop()


def greedy_ids(served: Served) -> tuple[list[int], str]:
    return vllm_greedy_ids(served, MODEL, PROMPT)


def test_vllm_from_a_lazy_image_boots_snapshots_and_restores_the_same_tokens(
    served: tuple[Served, Path, Path],
) -> None:
    proc, _index, chunks = served
    ids, text = greedy_ids(proc)
    assert ids
    assert "mounted at" in proc.log() and re.search(r"snapshot \w+ taken", proc.log())
    assert any(chunks.rglob("*")), "nothing was fetched into the empty chunk cache"
    proc.wait_for(lambda h: h["replicas"] == [], timeout=120, what="scale to zero")
    assert greedy_ids(proc) == (ids, text)
    assert re.search(r"-> ready after [\d.]+s how=restore\b", proc.log()), proc.log()[-2000:]
    assert proc.stop() == 0
