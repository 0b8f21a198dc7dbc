"""The real vLLM (CPU build, lean configuration) run from its own environment inside a lazily mounted imagefs
image: ``coldstart-serve vllm MODEL --image VENV.cidx --engine-python '{image}'`` on a host that has only the
image's index (an empty chunk cache: vLLM, torch and every other package come from the origin store as they
are opened). The launcher asks the engine for its version only once the image is mounted
(``launcher/image.py: engine_in_image``); the engine maps its libraries from under the mount, CRIU treats
the mount as external (as for a model in an image, ``tests/vllm/test_vllm_image.py``), and a replica
restored from the snapshot answers with the same greedy token ids.

The image is the set-up's venv (``/opt/coldstart/engines/vllm``), built once into .cache/imagefs
(``bench/lazy_root.py: vllm_env_image``, ~35 s, 2.4 GB) and mounted elsewhere: a venv finds its packages from
the interpreter's path. Its ``bin/python`` links to the host's CPython, which stays on the host.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from support import (
    Served,
    bench_module,
    make_cached_model,
    ready_lines,
    vllm_greedy_ids,
    vllm_module_marks,
)

from coldstart.engine_adapters.vllm import LEAN_CPU_ARGS, LEAN_CPU_ENV

MODEL = "tiny-vllm-env-image"
PROMPT = [{"role": "user", "content": "Name a colour."}]

pytestmark = [
    *vllm_module_marks(),
    pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="no /dev/fuse on this host"),
]


def lazy_root() -> ModuleType:
    return bench_module("lazy_root")


def launch_args(work: Path, index: Path, snapshots: Path) -> list[str]:
    cached = lazy_root().vllm_env_image()
    return [
        "vllm", str(make_cached_model("tiny")), "--image", str(index), "--engine-python", "{image}",
        "--image-mount", str(work / "mnt"), "--image-tiers", str(cached.parent.parent),
        "--image-cache", str(work / "chunks"), "--snapshot", "criu", "--snapshot-dir", str(snapshots),
        "--work-dir", str(work / "run"), "--served-model-name", MODEL, "--idle-timeout", "3",
        "--max-replicas", "1", "--boot-timeout", "600", *LEAN_CPU_ARGS,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm-env-image")


@pytest.fixture(scope="module")
def served(work: Path) -> Iterator[tuple[Served, Path]]:
    cached = lazy_root().vllm_env_image()
    index = work / "index" / cached.name  # a copy: this boot's profile is written beside it, not the cache's
    index.parent.mkdir()
    shutil.copy(cached, index)
    # The chunk cache (work/chunks) starts empty: only the index is on this "host".
    served = Served(launch_args(work, index, work / "snapshots"), work / "serve.log", env=LEAN_CPU_ENV)
    try:
        served.wait_ready(timeout=900)
        yield served, work / "mnt"
    finally:
        served.stop()


def mapped_from(pids: list[int], folder: str) -> set[str]:
    """Files under ``folder`` that the processes ``pids`` (and their children) map."""
    found: set[str] = set()
    for pid in pids:
        for proc in [Path(f"/proc/{pid}"), *(Path(f"/proc/{c}") for c in _children(pid))]:
            try:
                lines = (proc / "maps").read_text().splitlines()
            except OSError:
                continue
            found |= {ln.split(maxsplit=5)[5] for ln in lines if len(ln.split(maxsplit=5)) == 6}
    return {path for path in found if path.startswith(folder)}


def _children(pid: int) -> list[int]:
    out, queue = [], [pid]
    while queue:
        for task in Path(f"/proc/{queue.pop()}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            queue += kids
    return out


def test_vllm_from_its_venv_in_a_lazy_image_boots_snapshots_and_restores_the_same_tokens(
    served: tuple[Served, Path],
) -> None:
    proc, mnt = served
    ids, text = vllm_greedy_ids(proc, MODEL, PROMPT)
    assert ids
    log = proc.log()
    assert "mounted at" in log and re.search(r"snapshot \w+ taken", log), log[-3000:]
    # The engine runs from the image: its torch and vLLM libraries are mapped from under the mount.
    libraries = mapped_from(proc.engine_pids(), str(mnt))
    assert any("/torch/lib/libtorch_cpu.so" in p for p in libraries), sorted(libraries)[:20]
    assert any("/vllm/" in p for p in libraries), sorted(libraries)[:20]
    assert not mapped_from(proc.engine_pids(), "/opt/coldstart/engines/vllm/")
    # Everything it read came through the empty cache from the origin store: far less than the 2.4 GB image.
    metrics = httpx.get(f"{proc.url}/metrics", timeout=5).text
    fetched = re.search(rf'^coldstart_image_fetched_bytes{{model="{MODEL}"}} (\S+)$', metrics, re.MULTILINE)
    assert fetched and 10e6 < float(fetched.group(1)) < 2.0e9, fetched
    proc.wait_for(lambda h: h["replicas"] == [], timeout=120, what="scale to zero")
    assert vllm_greedy_ids(proc, MODEL, PROMPT) == (ids, text)
    assert ready_lines(proc, "restore") == 1, proc.log()[-3000:]
    assert proc.stop() == 0


def test_relaunched_with_the_boot_profile_it_boots_from_a_hot_tree_and_restores_the_same_tokens(
    served: tuple[Served, Path], work: Path
) -> None:
    """The first launch saved its boot profile beside the index; this one shows the image as a hot tree
    (``imagefs.hot_tree``: what that boot read on local disk, the rest linked into the lazy mount), boots vLLM
    from it (a fresh snapshot store), snapshots with CRIU (the mount point and the lazy mount external) and
    restores a replica that gives the same greedy token ids."""
    first, mnt = served
    first.stop()  # the first test's launcher, if it is still up: one mount of mnt at a time
    index = work / "index" / lazy_root().vllm_env_image().name
    assert Path(f"{index}.profile").exists()
    proc = Served(launch_args(work, index, work / "snapshots-hot"), work / "serve-hot.log", env=LEAN_CPU_ENV)
    try:
        proc.wait_ready(timeout=900)
        log = proc.log()
        hot = re.search(r"shown as a hot tree: (\d+) files \(([\d.]+) MB\)", log)
        assert hot and int(hot.group(1)) > 1000, log[-3000:]
        assert (mnt / "bin" / "python").exists() and not (mnt / "pyvenv.cfg").is_symlink()  # read: local
        assert (mnt / "lib").is_dir() and not (mnt / "lib").is_symlink()
        ids, text = vllm_greedy_ids(proc, MODEL, PROMPT)
        assert ids
        assert re.search(r"snapshot \w+ taken", proc.log()), proc.log()[-3000:]
        proc.wait_for(lambda h: h["replicas"] == [], timeout=120, what="scale to zero")
        assert vllm_greedy_ids(proc, MODEL, PROMPT) == (ids, text)
        assert ready_lines(proc, "restore") == 1, proc.log()[-3000:]
    finally:
        assert proc.stop() == 0
