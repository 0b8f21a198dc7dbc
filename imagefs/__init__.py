"""imagefs: lazy, content-addressed images over FUSE, with a tiered chunk cache and boot-profile prefetch.

Standalone (imports nothing else of coldstart). Modules: ``index`` (format), ``store`` (chunk store,
chunking choice), ``build`` (directory / OCI layout / docker-save), ``tiers`` + ``fetcher`` (memory -> disk
-> HTTP caches -> origin, verified), ``fs`` (pyfuse3 operations), ``daemon`` (one mount's process),
``mount`` (library API), ``profile`` (boot profiles), ``server`` (HTTP cache server/origin), ``refs``
(named published trees -- the launcher's snapshots across hosts: publish, find through tiers,
materialize in parallel, gc), ``cli``.

Library API (what the launcher calls for ``coldstart-serve ... --image INDEX``)::

    from coldstart.imagefs import build, image_digest, mounted

    result = build("/path/to/rootfs-or-oci.tar", "/srv/store")   # -> BuildResult(index_path, digest, ...)
    digest = image_digest(result.index_path)   # "sha256:<hex>", verified; put it in the snapshot identity

    with mounted(
        result.index_path,                 # the index (verified on open)
        "/run/coldstart/img",              # an existing empty directory
        "/var/cache/coldstart/chunks",     # local disk cache (created if missing)
        tiers=["http://az-cache:8700", "/srv/store"],   # nearest first; the origin last (dir or URL)
        prefetch=True,                     # prefetch INDEX.profile's chunks in boot order, if present
        record_profile=True,               # record this boot's chunk order to INDEX.profile
    ) as m:                                # returns once the mount is live (daemon in a child process)
        ...                                # run the engine from m.mountpoint
        m.save_profile()                   # when the engine is healthy: the boot is over, write the profile
    # unmounted here, also on exceptions (SIGTERM, grace, SIGKILL, then fusermount3 -u -z if needed)
    m.stats                                # {"remote_bytes", "tiers": {name: {hits, bytes, ...}}, ...}
    m.settings                             # {"read_ahead_kb", "max_background", "bdi", ...}

``mounted`` blocks for the ~0.3 s it takes to mount; an asyncio caller runs it in a worker thread.
Errors are ``coldstart.imagefs.errors.ImageError`` subclasses, one actionable line each.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["build", "image_digest", "mounted", "ImageIndex", "ImageError"]

if TYPE_CHECKING:
    from coldstart.imagefs.build import build
    from coldstart.imagefs.errors import ImageError
    from coldstart.imagefs.index import ImageIndex, image_digest
    from coldstart.imagefs.mount import mounted

_LAZY = {
    "build": "coldstart.imagefs.build",
    "image_digest": "coldstart.imagefs.index",
    "ImageIndex": "coldstart.imagefs.index",
    "ImageError": "coldstart.imagefs.errors",
    "mounted": "coldstart.imagefs.mount",
}


def __getattr__(name: str) -> Any:
    """Import on first use, so ``image_digest`` does not pull in pyfuse3 and trio."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'coldstart.imagefs' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
