"""``coldstart-serve``: a thin layer over ``server.run``, in two forms.

    coldstart-serve ENGINE MODEL [options] [-- engine args]     one model (a deployments file of one)
    coldstart-serve --config FILE [server options]              every model a deployments file names

Options are generated from ``ServeConfig`` (written once) and grouped by scope (``config.scope``): server
options may be given beside ``--config`` and override the file's ``[server]``; per-model options belong to
the one-model form (beside ``--config`` they are a usage error naming them).

A drop-in for ``vllm serve``: every flag coldstart does not own goes to the engine unchanged, in order
(``coldstart-serve vllm MODEL --max-model-len 4096 --dtype bfloat16``); ``--port``, ``--host``,
``--api-key`` and ``--served-model-name`` are the proxy's, as a ``vllm serve`` user expects. Everything
after ``--`` goes to the engine too (also flags coldstart owns). Engine flags are appended to a recipe's
engine arguments, never replace them. Flags are never abbreviated: an engine flag that is a prefix of one of
ours (``--max`` of ``--max-replicas``) must reach the engine.

ENGINE and MODEL are not argparse positionals: with optional positionals ``parse_known_args`` gave the value
of an engine flag to ENGINE (``--recipe R --max-model-len 512`` failed with "unknown engine '512'"). Our
flags are parsed first; ENGINE and MODEL are then the leading words of what is left, and the rest, in order,
is the engine's. ``-c`` is turned into ``--config`` only as a word of its own: argparse would read an engine
flag ``-cc X`` as ``-c c``.

Parses, validates, builds one ``GatewayConfig``, calls ``run``, maps errors to exit codes (0 ok, 1 failure,
2 usage) and one-line messages.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from coldstart.launcher.config import FIELDS, GatewayConfig, ServeConfig, bound_error, scope
from coldstart.launcher.deployments import flag, load_deployments, single, with_server
from coldstart.launcher.errors import USER_ERRORS, UsageError

API_KEY_ENV = "COLDSTART_API_KEY"

DESCRIPTION = f"""\
Serve models behind one OpenAI-compatible endpoint that holds requests while a replica starts, scales
replicas with demand (down to zero after --idle-timeout) and, with --snapshot, restores replicas from a
checkpoint instead of booting them.

two forms:
  coldstart-serve ENGINE MODEL [options] [-- engine args]   one model
  coldstart-serve --config FILE [server options]            every model a deployments file names

one model:
  coldstart-serve transformers ./tiny-model
  coldstart-serve vllm Qwen/Qwen3-0.6B --max-model-len 4096 --dtype bfloat16
  coldstart-serve vllm ./model --snapshot criu -- --max-model-len 512
  coldstart-serve --recipe vllm-qwen3-0.6b --max-model-len 2048   # appended to the recipe's engine args
  coldstart-serve custom ./model -- python my_server.py --port {{port}}

many models, one endpoint (README: "Many models, one endpoint"; clients pick one by its table name):
  coldstart-serve --config examples/two-models.toml --port 8080

  [server]                      # optional: server options (flags beside --config override them)
  port = 8000
  [models.tiny]                 # the model name clients send
  recipe = "tiny-engine"        # optional base; the keys below override it
  max_replicas = 2
  [models.chat]
  engine = "transformers"
  model = "./models/tiny"       # relative to the file
  weight = 2.0

A deployments file or recipe that does not fit is refused before anything starts, with one line naming the
file, the model's table and the key (the keys are the options below, with '_' for '-').

