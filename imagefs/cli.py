"""``coldstart image build|inspect|mount|umount|serve``: thin commands over the imagefs library.

Each command parses, builds one options object, makes one library call and maps the result to an exit code
(0 ok, 1 failure, 2 usage). Errors print one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from coldstart.imagefs.errors import ImageError, UsageError

LOG_FORMAT = "%(asctime)s imagefs %(levelname)s %(message)s"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="coldstart image", description="Lazy, content-addressed images over FUSE."
    )
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser(
        "build", help="build an index and chunks from a directory, OCI layout or docker-save tar"
    )
    b.add_argument("src", type=Path, help="directory, OCI image layout, or 'docker save' tar")
    b.add_argument("-o", "--output", dest="store", type=Path, required=True, help="chunk store directory")
    b.add_argument("--index", type=Path, help="index path (default STORE/images/NAME.cidx)")
    b.add_argument("--chunk-size", type=int, default=None, help="bytes per chunk (default 256 KiB)")

    i = sub.add_parser("inspect", help="verify an index and print its digest and sizes")
    i.add_argument("index", type=Path)
    i.add_argument("--list", action="store_true", help="also list every path")

    m = sub.add_parser("mount", help="mount an image read-only (foreground; SIGINT/SIGTERM unmounts)")
    m.add_argument("index", type=Path)
    m.add_argument("mountpoint", type=Path)
    m.add_argument("--cache", type=Path, required=True, help="local disk cache directory")
    m.add_argument(
        "--tier",
        action="append",
        default=[],
        help="remote tier, nearest first, origin last: store DIR, file:///DIR or http(s)://HOST:PORT "
        "(default: the store the index lives in, STORE/images/NAME.cidx)",
    )
    m.add_argument("--no-prefetch", action="store_true", help="ignore the boot profile")
    m.add_argument("--no-record", action="store_true", help="do not record a boot profile")
    m.add_argument("--read-ahead-kb", type=int, default=None, help="bdi read_ahead_kb for the mount")
    m.add_argument("--max-background", type=int, default=None, help="FUSE background requests")
    m.add_argument("--memory-mib", type=int, default=128, help="in-memory chunk LRU size")

    u = sub.add_parser("umount", help="unmount a mount point (lazy), e.g. after a crashed daemon")
    u.add_argument("mountpoint", type=Path)

    s = sub.add_parser(
        "serve",
        help="serve chunks over HTTP: a cache server (with --upstream) or an origin",
        description="Serve a chunk store over HTTP. Requires a token: every request but /healthz must carry "
        "it (Authorization: Bearer TOKEN, or a tier URL http://:TOKEN@host:port), since a store of "
        "snapshots holds engines' memory and environment. --no-token serves without (public images only).",
    )
    s.add_argument("--store", type=Path, required=True, help="chunk store directory")
    s.add_argument(
        "--upstream", help="fill misses from this URL (cache server or origin; http://:TOKEN@host:port)"
    )
    s.add_argument(
        "--token-file",
        type=Path,
        help="file holding the token clients must send (required unless --no-token); keep it 0600",
    )
    s.add_argument(
        "--no-token", action="store_true", help="serve without authentication (a store of public images only)"
    )
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8700)
    return p


def _build(args: argparse.Namespace) -> int:
    from coldstart.imagefs.build import build, source_size
    from coldstart.imagefs.store import DEFAULT_CHUNK_SIZE

    chunk_size = args.chunk_size or DEFAULT_CHUNK_SIZE
    if sys.stderr.isatty():
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
        with Progress("[progress.description]{task.description}", *columns, transient=True) as bar:
            task = bar.add_task(f"building {args.src.name}", total=source_size(args.src))
            result = build(args.src, args.store, args.index, chunk_size, lambda n: bar.advance(task, n))
    else:
        result = build(args.src, args.store, args.index, chunk_size)
    print(f"index   {result.index_path}")
    print(f"digest  {result.digest}")
    print(f"files   {result.files}  bytes {result.bytes}  chunks {result.chunks} ({result.new_chunks} new)")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from coldstart.imagefs.index import ImageIndex

    index = ImageIndex.open(args.index)
    info = {
        "digest": index.digest,
        "inodes": index.n_inodes,
        "entries": index.n_dirents,
        "bytes": index.total_bytes,
        "chunks": index.n_chunks,
        "unique_chunks": len(index.all_digests()),
        "chunk_size": index.chunk_size,
    }
    print(json.dumps(info, indent=1))
    if args.list:
        for path, inode in index.walk():
            print(f"{index.mode[inode]:07o} {index.size[inode]:>12} /{path}")
    return 0


def default_tiers(index: Path) -> list[str]:
    """The store an index was built into (STORE/images/NAME.cidx -> STORE), if that is where it lies."""
    store = index.resolve().parent.parent
    if index.resolve().parent.name == "images" and (store / "chunks").is_dir():
        return [str(store)]
    raise UsageError(f"no --tier given and {index} is not inside STORE/images/; pass --tier ORIGIN")


def _mount(args: argparse.Namespace) -> int:
    from coldstart.imagefs.daemon import DEFAULT_MAX_BACKGROUND, DEFAULT_READ_AHEAD_KB, Daemon, MountConfig
    from coldstart.imagefs.mount import is_mountpoint

    if not args.mountpoint.is_dir():
        raise UsageError(f"mount point {args.mountpoint} is not a directory; create it first")
    if is_mountpoint(args.mountpoint):
        raise UsageError(f"{args.mountpoint} is already a mount point; unmount it first")
    config = MountConfig(
        index_path=str(args.index.resolve()),
        mountpoint=str(args.mountpoint.resolve()),
        cache_dir=str(args.cache.resolve()),
        tiers=tuple(args.tier or default_tiers(args.index)),
        prefetch=not args.no_prefetch,
        record_profile=not args.no_record,
        read_ahead_kb=args.read_ahead_kb or DEFAULT_READ_AHEAD_KB,
        max_background=args.max_background or DEFAULT_MAX_BACKGROUND,
        memory_mib=args.memory_mib,
    )
    Daemon(config).run()
    return 0


def _umount(args: argparse.Namespace) -> int:
    from coldstart.imagefs.mount import force_unmount

    force_unmount(args.mountpoint)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from coldstart.imagefs.server import ServerConfig, serve

    if args.token_file is None and not args.no_token:
        raise UsageError(
            "image serve needs --token-file FILE (clients use the tier URL http://:TOKEN@host:port) or "
            "--no-token to serve without authentication"
        )
    token = None
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except OSError as exc:
            raise UsageError(f"--token-file {args.token_file}: {exc.strerror or exc}") from exc
        if not token:
            raise UsageError(f"--token-file {args.token_file} is empty: write a random token into it")
    config = ServerConfig(str(args.store), args.upstream, args.host, args.port, token)
    serve(config)
    return 0


COMMANDS = {"build": _build, "inspect": _inspect, "mount": _mount, "umount": _umount, "serve": _serve}


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and on usage errors (2)
        return int(exc.code or 0)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        return COMMANDS[args.command](args)
    except ImageError as exc:
        print(f"coldstart image {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
