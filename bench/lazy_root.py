"""gVisor container start with a lazy image root vs a copied root (issue 13, item 5).

With ``--snapshot runsc --image INDEX`` and an image that holds a root filesystem, the runsc container's root
is the launcher's FUSE mount of the image (``launcher/checkpointers/runsc.py``), so starting a container needs
only the index: files are fetched when the engine opens them. The baseline is the same tree copied to a local
directory used as ``root.path``. Both run under ``--overlay2=root:memory``.

The image (``make_rootfs``, ~137 MB, cached in .cache/imagefs/runsc-root-KEY) is a minimal root filesystem:
this host's CPython (pyenv, at its own path, stdlib without tests/tk/idle) and the shared libraries it and
its extension modules load, ``coldstart.snapshot_hooks`` (stdlib only), a stdlib HTTP engine at
``/srv/engine.py`` that reads and hashes its "weights" (``/models/tiny``, 32 MiB) at start, and a few /etc
files. /proc, /dev and /sys come from runsc.

Rows, each timed from nothing running to the engine's first ``/health`` 200 (median of --repeat; the rows
take turns, so load from others hits them alike):

    copied root, run                  runsc create+start of a fresh container on the local copy
    lazy root, run, cold cache        mount the index, empty chunk cache, then the same (mount included)
    lazy root, run, same mount again  a second container on that mount (the launcher mounts once per host)
    lazy root, run, warm cache        a new mount, chunks already in the local chunk cache (mount included)
    ... boot profile prefetched       empty cache, the launcher's recorded boot read order fetched ahead
    copied root, restore              runsc create+restore of a checkpoint taken on the copied root
    lazy root, restore, cold cache    mount with an empty chunk cache + create+restore of a checkpoint taken
                                      on another mount point of the same image
    lazy root, restore, warm cache    the same with the chunk cache kept

"Copying the image" is what a copied root costs before its first start on a new host: every file read
through a fresh mount of the same store (empty cache) and written to local disk.

    sudo .venv/bin/python bench/lazy_root.py [--repeat 3] [--platform systrap|ptrace] [--tier dir|http]

``--engine vllm`` (issue 19): the real vLLM (CPU build, lean configuration, the tiny model on local disk)
through ``coldstart-serve`` (CRIU), its own environment -- the set-up's venv, 2.4 GB -- either on local disk
or in a lazily mounted image of it (``vllm_env_image``) on a host that has only the index. Each row starts
a launcher and sends one streamed request at once: seconds from the launch to its first token (mount,
engine probe, boot or restore, canary included), and what the mount fetched:

    local venv, boot                    --engine-python /opt/coldstart/engines/vllm
    lazy image, boot, empty cache       --image + --engine-python '{image}', empty chunk cache, no profile
    ... with its boot profile (hot tree) the same, with the read order the previous row recorded beside the
                                        index: the launcher shows the image as a hot tree
                                        (imagefs/hot_tree.py: what the boot read copied to local disk,
                                        the rest linked lazily)
    copied image, incl. copying it      every file read through a fresh mount (empty cache) and written to
                                        local disk first, then the boot from that copy
    lazy image, restore, empty cache    a CRIU snapshot taken from the lazy image by another launcher (same
                                        mount point), restored with an empty chunk cache: the snapshot is
                                        local, the engine's files are not
    ... a later request at zero         a second request at zero on that launcher (timed from sending it)
    local venv, restore (+ a later one)  the same with the venv on local disk (baseline)

    .venv/bin/python bench/lazy_root.py --engine vllm [--repeat 1] [--tier dir|http]

``--engine vllm-runsc``: the same container rows as the stdlib engine's, for the real vLLM (lean CPU
configuration, tiny model) under runsc, its root ``bench/vllm_rootfs.py``'s Debian image (CPython, the vLLM
venv, the model; 3.1 GB): the first boot on a copied root and the first on a lazy root (empty cache, its read
order recorded) are the first rows, then per --repeat a lazy boot with that profile prefetched, a restore on
the copied root and a restore on a lazy root with an empty cache (each boot takes minutes under gVisor).

    .venv/bin/python bench/lazy_root.py --engine vllm-runsc [--repeat 1]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "bench") not in sys.path:  # its sibling modules, also when a test loads this file by path
    sys.path.append(str(REPO / "bench"))
from vllm_rootfs import shared_libraries, vllm_root_image  # noqa: E402

VLLM_VENV = "/opt/coldstart/engines/vllm"  # where bench/vllm_rootfs.py puts the venv (the set-up's path)
CACHE = Path(os.environ.get("COLDSTART_TEST_CACHE", REPO / ".cache")) / "imagefs"
WEIGHTS_MIB = 32
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The engine inside the image: stdlib only, plus coldstart.snapshot_hooks for the launcher's control channel.
ENGINE = r'''"""A stdlib OpenAI-shaped test engine: loads (reads and hashes) its model at start."""
import argparse, hashlib, json, os, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from coldstart import snapshot_hooks as hooks

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--host", default="0.0.0.0")
parser.add_argument("--port", type=int, default=8000)
args = parser.parse_args()

digest = hashlib.sha256()
for dirpath, _, names in sorted(os.walk(args.model)):
    for name in sorted(names):
        with open(os.path.join(dirpath, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
WEIGHTS = digest.hexdigest()
NAME = os.path.basename(args.model.rstrip("/"))
STATE = {"restores": 0}

@hooks.after_restore
def restored():
    STATE["restores"] += 1

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def reply(self, code, payload):
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/health":
            self.reply(200, {"ok": True})
        elif self.path == "/v1/models":
            self.reply(200, {"object": "list", "data": [{"id": NAME, "object": "model"}]})
        elif self.path == "/state":
            state = {"weights": WEIGHTS, "restores": STATE["restores"], "root": sorted(os.listdir("/"))}
            self.reply(200, state)
        else:
            self.reply(404, {"error": "not found"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        prompt = json.dumps(body.get("messages") or body.get("prompt"))
        n = max(1, int(body.get("max_tokens") or 4))
        seed = hashlib.sha256((WEIGHTS + prompt).encode()).digest()
        ids = [seed[i % 32] for i in range(n)]  # greedy: a pure function of weights and prompt
        text = " ".join(f"t{i}" for i in ids)
        usage = {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}
        if self.path == "/v1/chat/completions":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "token_ids": ids,
                      "finish_reason": "length"}
            self.reply(200, {"id": "c", "object": "chat.completion", "created": int(time.time()),
                             "model": body.get("model", NAME), "choices": [choice], "usage": usage})
        elif self.path == "/v1/completions":
            choice = {"index": 0, "text": text, "token_ids": ids, "finish_reason": "length"}
            self.reply(200, {"id": "c", "object": "text_completion", "created": int(time.time()),
                             "model": body.get("model", NAME), "choices": [choice], "usage": usage})
        else:
            self.reply(404, {"error": "not found"})

hooks.serve()
ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()
'''

_SKIP_STDLIB = {
    "site-packages",
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "unittest",
}


def _copy_host_file(path: str, root: Path) -> None:
    """``path`` (a host file, maybe reached through symlinks) at the same path under ``root``."""
    real = os.path.realpath(path)
    dest = root / real.lstrip("/")
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(real, dest)
    alias = root / path.lstrip("/")
    if not os.path.lexists(alias):
        alias.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(real, alias)


def make_rootfs(dest: Path) -> Path:
    """A minimal root filesystem that runs ``/srv/engine.py`` with this host's CPython (see the docstring)."""
    exe = Path(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))
    prefix = exe.parent.parent
    stdlib = prefix / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    dest.mkdir(parents=True)
    for link, target in (
        ("bin", "usr/bin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
        ("sbin", "usr/sbin"),
    ):
        (dest / target).mkdir(parents=True, exist_ok=True)
        os.symlink(target, dest / link)  # merged /usr, as Debian 12
    _copy_host_file(str(exe), dest)
    _copy_host_file("/usr/bin/cat", dest)  # the launcher's connection drain runs `cat /proc/net/tcp` inside
    skip = shutil.ignore_patterns("config-*", *_SKIP_STDLIB)
    shutil.copytree(stdlib, dest / str(stdlib).lstrip("/"), symlinks=True, ignore=skip)
    extensions = sorted((stdlib / "lib-dynload").glob("*.so"))
    for lib in sorted(shared_libraries([exe, Path("/usr/bin/cat"), *extensions])):
        _copy_host_file(lib, dest)
    os.symlink(exe, dest / "usr" / "bin" / "python3")
    hooks = dest / str(stdlib).lstrip("/") / "site-packages" / "coldstart"
    hooks.mkdir(parents=True)
    (hooks / "__init__.py").write_text("")
    shutil.copytree(
        REPO / "snapshot_hooks", hooks / "snapshot_hooks", ignore=shutil.ignore_patterns("__pycache__")
    )
    (dest / "srv").mkdir()
    (dest / "srv" / "engine.py").write_text(ENGINE)
    model = dest / "models" / "tiny"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "stdlib-test"}\n')
    with open(model / "weights.bin", "wb") as f:
        for _ in range(WEIGHTS_MIB):
            f.write(os.urandom(1 << 20))
    (dest / "etc").mkdir()
    (dest / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"
    )
    (dest / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (dest / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    for d in ("root", "tmp", "proc", "dev", "sys"):
        (dest / d).mkdir(exist_ok=True)
    (dest / "tmp").chmod(0o1777)
    return dest


def root_image() -> tuple[Path, Path]:
    """(source tree, index) of the test root filesystem, built once into .cache/imagefs (like torch_image)."""
    from coldstart.imagefs.build import build

    # Rebuilt when the engine or the interpreter changes.
    key = hashlib.sha256(f"{ENGINE}{sys.version}{WEIGHTS_MIB}".encode()).hexdigest()[:12]
    base = CACHE / f"runsc-root-{key}"
    src, store = base / "src", base / "store"
    index = store / "images" / "rootfs.cidx"
    if (base / ".complete").exists() and index.exists():
        return src, index
    shutil.rmtree(base, ignore_errors=True)
    make_rootfs(src)
    build(src, store, index)
    (base / ".complete").write_text("ok\n")
    return src, index


def vllm_env_image(venv: Path | None = None) -> Path:
    """The vLLM venv (the set-up's ``/opt/coldstart/engines/vllm`` by default) built as an imagefs image once
    into .cache/imagefs/vllm-env-KEY (2.4 GB of chunks; rebuilt when the venv changes): its index, whose
    origin store is ``index.parent.parent``. The interpreter the venv links to (``bin/python ->`` the host's
    CPython) stays on the host; everything vLLM imports is in the image."""
    from coldstart.engine_adapters.discovery import engines_root
    from coldstart.imagefs.build import build

    venv = venv or engines_root() / "vllm"
    site = next((venv / "lib").glob("python3*/site-packages"))
    stamp = [str(venv), str(site.stat().st_mtime_ns)]
    stamp += [
        (venv / name).read_text() for name in ("pyvenv.cfg", ".coldstart-engine") if (venv / name).exists()
    ]
    key = hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:12]
    base = CACHE / f"vllm-env-{key}"
    index = base / "store" / "images" / "vllm-env.cidx"
    if (base / ".complete").exists() and index.exists():
        return index
    shutil.rmtree(base, ignore_errors=True)
    build(venv, base / "store", index)
    (base / ".complete").write_text(f"{venv}\n")
    return index


def engine_spec(root_prefix: str) -> object:
    """The engine's LaunchSpec as the ``custom`` adapter would make it, with paths under ``root_prefix``
    (the host path of the root: the checkpointer rewrites them to their place in the container)."""
    from coldstart.engine_adapters.base import LaunchSpec

    argv = [
        "python3",
        f"{root_prefix}/srv/engine.py",
        "--model",
        f"{root_prefix}/models/tiny",
        "--port",
        "8000",
    ]
    return LaunchSpec(argv=argv, env={"PYTHONUNBUFFERED": "1"})


# -- the benchmark ------------------------------------------------------------------------------------------


async def wait_healthy(sandbox: Any, timeout_s: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if sandbox.exit_code() is not None:
                raise RuntimeError(f"engine exited: {sandbox.log_tail()}")
            try:
                if (await client.get(f"{sandbox.base_url}/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.02)
    raise RuntimeError(f"engine not healthy in {timeout_s:.0f} s: {sandbox.log_tail()}")


class ChunkServer:
    """``coldstart image serve`` on a free local port (stopped with SIGTERM, then SIGKILL)."""

    def __init__(self, store: Path, log: Path) -> None:
        import httpx

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        argv = [
            sys.executable,
            "-m",
            "coldstart.imagefs.cli",
            "serve",
            "--store",
            str(store),
            "--port",
            str(port),
            "--no-token",  # a local store of public test images
        ]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"chunk server did not come up: {log.read_text()[-500:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Row:
    seconds: list[float] = field(default_factory=list)
    mount_s: list[float] = field(default_factory=list)
    fetched: list[int] = field(default_factory=list)  # bytes the mount read from the store


class Bench:
    def __init__(
        self,
        index: Path,
        work: Path,
        platform: str,
        tier: str,
        spec_for: Callable[[str], object] | None = None,
        healthy_in_s: float = 120.0,
    ) -> None:
        self.index, self.work, self.platform, self.tier = index, work, platform, tier
        self.spec_for = spec_for or engine_spec  # the engine's LaunchSpec for a root's host path
        self.healthy_in_s = healthy_in_s
        self.rows: dict[str, Row] = {}
        self.second: list[float] = []
        self.n = 0

    def fresh(self, name: str) -> Path:
        self.n += 1
        return self.work / f"{name}-{self.n}"

    def record(
        self, name: str, seconds: float, mount_s: float | None = None, fetched: int | None = None
    ) -> None:
        row = self.rows.setdefault(name, Row())
        row.seconds.append(seconds)
        if mount_s is not None:
            row.mount_s.append(mount_s)
        if fetched is not None:
            row.fetched.append(fetched)

    async def run(self, root: Path, keep: Path | None = None) -> float:
        """create+start on ``root`` -> /health 200; checkpointed into ``keep`` when given."""
        from coldstart.launcher.checkpointers.runsc import RunscCheckpointer

        checkpointer = RunscCheckpointer(platform=self.platform, root=root)
        sandbox: Any = checkpointer.new_sandbox(self.fresh("run"), f"bench{self.n}")
        started = time.monotonic()
        try:
            await sandbox.start(self.spec_for(str(root)))
            await wait_healthy(sandbox, self.healthy_in_s)
            took = time.monotonic() - started
            if keep is not None:
                keep.mkdir()
                await checkpointer.checkpoint(sandbox, keep, leave_running=False)
        finally:
            await sandbox.stop(2.0)
        return took

    async def run_twice(self, root: Path) -> float:
        """``run`` on ``root``, then another container on it (kept in ``self.second``)."""
        first = await self.run(root)
        self.second.append(await self.run(root))
        return first

    async def restore(self, root: Path, image: Path) -> float:
        """create+restore of ``image`` on ``root`` -> /health 200."""
        from coldstart.launcher.checkpointers.runsc import RunscCheckpointer

        checkpointer = RunscCheckpointer(platform=self.platform, root=root)
        started = time.monotonic()
        sandbox: Any = await checkpointer.restore(image, self.fresh("restore"), f"bench{self.n}")
        try:
            await wait_healthy(sandbox, self.healthy_in_s)
            return time.monotonic() - started
        finally:
            await sandbox.stop(2.0)

    async def lazy(
        self,
        cache: Path,
        body: Callable[[Path], Awaitable[float]],
        *,
        profile: Path | None = None,
        record: bool = False,
    ) -> tuple[float, float, int]:
        """(mount + body seconds, mount seconds, bytes fetched) with the image mounted on a fresh point;
        ``profile``: prefetch that boot profile (``record``: write it at unmount instead)."""
        from coldstart.imagefs.mount import mounted

        mnt = self.fresh("mnt")
        mnt.mkdir()
        started = time.monotonic()
        manager = mounted(
            self.index,
            mnt,
            cache,
            [self.tier],
            prefetch=profile is not None and not record,
            record_profile=record,
            profile_path=profile or self.work / "no-profile",
        )
        mount = await asyncio.to_thread(manager.__enter__)
        mount_s = time.monotonic() - started
        try:
            took = await body(mnt)
        finally:
            await asyncio.to_thread(manager.__exit__, None, None, None)
        return mount_s + took, mount_s, int(mount.stats.get("remote_bytes", 0))

    async def copy_through_tiers(self) -> tuple[float, int, Path]:
        """What a copied root costs on a new host: every file read through a fresh mount (empty cache)
        and written to local disk."""
        dest = self.fresh("copied")

        async def copy(mnt: Path) -> float:
            started = time.monotonic()
            await asyncio.to_thread(shutil.copytree, mnt, dest, symlinks=True)
            return time.monotonic() - started

        total, _, fetched = await self.lazy(self.fresh("cache"), copy)
        return total, fetched, dest


def vllm_root_spec(root: str) -> object:
    """vLLM's LaunchSpec (lean CPU configuration, the tiny model) with its venv and model under ``root``,
    the host path of ``bench/vllm_rootfs.py``'s root filesystem."""
    from coldstart.engine_adapters.base import EngineConfig
    from coldstart.engine_adapters.registry import get_adapter
    from coldstart.engine_adapters.vllm import LEAN_CPU_ARGS, LEAN_CPU_ENV

    adapter = get_adapter("vllm", engine_python=f"{root}{VLLM_VENV}/bin/python")
    config = EngineConfig(model=f"{root}/models/tiny", engine_args=LEAN_CPU_ARGS, host="0.0.0.0", port=8000)
    spec: Any = adapter.launch_spec(config)
    spec.env.update(LEAN_CPU_ENV)
    return spec


async def _main(args: argparse.Namespace) -> None:
    quick = args.engine == "vllm-runsc"  # a vLLM boot under gVisor takes minutes: the rows that matter
    if quick:
        from coldstart.launcher.tiny_model import make_model

        index = vllm_root_image([make_model(CACHE.parent / "models" / "tiny", "tiny")])
    else:
        _src, index = root_image()
    work = Path(tempfile.mkdtemp(prefix="lazy-root-", dir="/var/tmp"))
    store = index.parent.parent
    server = None
    if args.tier == "http":  # as another host sees the store: through a cache server
        server = ChunkServer(store, work / "server.log")
        tier = server.url
    else:
        tier = str(store)
    if quick:
        bench = Bench(index, work, args.platform, tier, vllm_root_spec, healthy_in_s=1200.0)
    else:
        bench = Bench(index, work, args.platform, tier)
    copies: list[float] = []
    try:
        copy_s, copy_bytes, copied = await bench.copy_through_tiers()
        copies.append(copy_s)
        image_bytes = sum(f.stat().st_size for f in copied.rglob("*") if f.is_file() and not f.is_symlink())
        copied_ckpt, lazy_ckpt = bench.fresh("ckpt"), bench.fresh("ckpt")
        took = await bench.run(copied, keep=copied_ckpt)
        # A checkpoint taken on a lazy root, restored below on other mount points of the same image; this
        # boot's read order is the profile the launcher would record (written at unmount).
        profile = work / "boot.profile"
        lazy_first = await bench.lazy(
            bench.fresh("cache"), lambda m: bench.run(m, keep=lazy_ckpt), profile=profile, record=True
        )
        if quick:  # those two boots are the first rows; then one of each other row that matters
            bench.record("copied root, run", took)
            bench.record("lazy root, run, cold cache", *lazy_first)
            for _ in range(args.repeat):
                bench.record(
                    "lazy root, run, cold cache, boot profile prefetched",
                    *await bench.lazy(bench.fresh("cache"), bench.run, profile=profile),
                )
                bench.record("copied root, restore", await bench.restore(copied, copied_ckpt))
                restore = functools.partial(bench.restore, image=lazy_ckpt)
                lazy_restore = await bench.lazy(bench.fresh("cache"), restore)
                bench.record("lazy root, restore, cold cache", *lazy_restore)
        for _ in range(0 if quick else args.repeat):  # rows take turns, so load from others hits them alike
            bench.record("copied root, run", await bench.run(copied))
            cache = bench.fresh("cache")
            bench.record("lazy root, run, cold cache", *await bench.lazy(cache, bench.run_twice))
            bench.record("lazy root, run, same mount again", bench.second.pop())
            bench.record("lazy root, run, warm cache", *await bench.lazy(cache, bench.run))
            bench.record(
                "lazy root, run, cold cache, boot profile prefetched",
                *await bench.lazy(bench.fresh("cache"), bench.run, profile=profile),
            )
            bench.record("copied root, restore", await bench.restore(copied, copied_ckpt))
            cache = bench.fresh("cache")
            restore = functools.partial(bench.restore, image=lazy_ckpt)
            bench.record("lazy root, restore, cold cache", *await bench.lazy(cache, restore))
            bench.record("lazy root, restore, warm cache", *await bench.lazy(cache, restore))
            copies.append((await bench.copy_through_tiers())[0])
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    copy_s = statistics.median(copies)
    run_base = statistics.median(bench.rows["copied root, run"].seconds)
    restore_base = statistics.median(bench.rows["copied root, restore"].seconds)
    print(
        f"\nrunsc ({args.platform}), root image {image_bytes / 1e6:.1f} MB, tier {args.tier} ({tier}), "
        f"median of {args.repeat}. "
        f"Copying the image to local disk through the same tier (fresh mount, empty cache): "
        f"{copy_s:.2f} s (runs: {', '.join(f'{c:.2f}' for c in copies)}), "
        f"{copy_bytes / 1e6:.1f} MB fetched.\n"
    )
    print("| container start -> /health 200 | seconds | vs copied root | of which mount | fetched | runs |")
    print("|---|---|---|---|---|---|")
    for name, row in bench.rows.items():
        median = statistics.median(row.seconds)
        base = restore_base if "restore" in name else run_base
        mount = f"{statistics.median(row.mount_s):.2f} s" if row.mount_s else "-"
        fetched = f"{statistics.median(row.fetched) / 1e6:.1f} MB" if row.fetched else "-"
        runs = ", ".join(f"{v:.2f}" for v in row.seconds)
        print(f"| {name} | {median:.2f} | {median / base:.2f}x | {mount} | {fetched} | {runs} |")
    first = statistics.median(bench.rows["lazy root, run, cold cache"].seconds)
    print(
        f"| copied root, run, incl. copying the image first | {copy_s + run_base:.2f} | "
        f"{(copy_s + run_base) / run_base:.2f}x | - | {copy_bytes / 1e6:.1f} MB | - |"
    )
    print(f"\nOn a new host: lazy root {first:.2f} s vs copy + start {copy_s + run_base:.2f} s "
          f"({first / (copy_s + run_base):.2f}x).")  # fmt: skip


# -- vLLM from a lazily mounted image of its venv (--engine vllm) -------------------------------------------


class VllmRows:
    """The ``--engine vllm`` rows: each a ``coldstart-serve`` launched, one streamed request sent at once."""

    def __init__(self, index: Path, tier: str, work: Path) -> None:
        import gateway_clock

        from coldstart.engine_adapters.discovery import engines_root
        from coldstart.engine_adapters.vllm import LEAN_CPU_ARGS, LEAN_CPU_ENV
        from coldstart.launcher.tiny_model import make_model

        self.clock = gateway_clock
        self.index, self.tier, self.work = index, tier, work
        self.venv = engines_root() / "vllm"
        self.model = make_model(CACHE.parent / "models" / "tiny", "tiny")
        self.engine_args, self.env = list(LEAN_CPU_ARGS), dict(LEAN_CPU_ENV)
        self.rows: dict[str, Row] = {}
        self.phases: dict[str, list[dict[str, float]]] = {}
        self.n = 0

    def fresh(self, name: str) -> Path:
        self.n += 1
        return self.work / f"{name}-{self.n}"

    def index_copy(self, profile: Path | None = None) -> Path:
        """The index alone in a folder of its own (with ``profile`` beside it, as the launcher finds one)."""
        folder = self.fresh("index")
        folder.mkdir()
        shutil.copy(self.index, folder / self.index.name)
        if profile is not None:
            shutil.copy(profile, folder / f"{self.index.name}.profile")
        return folder / self.index.name

    def image_args(self, index: Path, mount: Path, cache: Path) -> list[str]:
        return [
            "--image", str(index), "--engine-python", "{image}", "--image-mount", str(mount),
            "--image-tiers", self.tier, "--image-cache", str(cache),
        ]  # fmt: skip

    def launch(
        self, name: str | None, extra: list[str], snapshots: Path | None = None, first: float = 0.0
    ) -> Any:
        """A launcher with ``extra`` flags; one request at once. Records launch -> first token (+ ``first``:
        a copy made before it) under ``name``; returns the launcher, still running."""
        snap = (
            ["--snapshot", "criu", "--snapshot-dir", str(snapshots)] if snapshots else ["--snapshot", "off"]
        )
        launcher = self.clock.Launcher(
            [
                "vllm", str(self.model), *extra, *snap, "--work-dir", str(self.fresh("run")),
                "--served-model-name", "m", "--idle-timeout", "3", "--max-replicas", "1",
                "--boot-timeout", "900", *self.engine_args,
            ],
            self.fresh("serve") .with_suffix(".log"),
            env=self.env,
        )  # fmt: skip
        try:
            launcher.wait_for(lambda _h: True, 300, "the proxy")
            launcher.first_token("m")
            took = time.monotonic() - launcher.started
        except BaseException:
            launcher.stop()
            raise
        if name is not None:
            self.record(name, launcher, first + took)
        return launcher

    def record(
        self, name: str, launcher: Any, seconds: float, phases: dict[str, float] | None = None
    ) -> None:
        """``phases``: the split of a later request (no mount; the fetch gauge is the first request's);
        None: the launch's own (mount, fetched bytes and phases from /metrics)."""
        row = self.rows.setdefault(name, Row())
        row.seconds.append(seconds)
        if phases is None:
            text = launcher.metrics()
            fetched = self.clock.gauge(text, "coldstart_image_fetched_bytes", "m")
            if fetched is not None:
                row.fetched.append(int(fetched))
            totals = self.clock.phase_totals(text, "m")
            if totals["image_mount"][0]:
                row.mount_s.append(totals["image_mount"][1] / totals["image_mount"][0])
            phases = {k: s for k, (c, s) in totals.items() if c and k != "image_mount"}
        self.phases.setdefault(name, []).append(phases)
        print(f"  {name}: {seconds:.2f} s {phases}", file=sys.stderr, flush=True)

    def copy_image(self) -> tuple[float, int, Path]:
        """Every file of the image read through a fresh mount (empty cache) and written to local disk."""
        from coldstart.imagefs.mount import mounted

        dest, mnt = self.fresh("copied"), self.fresh("mnt")
        mnt.mkdir()
        started = time.monotonic()
        with mounted(
            self.index, mnt, self.fresh("cache"), [self.tier], prefetch=False, record_profile=False
        ) as mount:
            shutil.copytree(mnt, dest, symlinks=True)
        return time.monotonic() - started, int(mount.stats.get("remote_bytes", 0)), dest

    def once(self, profile: Path) -> None:
        local = ["--engine-python", str(self.venv)]
        self.launch("local venv, boot", local).stop()
        cold = self.index_copy()
        self.launch(
            "lazy image, boot, empty cache", self.image_args(cold, self.fresh("mnt"), self.fresh("cache"))
        ).stop()
        recorded = Path(f"{cold}.profile")  # saved once its first replica was ready
        if recorded.exists():
            shutil.copy(recorded, profile)
        if profile.exists():
            with_profile = self.image_args(self.index_copy(profile), self.fresh("mnt"), self.fresh("cache"))
            self.launch(
                "lazy image, boot, empty cache, with its boot profile (hot tree)", with_profile
            ).stop()
        copy_s, _, copied = self.copy_image()
        self.launch(
            "copied image, boot, incl. copying it first", ["--engine-python", str(copied)], first=copy_s
        ).stop()
        shutil.rmtree(copied, ignore_errors=True)
        # Restores: a snapshot taken from the lazy image by one launcher, restored by another that has an
        # empty chunk cache and the same mount point (the engine maps its files there).
        snapshots, mnt = self.fresh("snapshots"), self.fresh("mnt")
        taker = self.launch(None, self.image_args(self.index_copy(), mnt, self.fresh("cache")), snapshots)
        taker.stop()
        restorer = self.launch(
            "lazy image, restore, empty cache",
            self.image_args(self.index_copy(), mnt, self.fresh("cache")),
            snapshots,
        )
        self.later_request(restorer, "lazy image, restore, warm cache, a later request at zero")
        local_snapshots = self.fresh("snapshots")
        self.launch(None, local, local_snapshots).stop()
        restorer = self.launch("local venv, restore", local, local_snapshots)
        self.later_request(restorer, "local venv, restore, a later request at zero")

    def later_request(self, launcher: Any, name: str) -> None:
        """Once ``launcher`` is back at zero, one more request (timed from sending it); then stop it."""
        try:
            launcher.wait_zero()
            timing = self.clock.request_at_zero(launcher, "m")
            self.record(name, launcher, timing.pop("client"), timing)
        finally:
            launcher.stop()


def vllm_main(args: argparse.Namespace) -> None:
    index = vllm_env_image()
    work = Path(tempfile.mkdtemp(prefix="lazy-vllm-", dir="/var/tmp"))
    server = None
    store = index.parent.parent
    if args.tier == "http":
        server = ChunkServer(store, work / "server.log")
        tier = server.url
    else:
        tier = str(store)
    rows = VllmRows(index, tier, work)
    try:
        for _ in range(args.repeat):
            rows.once(work / "boot.profile")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    from coldstart.imagefs.index import ImageIndex

    image_bytes = ImageIndex.open(index).total_bytes
    print(
        f"\nvLLM ({rows.venv}, lean CPU configuration, tiny model on local disk) through coldstart-serve, "
        f"CRIU; the venv image {image_bytes / 1e9:.2f} GB, tier {args.tier} ({tier}), "
        f"median of {args.repeat}; "
        "seconds from the launch to the first token of a streamed request sent at once.\n"
    )
    print(
        "| launch -> 1st token | seconds | vs local venv | of which mount | fetched | phases (medians) |"
        " runs |"
    )
    print("|---|---|---|---|---|---|---|")

    def base_of(name: str) -> float:
        kind = "later request" if "later request" in name else "restore" if "restore" in name else "boot"
        local = next(n for n in rows.rows if n.startswith("local venv") and kind in n)
        return statistics.median(rows.rows[local].seconds)

    for name, row in rows.rows.items():
        median = statistics.median(row.seconds)
        base = base_of(name)
        mount = f"{statistics.median(row.mount_s):.2f} s" if row.mount_s else "-"
        fetched = f"{statistics.median(row.fetched) / 1e6:.1f} MB" if row.fetched else "-"
        keys = sorted({k for p in rows.phases[name] for k in p}, key=rows.clock.PHASES.index)
        phases = ", ".join(
            f"{k} {statistics.median([p.get(k, 0.0) for p in rows.phases[name]]):.2f}" for k in keys
        )
        runs = ", ".join(f"{v:.2f}" for v in row.seconds)
        print(f"| {name} | {median:.2f} | {median / base:.2f}x | {mount} | {fetched} | {phases} | {runs} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each row (median reported)")
    parser.add_argument("--platform", default="systrap", choices=("systrap", "ptrace"))
    parser.add_argument(
        "--tier",
        default="dir",
        choices=("dir", "http"),
        help="where chunks come from: the store directory, or a `coldstart image serve` in front of it",
    )
    parser.add_argument(
        "--engine",
        default="stdlib",
        choices=("stdlib", "vllm", "vllm-runsc"),
        help="stdlib: the runsc root image rows; vllm: the real vLLM from an image of its venv (CRIU); "
        "vllm-runsc: the real vLLM under runsc with bench/vllm_rootfs.py's Debian image as its root",
    )
    args = parser.parse_args()
    if args.engine == "vllm":
        vllm_main(args)
    else:
        asyncio.run(_main(args))


if __name__ == "__main__":
    main()