API key: --api-key KEY is visible to every local user in the process list; prefer --api-key-file PATH or
${API_KEY_ENV} (used when neither flag nor the file's [server] sets a key).
"""

EPILOG = """\
Flags not listed here, and everything after '--', are passed to the engine unchanged (give them after
MODEL). vLLM's own --config goes after '--'.
"""

METAVARS: dict[type, str] = {int: "N", float: "SECONDS", Path: "PATH"}


def _field_type(f: dataclasses.Field[Any]) -> type:
    hint = typing.get_type_hints(ServeConfig)[f.name]
    if isinstance(hint, types.UnionType):  # X | None -> X
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.cast(type, hint)


def _enum_type(kind: type[enum.Enum]) -> Callable[[str], object]:
    """The member for a valid name, else the text itself, so that ``choices`` says what is valid."""
    return lambda text: kind(text) if text in {m.value for m in kind} else text


def _add_option(group: argparse._ArgumentGroup, f: dataclasses.Field[Any]) -> None:
    kind = _field_type(f)
    default = f.metadata.get("default_text", f.default)
    shown = f" (default: {default})" if default not in (None, "", dataclasses.MISSING) else ""
    choices = f.metadata.get("choices")
    group.add_argument(
        flag(f.name),
        dest=f.name,
        type=_enum_type(kind) if issubclass(kind, enum.Enum) else kind,
        default=None,
        help=(f.metadata.get("help", "") + shown).replace("%", "%%"),
        choices=[str(c) for c in choices] if choices else None,
        metavar=None if choices else f.metadata.get("metavar", METAVARS.get(kind, "TEXT")),
    )


def build_parser() -> argparse.ArgumentParser:
    """Our flags only: ENGINE and MODEL are read from what argparse leaves (``_split_rest``)."""
    parser = argparse.ArgumentParser(
        prog="coldstart-serve",
        usage="%(prog)s ENGINE MODEL [options] [-- engine args]\n"
        "       %(prog)s --config FILE [server options]",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        allow_abbrev=False,
    )
    groups = {
        "server": parser.add_argument_group(
            "server options", "one value for the whole endpoint; beside --config they override [server]"
        ),
        "deployment": parser.add_argument_group(
            "per-model options",
            "the one-model form; in a deployments file, keys of [models.NAME]\n"
            f"ENGINE                {FIELDS['engine'].metadata['help']}\n"
            f"MODEL                 {FIELDS['model'].metadata['help']}",
        ),
    }
    for f in FIELDS.values():
        if (
            f.metadata.get("cli") is not False
            and not f.metadata.get("positional")
            and f.name != "engine_args"
        ):
            _add_option(groups[scope(f)], f)
    return parser


def parse(argv: Sequence[str]) -> GatewayConfig:
    """argv -> GatewayConfig. One model: recipe values, then the flags given, engine flags appended to the
    recipe's. ``--config FILE``: the file, its ``[server]`` overridden by server flags. Raises
    ``UsageError`` (and argparse exits 2 on a malformed flag)."""
    ours, after_dashes = _split_dashes(argv)
    args, rest = build_parser().parse_known_args(["--config" if a == "-c" else a for a in ours])
    given = {k: v for k, v in vars(args).items() if v is not None}
    _check_flag_bounds(given)
    if "config" in given:
        gateway = _file_form(given, rest, after_dashes)
    else:
        gateway = single(_one_model(given, rest, after_dashes))
    env_key = os.environ.get(API_KEY_ENV, "").strip()
    if gateway.server.api_key is None and env_key:
        gateway = with_server(gateway, api_key=env_key)
    return gateway


def _split_dashes(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1 :]


def _check_flag_bounds(given: dict[str, Any]) -> None:
    for name, value in given.items():
        problem = bound_error(FIELDS[name], value)
        if problem:
            raise UsageError(f"{flag(name)} {problem}")


def _split_rest(rest: list[str], *, needed: int) -> tuple[list[str], list[str]]:
    """What argparse left -> (ENGINE [MODEL], engine args): the leading words are the positionals (at most
    two), the rest goes to the engine in order. ``needed`` positionals are required."""
    count = 0
    while count < min(2, len(rest)) and not rest[count].startswith("-"):
        count += 1
    if count < needed:
        if count < len(rest):
            raise UsageError(
                f"{rest[count]!r} before ENGINE MODEL: engine flags go after MODEL "
                "(coldstart-serve ENGINE MODEL [options] [-- engine args]; see --help)"
            )
        raise UsageError("ENGINE and MODEL are required (or --recipe NAME, or --config FILE); see --help")
    return rest[:count], rest[count:]


def _one_model(given: dict[str, Any], rest: list[str], after_dashes: list[str]) -> ServeConfig:
    base = ServeConfig()
    if "recipe" in given:
        from coldstart.launcher.recipes import apply_recipe

        base = apply_recipe(given["recipe"], base)
    positionals, engine_flags = _split_rest(rest, needed=0 if "recipe" in given else 2)
    given.update(zip(("engine", "model"), positionals, strict=False))
    if engine_flags or after_dashes:
        given["engine_args"] = (*base.engine_args, *engine_flags, *after_dashes)
    return dataclasses.replace(base, **given)


def _file_form(given: dict[str, Any], rest: list[str], after_dashes: list[str]) -> GatewayConfig:
    path = given.pop("config")
    if rest and not rest[0].startswith("-"):
        raise UsageError(f"ENGINE MODEL ({' '.join(rest[:2])}) and --config are two forms: give one")
    if rest or after_dashes:
        extra = " ".join([*rest, *after_dashes])
        raise UsageError(
            f"engine arguments beside --config ({extra}): "
            f"write them as engine_args under [models.NAME] in {path}"
        )
    per_model = [name for name in given if scope(FIELDS[name]) == "deployment"]
    if per_model:
        name = per_model[0]
        raise UsageError(
            f"{flag(name)} is per model: write {name} = ... under [models.NAME] in {path} (beside --config "
            "only server options go: see --help)"
        )
    return load_deployments(Path(path), given)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        gateway = parse(argv)
        from coldstart.launcher.server import run  # after parsing: --help stays fast

        run(gateway)
    except USER_ERRORS as exc:
        print(f"coldstart-serve: error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 1))
    except KeyboardInterrupt:
        return 130
    return 0


__all__ = ["main", "parse"]

if __name__ == "__main__":
    sys.exit(main())
