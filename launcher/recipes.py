"""Serving recipes: ``recipes/*.toml`` loaded into a typed, validated ``Recipe``.

    coldstart-serve --recipe tiny-engine          # a name from ``coldstart recipes ls``
    coldstart-serve --recipe ./my-recipe.toml     # or a path

The TOML keys are exactly the fields of ``Recipe`` (and of its nested ``WarmupRequest`` and ``Canary``):
the schema is derived from the dataclasses' type hints, never from a second hand-kept list, so a new field
is a new key. An unknown key or a value of the wrong type is refused naming the key (``canary.max_tokens``,
``warmup[1].path``). Placeholders, filled at load time: ``{recipes}`` (the folder of the recipe file) in
``engine_args``, ``{cache}`` (``$XDG_CACHE_HOME/coldstart``) and ``~`` in ``model``. A recipe may declare
``make_model = "tiny"`` to have a missing local model made by ``coldstart make-model`` on first use.

``check_table`` and ``convert`` are the schema machinery; deployments files (``deployments.py``) use them
against ``ServeConfig``'s type hints.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import coldstart.recipes
from coldstart.launcher.config import (
    Canary,
    CheckpointerName,
    ModelSize,
    ServeConfig,
    WarmupRequest,
    coldstart_cache,
)
from coldstart.launcher.errors import RecipeError

__all__ = [
    "Canary",
    "Recipe",
    "RecipeError",
    "WarmupRequest",
    "apply_recipe",
    "available",
    "check_table",
    "convert",
    "load_recipe",
    "unknown_key",
]

RECIPES_DIR = Path(coldstart.recipes.__file__).resolve().parent


@dataclass(frozen=True)
class Recipe:
    engine: str  # engine adapter: transformers, vllm, sglang or custom
    model: str  # local path or hub name
    description: str = ""
    engine_args: tuple[str, ...] = ()  # passed to the engine unchanged (for custom: the whole command)
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the engine process
    served_model_name: str | None = None
    snapshot: CheckpointerName = CheckpointerName.AUTO
    idle_timeout: float = 300.0  # seconds idle before scale to zero (0 = never)
    boot_timeout: float = 900.0
    warmup: tuple[WarmupRequest, ...] = ()
    canary: Canary | None = None
    make_model: ModelSize | None = None  # make ``model`` with ``coldstart make-model`` when missing
    # Not TOML keys: where the recipe came from.
    name: str = field(default="", metadata={"internal": True})
    source: Path | None = field(default=None, metadata={"internal": True})


# -- lookup --------------------------------------------------------------------------------------------
def available() -> dict[str, Path]:
    """Recipe name -> file, for the recipes shipped with coldstart."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.toml"))}


