"""``coldstart``: one entry point, one module per subcommand (as gVisor's runsc/cmd).

Each subcommand module exposes ``main(argv: list[str]) -> int`` and is imported only when used, so
``coldstart pool`` never pays for torch or FUSE imports. Exit codes: 0 ok, 1 failure, 2 usage.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help). Modules own their own argparse and ``--help``.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("coldstart.launcher.cli.demo", "make a tiny local model, serve it, ask it one question"),
    "snapshot": ("coldstart.launcher.cli.snapshot", "list, inspect, remove, gc, push, pull snapshots"),
    "image": ("coldstart.imagefs.cli", "build, mount and serve lazy content-addressed images"),
    "pool": ("coldstart.pool.cli", "GPU buffer pool: inventory, LP sizing, simulator"),
    "recipes": ("coldstart.launcher.cli.recipes", "list and show serving recipes"),
    "node": ("coldstart.launcher.cli.node", "join this machine to a Ray cluster as a coldstart node"),
    "doctor": ("coldstart.launcher.cli.doctor", "check which checkpointers, FUSE and GPUs work here"),
    "logs": ("coldstart.launcher.cli.logs", "the last lines a replica's engine printed (its engine.log)"),
    "make-model": ("coldstart.launcher.tiny_model", "write a tiny random Qwen3-architecture model"),
}


def _usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = ["usage: coldstart COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Serve a model with: coldstart-serve ENGINE MODEL [options] [-- engine args]"]
    lines += ["Many models, one endpoint: coldstart-serve --config FILE.toml [--cluster ray://HEAD:10001]"]
    lines += ["Run 'coldstart COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"coldstart: unknown command {name!r}; valid: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest))


if __name__ == "__main__":
    sys.exit(main())
