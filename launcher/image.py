"""``coldstart-serve ... --image INDEX``: run the engine from a lazily mounted imagefs image.

The image is mounted once per launcher (all replicas on this host share it) before the first replica
starts, and unmounted when the launcher stops. ``{image}`` in MODEL and in the engine arguments is the
mount point, e.g. ``coldstart-serve transformers '{image}' --image store/images/model.cidx`` serves a model
whose files are fetched on demand; ``--image-mount /opt/venv`` puts an image where its files expect to be.
After the first replica is ready the boot's read order is saved as the image's profile, so the next
launch prefetches it (``boot_over``, which also records what the boot fetched from beyond the local chunk
cache as ``coldstart_image_fetched_bytes``). The mount's duration is the ``image_mount`` phase of the
end-to-end clock. The image digest is part of the snapshot identity (a snapshot maps these files).

The engine's own environment can be in the image too (the vLLM venv, mounted where it was built with
``--image-mount /opt/coldstart/engines/vllm``, or anywhere with ``--engine-python {image}``: a venv finds
its site-packages from the interpreter's path, not from where it was built): ``engine_in_image`` says when,
and the launcher then asks the engine for its version (``check_installed``) only once the image is mounted.
With CRIU its interpreter and libraries are mapped from under the mount, which is external to the dump like
the model's files; the snapshot identity holds the image digest and the engine version asked there.

An image that holds a root filesystem (a top-level ``usr/``, ``holds_rootfs``) is also the gVisor container's
root with ``--snapshot runsc``: ``snapshots_for`` hands the mount point to the runsc checkpointer it makes
(``RunscCheckpointer(root=...)``; no module global: two deployments of one launcher may mount two images),
and the container starts with only the index on this host. A model-only image stays a directory under the
host's root, as with CRIU.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from coldstart.engine_adapters.base import EngineAdapter
from coldstart.engine_adapters.errors import EngineNotInstalled
from coldstart.engine_adapters.registry import get_adapter
from coldstart.launcher.config import CheckpointerName, ServeConfig
from coldstart.launcher.metrics import ModelMetrics

log = logging.getLogger("coldstart.image")

PLACEHOLDER = "{image}"


def holds_rootfs(mountpoint: Path | None) -> bool:
    """Whether the image mounted at ``mountpoint`` is a root filesystem (the runsc container's root)."""
    return mountpoint is not None and (Path(mountpoint) / "usr").is_dir()


def default_tiers(index: Path) -> list[str]:
    """The origin store an index was built into: ``STORE/images/NAME.cidx`` -> ``STORE``."""
    parent = index.resolve().parent
    return [str(parent.parent if parent.name == "images" else parent)]


def with_mountpoint(config: ServeConfig, mountpoint: Path) -> ServeConfig:
    """``{image}`` in MODEL, ``--engine-python`` and the engine arguments replaced by the mount point
    (recorded as ``image_mount``: what is under it is pinned by the image's digest)."""
    where = str(mountpoint)
    return dataclasses.replace(
        config,
        image_mount=Path(mountpoint),
        model=config.model.replace(PLACEHOLDER, where),
        engine_python=config.engine_python.replace(PLACEHOLDER, where) if config.engine_python else None,
        engine_args=tuple(a.replace(PLACEHOLDER, where) for a in config.engine_args),
    )


def engine_in_image(config: ServeConfig) -> bool:
    """Whether the engine's environment may be inside ``--image``, so that it can be asked for its version
    only once the image is mounted: ``--engine-python`` with ``{image}`` or under ``--image-mount``, or no
    ``--engine-python`` at all (the engine is then looked for where the image may put it, e.g. the set-up's
    ``/opt/coldstart/engines/ENGINE``)."""
    if config.image is None:
        return False
    python = config.engine_python
    if python is None or PLACEHOLDER in python:
        return True
    mount = config.image_mount
    return mount is not None and Path(python).absolute().is_relative_to(Path(mount).absolute())


async def engine_from_image(config: ServeConfig) -> EngineAdapter:
    """The adapter of an engine whose environment may be in the mounted image (``engine_in_image``), asked
    for its version there (a subprocess in that environment) and checked against the engine arguments."""
    adapter = get_adapter(config.engine, engine_python=config.engine_python)
    try:
        await asyncio.to_thread(adapter.check_installed)
    except EngineNotInstalled as exc:
        raise EngineNotInstalled(
            f"{exc}; --image {config.image} is mounted at {config.image_mount}: build it from the engine's "
            "venv (coldstart image build VENV -o STORE) and pass --engine-python '{image}', or mount it "
            "where the venv was made (--image-mount VENV)"
        ) from exc
    adapter.check_engine_args(tuple(config.engine_args))
    return adapter


def hot_tree_fits(config: ServeConfig) -> bool:
    """Whether the image may be shown as a hot tree (``imagefs.hot_tree``: local copies of what the boot
    read, links into the lazy mount for the rest). Not under gVisor: the links name host paths and runsc
    is not measured with them; so not with ``--snapshot runsc`` (or ``auto`` resolving to it), nor for a
    root filesystem image (runsc's container root)."""
    from coldstart.imagefs.index import ROOT, ImageIndex
    from coldstart.launcher.checkpointers.registry import best_available
    from coldstart.launcher.errors import CheckpointerUnavailable

    if config.image is None:
        return False
    checkpointer = str(config.snapshot)
    if checkpointer == CheckpointerName.AUTO:
        try:
            checkpointer = best_available().name
        except CheckpointerUnavailable:
            checkpointer = CheckpointerName.OFF
    if checkpointer == CheckpointerName.RUNSC:
        return False
    index = ImageIndex.open(config.image)
    usr = index.lookup(ROOT, b"usr")
    return usr is None or not index.is_dir(usr)


def engine_mounts(mountpoint: Path) -> tuple[Path, ...]:
    """The host mounts an engine run from the image at ``mountpoint`` uses: the mount point, and the lazy
    mount under it when a hot tree is shown there (CRIU keeps both as external mounts)."""
    from coldstart.imagefs.mount import is_mountpoint, lazy_root_for

    lazy = lazy_root_for(mountpoint)
    return (mountpoint, lazy) if is_mountpoint(lazy) else (mountpoint,)


@contextlib.asynccontextmanager
async def image_mounted(config: ServeConfig, metrics: ModelMetrics | None = None) -> AsyncIterator[Any]:
    """Yields the imagefs ``Mount`` (or None without ``--image``); unmounts on exit, also on errors. The
    mount's duration goes to ``metrics`` as the ``image_mount`` phase."""
    if config.image is None:
        yield None
        return
    from coldstart.imagefs import mounted  # pyfuse3 and trio only when an image is used

    mountpoint = Path(config.image_mount or Path(config.work_dir) / "image")
    mountpoint.mkdir(parents=True, exist_ok=True)
    tiers = [t for t in (config.image_tiers or "").split(",") if t] or default_tiers(Path(config.image))
    cache = Path(config.image_cache or Path(config.snapshot_dir).parent / "chunks")
    started = time.monotonic()
    manager = mounted(config.image, mountpoint, cache, tiers, hot_tree=hot_tree_fits(config))
    mount = await asyncio.to_thread(manager.__enter__)
    if metrics is not None:
        metrics.phase_seconds.labels("image_mount").observe(time.monotonic() - started)
    log.info(
        "image %s mounted at %s in %.2fs (tiers: %s)",
        config.image,
        mountpoint,
        time.monotonic() - started,
        ", ".join(tiers),
        extra={"event": "image_mounted", "duration_s": round(time.monotonic() - started, 3)},
    )
    if mount.hot_tree is not None:
        tree = mount.hot_tree
        log.info(
            "image %s shown as a hot tree: %d files (%.1f MB) the boot reads on local disk (%s in %.2fs), "
            "%d links into the lazy mount at %s",
            config.image, tree.files, tree.bytes / 1e6, "built" if tree.built else "reused", tree.seconds,
            tree.links, mount.lazy_root,
            extra={"event": "image_hot_tree", "files": tree.files, "bytes": tree.bytes},
        )  # fmt: skip
    if await asyncio.to_thread(holds_rootfs, mount.mountpoint):
        log.info("image %s holds a root filesystem: the container root with --snapshot runsc", config.image)
    try:
        yield mount
    finally:
        await asyncio.to_thread(manager.__exit__, None, None, None)
        log.info("image unmounted from %s", mountpoint, extra={"event": "image_unmounted"})


async def boot_over(mount: Any, metrics: ModelMetrics | None = None) -> None:
    """The first replica is ready: save the boot's read order as the image's profile, and record what the
    boot fetched from beyond the local chunk cache (``coldstart_image_fetched_bytes``)."""
    stats = await asyncio.to_thread(mount.boot_stats)
    fetched = stats.get("remote_bytes")
    if not isinstance(fetched, int):
        log.info("image at %s: its daemon reported no stats after the boot", mount.mountpoint)
        return
    if mount.hot_tree is not None:
        fetched += mount.hot_tree.fetched  # what the hot tree's build fetched, before the boot
    if metrics is not None:
        metrics.image_fetched_bytes.set(fetched)
    log.info(
        "image at %s: the boot fetched %.1f MB of %.1f MB",
        mount.mountpoint,
        fetched / 1e6,
        int(stats.get("image_bytes") or 0) / 1e6,
        extra={"event": "image_boot_fetched", "bytes": fetched},
    )
