"""``coldstart recipes ls|show NAME``: the serving recipes shipped with coldstart (``recipes/*.toml``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from coldstart.launcher.recipes import RecipeError, available, load_recipe


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coldstart recipes", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ls", help="list recipes: name, engine, model, snapshot preference, description")
    show = sub.add_parser("show", help="print one recipe, validated and with placeholders filled")
    show.add_argument("name", help="recipe name (see 'ls') or a path to a .toml file")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _ls() -> int:
    rows = [("NAME", "ENGINE", "MODEL", "SNAPSHOT", "DESCRIPTION")]
    for name in available():
        r = load_recipe(name)
        rows.append((name, r.engine, r.served_model_name or r.model, r.snapshot, r.description))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)) + "  " + row[4])
    return 0


def _show(name: str, as_json: bool) -> int:
    recipe = load_recipe(name)
    data = dataclasses.asdict(recipe)
    data["source"] = str(recipe.source)
    if as_json:
        print(json.dumps(data, indent=2))
        return 0
    for key, value in data.items():
        if key in ("warmup", "canary", "env"):
            continue
        print(f"{key:<18} {' '.join(value) if key == 'engine_args' else value}")
    for key, value in sorted(recipe.env.items()):
        print(f"env.{key:<14} {value}")
    for i, request in enumerate(recipe.warmup):
        print(f"warmup[{i}]          POST {request.path} {json.dumps(request.body)}")
    if recipe.canary:
        c = recipe.canary
        print(
            f"canary             {c.prompt!r} max_tokens={c.max_tokens} {'chat' if c.chat else 'completion'}"
        )
    return 0


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "ls":
            return _ls()
        return _show(args.name, args.json)
    except RecipeError as exc:
        print(f"coldstart recipes: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