def _locate(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if name_or_path.endswith(".toml") or os.sep in name_or_path:
        if not path.is_file():
            raise RecipeError(f"recipe file {name_or_path!r} does not exist")
        return path
    known = available()
    if name_or_path not in known:
        raise RecipeError(f"unknown recipe {name_or_path!r}; valid: {', '.join(known) or '(none)'}")
    return known[name_or_path]


def load_recipe(name_or_path: str) -> Recipe:
    """Load, validate and fill placeholders; raises ``RecipeError`` naming the offending key."""
    path = _locate(name_or_path)
    label = f"recipe {path.stem!r} ({path})"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{label}: cannot read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{label}: not valid TOML: {exc}") from exc
    values = check_table(Recipe, data, "", label)
    recipe = Recipe(**values, name=path.stem, source=path.resolve())
    return _fill_placeholders(recipe)


def _fill_placeholders(recipe: Recipe) -> Recipe:
    folder = str(recipe.source.parent) if recipe.source else str(RECIPES_DIR)
    cache = str(coldstart_cache())
    model = os.path.expanduser(recipe.model.replace("{cache}", cache))
    args = tuple(a.replace("{recipes}", folder) for a in recipe.engine_args)
    return dataclasses.replace(recipe, model=model, engine_args=args)


# -- schema from type hints ----------------------------------------------------------------------------
_KIND = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a table"}


def check_table(cls: type, data: object, prefix: str, label: str) -> dict[str, Any]:
    """Check ``data`` (a TOML table) against dataclass ``cls``; return constructor keyword arguments."""
    if not isinstance(data, dict):
        raise RecipeError(f"{label}: key {prefix.rstrip('.') or '(top)'!r} must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in data:
        if key not in fields:
            raise RecipeError(f"{label}: {unknown_key(prefix + key, tuple(prefix + f for f in fields))}")
    out: dict[str, Any] = {}
    for name, f in fields.items():
        if name in data:
            out[name] = convert(data[name], hints[name], prefix + name, label)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{label}: missing key {prefix + name!r}")
    return out


def unknown_key(key: str, valid: tuple[str, ...]) -> str:
    """``unknown key 'max_replica': did you mean 'max_replicas'? (valid: ...)``"""
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f": did you mean {close[0]!r}?" if close else ""
    return f"unknown key {key!r}{hint} (valid: {', '.join(valid)})"


def convert(value: object, tp: Any, key: str, label: str) -> Any:
    """``value`` (from TOML) as type ``tp``, else a ``RecipeError`` naming ``key``. Paths stay relative:
    the caller resolves them against its file."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # X | None: TOML has no null, so X
        return convert(value, next(a for a in args if a is not type(None)), key, label)
    if origin is Literal or (isinstance(tp, type) and issubclass(tp, Enum)):
        choices = args if origin is Literal else tuple(m.value for m in tp)
        if value not in choices:
            raise RecipeError(
                f"{label}: key {key!r} must be one of {', '.join(map(str, choices))}, got {value!r}"
            )
        return value if origin is Literal else tp(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp(**check_table(tp, value, key + ".", label))
    if origin is tuple:
        if not isinstance(value, list):
            raise RecipeError(f"{label}: key {key!r} must be an array, got {_what(value)}")
        return tuple(convert(v, args[0], f"{key}[{i}]", label) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{label}: key {key!r} must be a table, got {_what(value)}")
        if args[1] is Any:
            return dict(value)
        return {k: convert(v, args[1], f"{key}.{k}", label) for k, v in value.items()}
    if tp is Path:
        return Path(convert(value, str, key, label))
    ok = (
        isinstance(value, (int, float)) and not isinstance(value, bool)
        if tp is float
        else isinstance(value, tp) and (tp is bool or not isinstance(value, bool))
    )
    if not ok:
        raise RecipeError(f"{label}: key {key!r} must be {_KIND.get(tp, tp.__name__)}, got {_what(value)}")
    return float(value) if tp is float else value  # type: ignore[arg-type]


def _what(value: object) -> str:
    names = {bool: "a boolean", str: "a string", int: "an integer", float: "a number", list: "an array"}
    return f"{names.get(type(value), type(value).__name__)} {value!r}"[:80]


# -- into coldstart-serve's config ---------------------------------------------------------------------
def apply_recipe(name_or_path: str, base: ServeConfig) -> ServeConfig:
    """``base`` with the recipe's values (flags the user gave are applied on top by the caller). Every
    recipe key has its ``ServeConfig`` field; a missing model the recipe can make is made when serving
    starts (``make_model``), not here."""
    recipe = load_recipe(name_or_path)
    return dataclasses.replace(
        base,
        engine=recipe.engine,
        model=recipe.model,
        engine_args=recipe.engine_args,
        served_model_name=recipe.served_model_name,
        snapshot=recipe.snapshot,
        idle_timeout=recipe.idle_timeout,
        boot_timeout=recipe.boot_timeout,
        engine_env=dict(recipe.env),
        warmup=recipe.warmup,
        canary=recipe.canary,
        make_model=recipe.make_model,
    )
