"""A Debian root filesystem holding Python and vLLM, as an imagefs image: the gVisor container's root for
``coldstart-serve vllm '{image}/models/NAME' --image ROOTFS.cidx --snapshot runsc`` (issue 19, item 1).

What it holds, each where the host has it, so that the venv (whose ``bin/python`` links to the host's
CPython by absolute path) and its ``pyvenv.cfg`` work unchanged inside:

- Debian 12 ``minbase`` from ``debootstrap`` (the Debian mirror), plus ``g++`` (torch.compile's CPU backend
  compiles C++ at the first boot; it hashes headers with ``openssl``) and ``libnuma1`` (vLLM's CPU kernels
  link it);
- this host's CPython prefix (pyenv: the interpreter, ``libpython``, the standard library without its tests,
  the headers torch.compile's C++ includes) and any shared library its extension modules, torch's and vLLM's
  load that Debian's packages above do not have;
- the vLLM venv (``/opt/coldstart/engines/vllm``, 2.4 GB), hard-linked when on the same filesystem;
- the models given, under ``/models/NAME``.

Not in it: coldstart's own entry script and worker extension; the runsc checkpointer mounts those read-only
from the host (``LaunchSpec.launcher_dirs``) on the empty folders ``/coldstart/NAME`` the image holds for
them (runsc's gofer cannot make a mount point in a read-only root). The debootstrap tree is cached by its
package list (``.cache/imagefs/debian-KEY``), the image by everything that goes in
(``.cache/imagefs/vllm-root-KEY``).

    .venv/bin/python bench/vllm_rootfs.py MODEL_DIR [MODEL_DIR ...]   # prints the index's path
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("COLDSTART_TEST_CACHE", REPO / ".cache")) / "imagefs"
SUITE = "bookworm"
MIRROR = os.environ.get("COLDSTART_DEBIAN_MIRROR", "http://deb.debian.org/debian")
PACKAGES = ("g++", "libnuma1", "openssl")
MOUNT_POINTS = ("coldstart/engine_adapters", "coldstart/snapshot_hooks")  # vLLM's launcher_dirs
STDLIB_SKIP = ("site-packages", "test", "idlelib", "tkinter", "turtledemo", "ensurepip")


class RootfsUnavailable(RuntimeError):
    """The root filesystem cannot be made here (no debootstrap, no mirror): the message says which."""


def _key(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def debian_base() -> Path:
    """The ``debootstrap --variant=minbase`` tree with ``PACKAGES``, made once (a few minutes, ~500 MB)."""
    base = CACHE / f"debian-{SUITE}-{_key(SUITE, *PACKAGES)}"
    if (base / ".complete").exists():
        return base / "root"
    if shutil.which("debootstrap") is None:
        raise RootfsUnavailable(
            "debootstrap is not installed: apt-get install debootstrap (bash .ci/setup does)"
        )
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    argv = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(base / "root")]
    print(f"[vllm_rootfs] {' '.join(argv)} {MIRROR} (a few minutes)", file=sys.stderr, flush=True)
    started = time.monotonic()
    done = subprocess.run([*argv, MIRROR], capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        raise RootfsUnavailable(f"debootstrap failed ({MIRROR}): {' | '.join(tail)}")
    # runsc mounts its own /dev, /proc and /sys; device nodes are not image content.
    for entry in (base / "root" / "dev").iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (base / ".complete").write_text(f"{time.monotonic() - started:.0f} s\n")
    return base / "root"


def _copy_tree(src: Path, dest: Path, ignore: object = None) -> None:
    """``src`` at ``dest``: hard links where both are on one filesystem (the image build only reads)."""
    same_fs = os.stat(src).st_dev == os.stat(dest.parent).st_dev
    copy = os.link if same_fs else shutil.copy2
    shutil.copytree(src, dest, symlinks=True, ignore=ignore, copy_function=copy)  # type: ignore[arg-type]


def shared_libraries(files: list[Path]) -> set[str]:
    """Absolute paths of the shared libraries (and the loader) ``files`` load, from ldd."""
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
            elif parts and parts[0].startswith("/"):  # the loader: "/lib64/ld-linux-x86-64.so.2 (0x...)"
                libs.add(parts[0])
    return libs


def _add_host_file(path: str, root: Path) -> None:
    """A host file at the same path under ``root`` unless the root has it (Debian's own copy wins)."""
    dest = root / path.lstrip("/")
    if os.path.lexists(dest) or os.path.lexists(root / os.path.realpath(path).lstrip("/")):
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(os.path.realpath(path), dest)


def _add_python(root: Path, venv: Path) -> None:
    exe = Path(os.path.realpath(venv / "bin" / "python"))
    prefix = exe.parent.parent
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    if not (prefix / "lib" / version).is_dir():
        raise RootfsUnavailable(
            f"{exe}: no {prefix / 'lib' / version}; the venv's interpreter is another Python"
        )
    inside = root / str(prefix).lstrip("/")
    (inside / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(exe, inside / "bin" / exe.name)
    for name in ("python3", "python"):
        if not (inside / "bin" / name).exists():
            os.symlink(exe.name, inside / "bin" / name)
    (inside / "lib").mkdir(exist_ok=True)
    for lib in (prefix / "lib").glob("libpython*"):
        shutil.copy2(lib, inside / "lib" / lib.name, follow_symlinks=False)
    shutil.copytree(prefix / "lib" / version, inside / "lib" / version, symlinks=True,
                    ignore=shutil.ignore_patterns(*STDLIB_SKIP))  # fmt: skip
    (inside / "lib" / version / "site-packages").mkdir()
    if (prefix / "include").is_dir():
        shutil.copytree(prefix / "include", inside / "include", symlinks=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    natives = [exe, *(prefix / "lib" / version / "lib-dynload").glob("*.so")]
    natives += [*(site / "torch" / "lib").glob("*.so*"), *(site / "vllm").glob("*.so")]
    for found in sorted(shared_libraries(natives)):
        if not found.startswith((str(prefix), str(venv))):
            _add_host_file(found, root)


def vllm_root_image(models: list[Path], venv: Path | None = None) -> Path:
    """The index of the root filesystem image (built once into ``.cache/imagefs/vllm-root-KEY``, whose
    ``store`` is its origin): Debian + this host's CPython + the vLLM venv + ``/models/NAME`` for each
    model folder given."""
    from coldstart.engine_adapters.discovery import engines_root
    from coldstart.imagefs.build import build

    venv = venv or engines_root() / "vllm"
    if not (venv / "bin" / "python").exists():
        raise RootfsUnavailable(f"no vLLM venv at {venv}: bash .ci/setup installs it")
    site = next((venv / "lib").glob("python3*/site-packages"))
    stamp = [str(venv), str(site.stat().st_mtime_ns), sys.version, *PACKAGES, *MOUNT_POINTS]
    stamp += [f"{m.resolve()}:{m.stat().st_mtime_ns}" for m in models]
    base = CACHE / f"vllm-root-{_key(*stamp)}"
    index = base / "store" / "images" / "vllm-root.cidx"
    if (base / ".complete").exists() and index.exists():
        return index
    debian = debian_base()
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    src = base / "src"
    print(f"[vllm_rootfs] composing {src}", file=sys.stderr, flush=True)
    _copy_tree(debian, src)
    _add_python(src, venv)
    (src / str(venv.parent).lstrip("/")).mkdir(parents=True, exist_ok=True)
    _copy_tree(venv, src / str(venv).lstrip("/"))  # with its bytecode: no compiling at every boot
    for folder in MOUNT_POINTS:
        (src / folder).mkdir(parents=True)
    for model in models:
        (src / "models").mkdir(exist_ok=True)
        shutil.copytree(model, src / "models" / model.name, symlinks=False)
    print(f"[vllm_rootfs] building the image {index}", file=sys.stderr, flush=True)
    result = build(src, base / "store", index)
    shutil.rmtree(src)  # the chunks hold it; 3 GB of links and copies are not kept twice
    (base / ".complete").write_text(f"{result.files} files, {result.bytes} bytes\n")
    return index


if __name__ == "__main__":
    print(vllm_root_image([Path(a) for a in sys.argv[1:]]))
