"""``coldstart-cuda-checkpoint``: NVIDIA's ``cuda-checkpoint`` command line on our driver-API wrapper.

    coldstart-cuda-checkpoint --toggle --pid PID [--device-map OLD=NEW,...] [--timeout MS]
    coldstart-cuda-checkpoint --action lock|checkpoint|restore|unlock --pid PID [--timeout MS]
                              [--device-map OLD=NEW,...]
    coldstart-cuda-checkpoint --get-state --pid PID        # prints running|locked|checkpointed|failed
    coldstart-cuda-checkpoint --get-restore-tid --pid PID  # prints the CUDA restore thread id

Same arguments and output as NVIDIA's tool, so gVisor's ``runsc checkpoint --cuda-checkpoint-path`` (which
runs ``<path> --toggle --pid P`` in the sandbox) and CRIU's CUDA plugin (``--get-state``, ``--action``,
``--get-restore-tid``, and ``-h`` to probe flags) can run it. ``--toggle``: RUNNING -> lock + checkpoint;
CHECKPOINTED -> restore + unlock. Exit codes: 0 ok, 1 failure (one line on stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from coldstart.launcher.errors import ColdstartError
from coldstart.launcher.gpu.driver import CudaCheckpointAPI, CudaProcessState

HELP = """\
CUDA checkpoint and restore utility (coldstart, on the CUDA driver API).

Operations:
--get-state --pid <pid>
        Prints the current checkpoint state of the process specified by <pid>

--action lock | checkpoint | restore | unlock --pid <pid> [--timeout <ms>] [--device-map <old>=<new>,...]
        Performs the specified action on <pid>.
        For the lock action a timeout can be provided, the lock operation will wait up to <ms> milliseconds.
        For the restore action --device-map restores onto other GPUs (UUIDs as nvidia-smi -L prints them).

--toggle --pid <pid>
        Toggles the CUDA state in the specified process between the running and checkpointed states

--get-restore-tid --pid <pid>
        Retrieves the CUDA restore thread ID of the process specified by <pid>

Options:
--pid|-p <pid>
        The pid upon which to perform the operation

--timeout|-t <timeout>
        Optional timeout that can be specified for the lock action in milliseconds

--device-map|-d <old>=<new>[,<old>=<new>...]
        GPU UUID pairs for restore (driver r580+)

--help|-h
        Print this help message
"""


@dataclass(frozen=True)
class Options:
    operation: str  # get-state | get-restore-tid | toggle | lock | checkpoint | restore | unlock
    pid: int
    timeout_ms: int = 0
    device_map: dict[str, str] | None = None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _Usage(message)


class _Usage(Exception):
    pass


def parse(argv: list[str]) -> Options:
    p = _Parser(prog="coldstart-cuda-checkpoint", add_help=False)
    ops = p.add_mutually_exclusive_group(required=True)
    ops.add_argument("--get-state", action="store_true")
    ops.add_argument("--get-restore-tid", action="store_true")
    ops.add_argument("--toggle", action="store_true")
    ops.add_argument("--action", choices=["lock", "checkpoint", "restore", "unlock"])
    p.add_argument("--pid", "-p", type=int, required=True)
    p.add_argument("--timeout", "-t", type=int, default=0)
    p.add_argument("--device-map", "-d", default=None)
    args = p.parse_args(argv)
    if args.pid <= 0:
        raise _Usage(f"--pid must be a positive process id, not {args.pid}")
    if args.timeout < 0:
        raise _Usage("--timeout must be >= 0 milliseconds")
    operation = (
        "get-state"
        if args.get_state
        else "get-restore-tid"
        if args.get_restore_tid
        else "toggle"
        if args.toggle
        else args.action
    )
    return Options(operation, args.pid, args.timeout, parse_device_map(args.device_map))


def parse_device_map(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    pairs: dict[str, str] = {}
    for item in text.split(","):
        sep = "=" if "=" in item else ":" if item.count(":") == 1 else None
        old, new = item.split(sep, 1) if sep else (item, "")
        if not old.strip() or not new.strip():
            raise _Usage(f"--device-map item {item!r}: expected OLD-UUID=NEW-UUID")
        pairs[old.strip()] = new.strip()
    return pairs


def run(options: Options, api: CudaCheckpointAPI) -> str:
    """Perform one operation; returns what to print (may be empty)."""
    pid = options.pid
    timeout_s = options.timeout_ms / 1000 if options.timeout_ms else None
    match options.operation:
        case "get-state":
            return api.state(pid).label
        case "get-restore-tid":
            return str(api.restore_thread_id(pid))
        case "lock":
            api.lock(pid, timeout_s)
        case "checkpoint":
            api.checkpoint(pid)
        case "restore":
            api.restore(pid, options.device_map)
        case "unlock":
            api.unlock(pid)
        case "toggle":
            state = api.state(pid)
            if state is CudaProcessState.RUNNING:
                api.lock(pid, timeout_s)
                try:
                    api.checkpoint(pid)
                except ColdstartError:
                    api.unlock(pid)  # leave it running, as we found it
                    raise
            elif state is CudaProcessState.CHECKPOINTED:
                api.restore(pid, options.device_map)
                api.unlock(pid)
            else:
                raise ColdstartError(
                    f"cannot toggle CUDA process {pid} in state {state.label}: "
                    "use --action checkpoint or --action unlock"
                )
    return ""


def main(argv: list[str] | None = None, *, api: CudaCheckpointAPI | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or "-h" in args or "--help" in args:
        print(HELP, end="")
        return 0 if args else 2
    try:
        options = parse(args)
    except _Usage as exc:
        print(f"coldstart-cuda-checkpoint: {exc} (see --help)", file=sys.stderr)
        return 2
    try:
        out = run(options, api or CudaCheckpointAPI())
    except ColdstartError as exc:
        print(f"coldstart-cuda-checkpoint: {exc}", file=sys.stderr)
        return exc.exit_code
    if out:
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
