"""gVisor container start with a lazy image root vs a copied root (issue 13, item 5).

With ``--snapshot runsc --image INDEX`` and an image that holds a root filesystem, the runsc container's root
is the launcher's FUSE mount of the image (``launcher/checkpointers/runsc.py``), so starting a container needs
only the index: files are fetched when the engine opens them. The baseline is the same tree copied to a local
directory used as ``root.path``. Both run under ``--overlay2=root:memory``.

The image (``make_rootfs``, ~45 MB, cached in .cache/imagefs/runsc-root-store) is a minimal root filesystem:
this host's CPython (pyenv, at its own path, stdlib without tests/tk/idle) and the shared libraries it and
its extension modules load, ``coldstart.snapshot_hooks`` (stdlib only), a stdlib HTTP engine at
``/srv/engine.py`` that reads and hashes its "weights" (``/models/tiny``, 32 MiB) at start, and a few /etc
files. /proc, /dev and /sys come from runsc.

Rows, each timed from nothing running to the engine's first ``/health`` 200 (median of --repeat):

    copied root, run          runsc create+start of a fresh container on the local copy
    lazy root, run, cold      mount the index with an empty chunk cache, then the same (mount included)
    lazy root, run, warm      the same mount again, chunks already in the local cache (mount included)
    copied root, restore      runsc create+restore of a checkpoint taken on the copied root
    lazy root, restore, cold  mount with an empty chunk cache + create+restore of a checkpoint taken on it
    lazy root, restore, warm  the same with the chunk cache kept

"Copy" in the summary is what the copied root costs before its first start on a new host: materializing
the image from the same store into a local directory (what a non-lazy host has to do).

    sudo .venv/bin/python bench/lazy_root.py [--repeat 3] [--platform systrap|ptrace]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# bench/coldstart.py is named like our package: drop this folder from the path or `import coldstart` finds it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

CACHE = Path(os.environ.get("COLDSTART_TEST_CACHE", REPO / ".cache")) / "imagefs"
WEIGHTS_MIB = 32
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The engine inside the image: stdlib only, plus coldstart.snapshot_hooks for the launcher's control channel.
ENGINE = r'''"""A stdlib OpenAI-shaped engine for image-root tests: loads (reads and hashes) its model at start."""
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
            self.reply(200, {"weights": WEIGHTS, "restores": STATE["restores"], "root": sorted(os.listdir("/"))})
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


def _libraries(files: list[Path]) -> set[str]:
    """Shared libraries (and the loader) that ``files`` load, from ldd."""
    libs: set[str] = set()
    for f in files:
        out = subprocess.run(["ldd", str(f)], capture_output=True, text=True).stdout
        for line in out.splitlines():
            parts = line.split()
            if (
                "=>" in parts
                and len(parts) > parts.index("=>") + 1
                and parts[parts.index("=>") + 1][0] == "/"
            ):
                libs.add(parts[parts.index("=>") + 1])
            elif parts and parts[0].startswith("/"):
                libs.add(parts[0])
    return libs


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
    for lib in sorted(_libraries([exe, Path("/usr/bin/cat"), *extensions])):
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

    base = CACHE / "runsc-root"
    src, store = base / "src", base / "store"
    index = store / "images" / "rootfs.cidx"
    if (base / ".complete").exists() and index.exists():
        return src, index
    shutil.rmtree(base, ignore_errors=True)
    make_rootfs(src)
    build(src, store, index)
    (base / ".complete").write_text("ok\n")
    return src, index


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


async def wait_healthy(sandbox: object, timeout_s: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if sandbox.exit_code() is not None:  # type: ignore[attr-defined]
                raise RuntimeError(f"engine exited: {sandbox.log_tail()}")  # type: ignore[attr-defined]
            try:
                if (await client.get(f"{sandbox.base_url}/health")).status_code == 200:  # type: ignore[attr-defined]
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.02)
    raise RuntimeError(f"engine not healthy in {timeout_s:.0f} s: {sandbox.log_tail()}")  # type: ignore[attr-defined]


async def _main(args: argparse.Namespace) -> None:
    from coldstart.imagefs.mount import mounted
    from coldstart.launcher.checkpointers.runsc import RunscCheckpointer

    src, index = root_image()
    store = index.parent.parent
    work = Path(tempfile.mkdtemp(prefix="lazy-root-", dir="/var/tmp"))
    copied = work / "copied"
    started = time.monotonic()
    shutil.copytree(src, copied, symlinks=True)
    copy_s = time.monotonic() - started
    rows: dict[str, list[float]] = {}
    n = 0

    def fresh(name: str) -> Path:
        nonlocal n
        n += 1
        return work / f"{name}-{n}"

    async def run_once(root: Path) -> tuple[float, Path]:
        ckpt = RunscCheckpointer(platform=args.platform, root=root)
        sandbox = ckpt.new_sandbox(fresh("run"), f"bench{n}")
        t0 = time.monotonic()
        try:
            await sandbox.start(engine_spec(str(root)))  # type: ignore[arg-type]
            await wait_healthy(sandbox)
            took = time.monotonic() - t0
            image = fresh("ckpt")
            image.mkdir()
            await ckpt.checkpoint(sandbox, image, leave_running=False)
        finally:
            await sandbox.stop(2.0)
        return took, image

    async def restore_once(root: Path, image: Path) -> float:
        ckpt = RunscCheckpointer(platform=args.platform, root=root)
        t0 = time.monotonic()
        sandbox = await ckpt.restore(image, fresh("restore"), f"bench{n}")
        try:
            await wait_healthy(sandbox)
            return time.monotonic() - t0
        finally:
            await sandbox.stop(2.0)

    async def lazy(cache: Path, body: Callable[[Path], Awaitable[float]]) -> float:
        mnt = fresh("mnt")
        mnt.mkdir()
        t0 = time.monotonic()
        manager = mounted(index, mnt, cache, [str(store)], record_profile=False)
        await asyncio.to_thread(manager.__enter__)
        try:
            return (time.monotonic() - t0) + await body(mnt)
        finally:
            await asyncio.to_thread(manager.__exit__, None, None, None)

    try:
        # One checkpoint per root kind, taken on a mount at a fixed place (restore needs the same tree).
        copied_image = (await run_once(copied))[1]
        for _ in range(args.repeat):
            rows.setdefault("copied root, run", []).append((await run_once(copied))[0])
            cold = fresh("cache")
            rows.setdefault("lazy root, run, cold cache", []).append(
                await lazy(cold, lambda m: _first(run_once(m)))
            )
            rows.setdefault("lazy root, run, warm cache", []).append(
                await lazy(cold, lambda m: _first(run_once(m)))
            )
            rows.setdefault("copied root, restore", []).append(await restore_once(copied, copied_image))
            images: list[Path] = []

            async def take(m: Path) -> float:
                images.append((await run_once(m))[1])
                return 0.0

            await lazy(fresh("cache"), take)  # a checkpoint taken on a lazy root
            cold = fresh("cache")
            rows.setdefault("lazy root, restore, cold cache", []).append(
                await lazy(cold, lambda m: restore_once(m, images[0]))
            )
            rows.setdefault("lazy root, restore, warm cache", []).append(
                await lazy(cold, lambda m: restore_once(m, images[0]))
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    tree_mb = sum(f.stat().st_size for f in src.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6
    print(f"\nrunsc ({args.platform}), root tree {tree_mb:.1f} MB, median of {args.repeat}; "
          f"copying the tree to local disk took {copy_s:.2f} s\n")  # fmt: skip
    print("| container start -> /health 200 | seconds | vs copied root | runs |")
    print("|---|---|---|---|")
    base = {"run": statistics.median(rows["copied root, run"]),
            "restore": statistics.median(rows["copied root, restore"])}  # fmt: skip
    for name, values in rows.items():
        median = statistics.median(values)
        ref = base["restore" if "restore" in name else "run"]
        runs = ", ".join(f"{v:.2f}" for v in values)
        print(f"| {name} | {median:.2f} | {median / ref:.2f}x | {runs} |")


async def _first(coro: Awaitable[tuple[float, Path]]) -> float:
    return (await coro)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each row (median reported)")
    parser.add_argument("--platform", default="systrap", choices=("systrap", "ptrace"))
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
