"""``coldstart-serve ENGINE MODEL [options] [-- engine args]``: a thin layer over ``server.run``.

Options are generated from ``ServeConfig`` (written once). A drop-in for ``vllm serve``: every flag
coldstart does not own goes to the engine unchanged, in order (``coldstart-serve vllm MODEL
--max-model-len 4096 --dtype bfloat16``); ``--port``, ``--host``, ``--api-key`` and ``--served-model-name``
are the proxy's, as a ``vllm serve`` user expects. Everything after ``--`` goes to the engine too (also
flags coldstart owns). Flags are never abbreviated: an engine flag that is a prefix of one of ours
(``--max`` of ``--max-replicas``) must reach the engine. Parses, validates, builds one config, calls
``run``, maps errors to exit codes (0 ok, 1 failure, 2 usage) and one-line messages.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path

from coldstart.launcher.config import ServeConfig
from coldstart.launcher.errors import USER_ERRORS

DESCRIPTION = """\
Serve MODEL with ENGINE behind an OpenAI-compatible proxy that holds requests while a replica starts,
scales replicas with demand (down to zero after --idle-timeout) and, with --snapshot, restores replicas
from a checkpoint instead of booting them.

examples:
  coldstart-serve transformers ./tiny-model
  coldstart-serve vllm Qwen/Qwen3-0.6B --max-model-len 4096 --dtype bfloat16
  coldstart-serve vllm ./model --snapshot criu -- --max-model-len 512
  coldstart-serve --recipe vllm-qwen3-0.6b
  coldstart-serve custom ./model -- python my_server.py --port {port}
"""


def _field_type(f: dataclasses.Field[object]) -> type:
    hints = typing.get_type_hints(ServeConfig)
    hint = hints[f.name]
    if isinstance(hint, types.UnionType):  # X | None -> X
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coldstart-serve",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Flags not listed here, and everything after '--', are passed to the engine unchanged "
        "(give them after MODEL).",
        allow_abbrev=False,
    )
    for f in dataclasses.fields(ServeConfig):
        if f.name == "engine_args" or f.metadata.get("cli") is False:
            continue
        help_ = f.metadata.get("help", "")
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="?", default=None, metavar=f.name.upper(), help=help_)
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _field_type(f)
        default = f.metadata.get("default_text", f.default)
        shown = f" (default: {default})" if default not in (None, "") else ""
        metavar = {int: "N", float: "SECONDS", Path: "PATH"}.get(kind, "TEXT")
        parser.add_argument(
            flag,
            dest=f.name,
            type=kind,
            default=None,
            help=help_ + shown,
            choices=f.metadata.get("choices"),
            metavar=None if "choices" in f.metadata else metavar,
        )
    return parser


def parse(argv: list[str]) -> ServeConfig:
    """argv -> ServeConfig: recipe values first, then flags the user gave explicitly."""
    engine_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, engine_args = argv[:cut], argv[cut + 1 :]
    args, unknown = build_parser().parse_known_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    if unknown or engine_args:
        given["engine_args"] = (*unknown, *engine_args)
    base = ServeConfig()
    if "recipe" in given:
        from coldstart.launcher.recipes import apply_recipe

        base = apply_recipe(given["recipe"], base)
    if "engine" not in given and not given.get("recipe"):
        build_parser().error("ENGINE and MODEL are required (or --recipe NAME); see --help")
    return dataclasses.replace(base, **given)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from coldstart.launcher.server import run  # after parsing: --help stays fast

    try:
        config = parse(argv)
        run(config)
    except USER_ERRORS as exc:
        print(f"coldstart-serve: error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 1))
    except KeyboardInterrupt:
        return 130
    return 0


__all__ = ["main", "parse"]

if __name__ == "__main__":
    sys.exit(main())
