"""``coldstart node start|stop``: join this machine to a Ray cluster as a coldstart node (``ray start``).

    coldstart node start --head --node-ip 10.0.0.1 --units 1 --snapshot-dir /srv/snapshots \\
        --snapshot-publish /srv/origin --snapshot-tiers http://10.0.0.1:8700
    coldstart node start --address 10.0.0.1:6379 --node-ip 10.0.0.2 --units 1 --snapshot-dir /srv/snapshots \\
        --snapshot-publish /srv/origin --snapshot-tiers http://10.0.0.1:8700
    coldstart node stop --temp-dir /tmp/ray      # this node's Ray processes only (never 'ray stop')

``start`` writes the node's settings (``launcher/cluster/node.py``) next to Ray's temp dir and runs
``ray start`` with ``COLDSTART_NODE_CONFIG`` pointing at them, so every replica actor placed here uses this
node's snapshot store and tiers. Run as root (CRIU, network namespaces). ``stop`` stops the Ray processes
whose command line names this node's temp dir, and everything under them (workers, replica actors and their
engines), SIGTERM then SIGKILL; ``ray stop`` would stop every Ray node of the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from coldstart.launcher.cluster.node import CONFIG_ENV, CONFIG_NAME, NodeSettings, NodeStart
from coldstart.launcher.config import coldstart_cache
from coldstart.launcher.errors import UsageError
from coldstart.launcher.process import process_tree, signal_listed


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="coldstart node", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    start = sub.add_parser(
        "start",
        help="start Ray on this machine as a coldstart node",
        description="Start Ray here as a coldstart node (as root): the head with --head, any other node "
        "with --address HEAD:6379. Then serve from any machine that reaches the head: coldstart-serve "
        "--config FILE --cluster ray://HEAD:CLIENT_PORT (README: Past one machine: Ray).",
        formatter_class=fmt,
    )
    where = start.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--head", action="store_true", help="the first node (GCS, Ray Client on --client-port)"
    )
    where.add_argument("--address", help="HEAD:6379 of the cluster to join")
    start.add_argument("--node-ip", help="this node's address the others reach (default: Ray's choice)")
    start.add_argument(
        "--units",
        type=int,
        default=1,
        help="CPU units (coldstart_slot) this node runs; GPUs are found by Ray",
    )
    start.add_argument(
        "--snapshot-dir",
        type=Path,
        default=coldstart_cache() / "snapshots",
        help="this node's snapshot store",
    )
    start.add_argument(
        "--work-dir",
        type=Path,
        default=coldstart_cache() / "run",
        help="scratch for replicas (logs, sandboxes)",
    )
    start.add_argument(
        "--snapshot-tiers",
        default="",
        help="comma-separated tiers to pull snapshots from, nearest first (cache server URLs "
        "http://:TOKEN@HOST:PORT, chunk store dirs)",
    )
    start.add_argument(
        "--snapshot-publish", type=Path, help="publish snapshots taken here into this chunk store dir"
    )
    start.add_argument("--snapshot-cache", type=Path, help="keep pulled chunks here")
    start.add_argument(
        "--temp-dir", type=Path, default=Path("/tmp/ray"), help="Ray's temp dir (one per node on a machine)"
    )
    start.add_argument("--port", type=int, default=6379, help="the head's GCS port")
    start.add_argument("--client-port", type=int, default=10001, help="the head's Ray Client port")
    start.add_argument("--ray", default=None, help="the ray command (default: the one beside this python)")
    stop = sub.add_parser(
        "stop",
        help="stop this node's Ray processes (by its temp dir)",
        description="Stop the Ray processes whose command line names --temp-dir and everything under them "
        "(replica actors, their engines): SIGTERM, then SIGKILL after --grace. Other Ray nodes of this "
        "machine are left alone (ray stop would stop them all).",
        formatter_class=fmt,
    )
    stop.add_argument("--temp-dir", type=Path, default=Path("/tmp/ray"), help="the node's Ray temp dir")
    stop.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    return p


def ray_command(given: str | None) -> str:
    if given:
        return given
    beside = Path(sys.executable).parent / "ray"
    found = str(beside) if beside.exists() else shutil.which("ray")
    if not found:
        raise UsageError("the ray command is not installed: pip install 'coldstart[cluster]'")
    return found


def start(args: argparse.Namespace) -> int:
    settings = NodeSettings(
        snapshot_dir=args.snapshot_dir.resolve(),
        work_dir=args.work_dir.resolve(),
        tiers=tuple(t.strip() for t in args.snapshot_tiers.split(",") if t.strip()),
        publish_to=args.snapshot_publish.resolve() if args.snapshot_publish else None,
        chunk_cache=args.snapshot_cache.resolve() if args.snapshot_cache else None,
    )
    node = NodeStart(
        settings,
        head=args.head,
        address=args.address,
        node_ip=args.node_ip,
        units=args.units,
        temp_dir=args.temp_dir.resolve(),
        port=args.port,
        client_port=args.client_port,
    )
    for folder in (settings.snapshot_dir, settings.work_dir, settings.publish_to):
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
    settings.write(node.config_path)
    env = {**os.environ, CONFIG_ENV: str(node.config_path)}
    done = subprocess.run(node.argv(ray_command(args.ray)), env=env)
    if done.returncode == 0:  # Ray's own "next steps" suggest 'ray stop', which stops every node here
        where = f"ray://{args.node_ip or 'HEAD'}:{args.client_port}" if args.head else "ray://HEAD:10001"
        kind = "head" if args.head else "worker"
        print(
            f"coldstart node: started ({kind}, {args.units} unit(s), snapshots in {settings.snapshot_dir}). "
            f"Serve: coldstart-serve --config FILE --cluster {where}. Stop this node: coldstart node stop "
            f"--temp-dir {node.temp_dir} (not 'ray stop': it stops every Ray node of this machine)."
        )
    return done.returncode


def node_processes(temp_dir: Path) -> list[int]:
    """This node's Ray processes and all their descendants: those whose command line names its temp dir,
    and those that inherited ``coldstart node start``'s environment (``COLDSTART_NODE_CONFIG`` = this node's
    settings file): the head's Ray Client servers name neither the temp dir nor a parent of ours."""
    needle = str(temp_dir.resolve()).encode()
    marker = f"{CONFIG_ENV}={temp_dir.resolve() / CONFIG_NAME}".encode()
    roots = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in (proc / "cmdline").read_bytes() or marker in (
                    proc / "environ"
                ).read_bytes().split(b"\0"):
                    roots.append(int(proc.name))
    pids: list[int] = []
    for root in roots:
        pids += [p for p in process_tree(root) if p not in pids]
    return pids


def stop(temp_dir: Path, grace: float) -> list[int]:
    pids = node_processes(temp_dir)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        signal_listed(lambda: node_processes(temp_dir), sig)  # through pidfds: a reused PID is never hit
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.05)
    return pids


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        if args.action == "start":
            return start(args)
        stopped = stop(args.temp_dir, args.grace)
        print(f"stopped {len(stopped)} process(es) of the node at {args.temp_dir}")
        return 0
    except UsageError as exc:
        print(f"coldstart node: {exc}", file=sys.stderr)
        return 2
