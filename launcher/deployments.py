"""Deployments files: many models behind one endpoint, written in the recipe vocabulary.

    coldstart-serve --config models.toml            # or -c; server flags beside it override [server]

    [server]                        # optional: host-wide options, one value for every model
    port = 8000
    units = 2                       # CPU slots when the host has no GPU (default: sum of max_replicas)

    [models.qwen]                   # one table per deployment; "qwen" is the model name clients send
    recipe = "vllm-qwen3-0.6b"      # optional base: a recipe name or path; the keys below override it
    engine_args = ["--max-model-len", "512"]     # appended to the recipe's (the engine takes the last)
    env = { VLLM_ENABLE_V1_MULTIPROCESSING = "0" }   # merged into the recipe's
    min_replicas = 0
    max_replicas = 1
    weight = 2.0                    # share of the host's units when models contend
    priority = 1                    # idle replicas of lower priority are evicted first

    [models.tiny]
    engine = "custom"
    model = "{cache}/models/tiny"
    make_model = "tiny"
    [[models.tiny.warmup]]
    path = "/v1/chat/completions"
    body = { messages = [{ role = "user", content = "Hi" }], max_tokens = 4 }
    [models.tiny.canary]
    prompt = "The capital of France is"

The keys are ``ServeConfig``'s field names, derived from its type hints and scopes (``config.scope``),
never from a list kept here: ``[server]`` takes the server-scope fields, a ``[models.NAME]`` table the
per-deployment ones, with ``env`` for ``engine_env`` as in recipes and ``recipe`` for a base. Values are
converted and refused by the recipes' machinery (``recipes.convert``), so a key means the same in a recipe,
a deployments file and on the command line (``--max-replicas`` is ``max_replicas``).

- A table's name is its public model name; ``served_model_name`` in the table renames it (a recipe's
  ``served_model_name`` does not: the table names the model). Public names must be unique.
- With ``recipe``: the recipe's values, then the table's. ``engine_args`` are appended to the recipe's (a
  flag repeated later wins in vLLM, SGLang and argparse engines), ``env`` is merged, every other key replaces.
- Relative paths are relative to the file's folder: ``Path`` options (``image``, ``work_dir``, ...), a
  ``recipe`` path and a ``model`` that starts with ``./`` or ``../``; ``{cache}`` and ``~`` in ``model``,
  ``{recipes}`` in ``engine_args`` is the file's folder (in a recipe, the recipe's).
- Server options: flags beside ``--config`` > ``[server]`` > defaults. Each deployment gets a copy of them.

A file that does not fit fails before anything starts, with one line naming the file, the table and the key
(``RecipeError``, exit code 2): TOML syntax (with its line), an unknown key (with the valid ones), a wrong
type, a server key in a model's table or the reverse, a model without engine or model, an unknown recipe or
engine, ``max_replicas`` below ``min_replicas`` or ``initial_replicas``, an out-of-range value (``weight``
must be > 0: ``config.bound_error``), two tables serving one public name.

Why one table per model keyed by its public name (and not ``[[models]]`` with a ``name`` key): TOML itself
refuses a table declared twice, with its line, and the file reads as what clients send.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from coldstart.launcher.config import (
    FIELDS,
    GatewayConfig,
    ServeConfig,
    bound_error,
    coldstart_cache,
    fields_of,
    parse_bytes,
)
from coldstart.launcher.errors import RecipeError, UsageError
from coldstart.launcher.recipes import apply_recipe, convert, unknown_key

__all__ = ["flag", "load_deployments", "single", "with_server"]

ALIASES = {"env": "engine_env"}  # file key -> field, as recipes spell it
HINTS = typing.get_type_hints(ServeConfig)
SERVER_KEYS = tuple(f.name for f in fields_of("server") if f.name != "config")
MODEL_KEYS = (*(f.name for f in fields_of("deployment")), *ALIASES)

Namer = Callable[[str], str]  # field name -> how the user wrote it (a flag, a file key)


def flag(name: str) -> str:
    """``max_replicas`` -> ``--max-replicas``."""
    return "--" + name.replace("_", "-")


def _key(name: str) -> str:
    return f"key {name!r}"


# -- public API ----------------------------------------------------------------------------------------
def load_deployments(path: Path, server_overrides: dict[str, Any] | None = None) -> GatewayConfig:
    """Read, validate and resolve a deployments file. ``server_overrides`` (server-scope field -> typed
    value, from flags beside ``--config``) win over ``[server]``. Raises ``UsageError`` (``RecipeError``
    for what the file says): one line, exit code 2."""
    path = Path(path)
    label = f"deployments file {str(path)!r}"
    folder = path.resolve().parent
    doc = _read(path, label)
    _check_top(doc, label)
    server_values = _server_values(doc.get("server", {}), folder, f"{label}, [server]")
    server = _server(_merge(server_values, server_overrides or {}), f"{label}, [server]: ", _key)
    server = dataclasses.replace(server, config=path)
    models = doc.get("models")
    if not isinstance(models, dict) or not models:
        got = "" if models is None else f", got {_what(models)}"
        raise RecipeError(
            f"{label}: no [models.NAME] table: add one per model (NAME is what clients send){got}"
        )
    deployments = tuple(_deployment(name, table, server, folder, label) for name, table in models.items())
    _check_unique(deployments, list(models), label)
    return GatewayConfig(server=server, deployments=deployments)


def single(config: ServeConfig) -> GatewayConfig:
    """``coldstart-serve ENGINE MODEL ...``: a gateway of one deployment (a deployments file of one).
    Checks bounds and replica bounds (naming flags), reads ``api_key_file``."""
    _check_values(config, FIELDS, "", flag)
    server = _server({n: getattr(config, n) for n in (*SERVER_KEYS, "config")}, "", flag)
    return GatewayConfig(server=server, deployments=(_with_server_fields(config, server),))


def with_server(gateway: GatewayConfig, **changes: Any) -> GatewayConfig:
    """``gateway`` with server-scope ``changes`` made to the server and every deployment alike."""
    wrong = [name for name in changes if name not in (*SERVER_KEYS, "config")]
    if wrong:
        raise ValueError(f"not server options: {', '.join(wrong)}")
    return GatewayConfig(
        server=dataclasses.replace(gateway.server, **changes),
        deployments=tuple(dataclasses.replace(d, **changes) for d in gateway.deployments),
    )


# -- the file and its top level ------------------------------------------------------------------------
def _read(path: Path, label: str) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise RecipeError(f"{label} does not exist: check --config") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{label}: cannot read it: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{label}: not valid TOML: {exc}") from exc


def _check_top(doc: dict[str, Any], label: str) -> None:
    for key in doc:
        if key in ("server", "models"):
            continue
        if key in SERVER_KEYS:
            raise RecipeError(f"{label}: key {key!r} is a server option: put it under [server]")
        if key in MODEL_KEYS:
            raise RecipeError(f"{label}: key {key!r} is per model: put it under a [models.NAME] table")
        raise RecipeError(f"{label}: unknown top-level key {key!r} (valid: server, models)")


def _what(value: object) -> str:
    kinds = {dict: "a table", list: "an array", str: "a string", bool: "a boolean"}
    return kinds.get(type(value), f"a {type(value).__name__}")


def _table_ref(name: str) -> str:
    bare = name and all(c.isalnum() or c in "-_" for c in name)
    return f"[models.{name}]" if bare else f'[models."{name}"]'


# -- [server] ------------------------------------------------------------------------------------------
def _server_values(table: object, folder: Path, where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise RecipeError(f"{where}: must be a table of server options, got {_what(table)}")
    for key in table:
        if key in MODEL_KEYS:
            raise RecipeError(
                f"{where}: key {key!r} is per model: put it under each [models.NAME] table that needs it"
            )
        if key not in SERVER_KEYS:
            raise RecipeError(f"{where}: {unknown_key(key, SERVER_KEYS)}")
    return _resolve_paths(_convert_all(table, where), folder)


def _merge(values: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``[server]`` under the flags; a flag for the API key replaces the file's key in either spelling."""
    if overrides.keys() & {"api_key", "api_key_file"}:
        values = {k: v for k, v in values.items() if k not in ("api_key", "api_key_file")}
    return {**values, **overrides}


def _server(values: dict[str, Any], where: str, name: Namer) -> ServeConfig:
    """The server's ``ServeConfig`` from server-scope ``values``: checked, API key read from its file."""
    server = ServeConfig(**values)
    _check_values(server, values, where, name)
    return dataclasses.replace(server, api_key=_api_key(server, where, name))


def _api_key(server: ServeConfig, where: str, name: Namer) -> str | None:
    if server.api_key_file is None:
        return server.api_key
    if server.api_key:
        raise UsageError(f"{where}give {name('api_key')} or {name('api_key_file')}, not both")
    try:
        lines = Path(server.api_key_file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{where}{name('api_key_file')}: cannot read {server.api_key_file}: {exc}") from exc
    key = lines[0].strip() if lines else ""
    if not key:
        raise UsageError(
            f"{where}{name('api_key_file')}: {server.api_key_file} is empty: write the key on its first line"
        )
    return key


# -- [models.NAME] -------------------------------------------------------------------------------------
def _deployment(name: str, table: object, server: ServeConfig, folder: Path, label: str) -> ServeConfig:
    where = f"{label}, {_table_ref(name)}"
    if not isinstance(table, dict):
        raise RecipeError(f"{where}: must be a table of options, got {_what(table)}")
    if not name.strip():
        raise RecipeError(f"{where}: the table's name is the model name clients send: it may not be blank")
    values = _model_values(table, folder, where)
    base = _with_server_fields(ServeConfig(), server)
    if "recipe" in values:
        base = _with_recipe(values["recipe"], base, folder, where)
        values["engine_args"] = (*base.engine_args, *values.get("engine_args", ()))
        values["engine_env"] = {**base.engine_env, **values.get("engine_env", {})}
    else:
        for required in ("engine", "model"):
            if required not in values:
                raise RecipeError(f"{where}: missing key {required!r} (or a recipe that sets it)")
    values.setdefault("served_model_name", name)
    deployment = dataclasses.replace(base, **values)
    _check_engine(deployment.engine, where)
    _check_values(deployment, values, f"{where}: ", _key)
    return deployment


def _model_values(table: dict[str, Any], folder: Path, where: str) -> dict[str, Any]:
    for key in table:
        if key in SERVER_KEYS or key == "config":
            raise RecipeError(f"{where}: key {key!r} is a server option: put it under [server] (one for all)")
        if key not in MODEL_KEYS:
            raise RecipeError(f"{where}: {unknown_key(key, MODEL_KEYS)}")
    if "env" in table and "engine_env" in table:
        raise RecipeError(f"{where}: keys 'env' and 'engine_env' are one option: keep one")
    values = {ALIASES.get(k, k): v for k, v in _convert_all(table, where).items()}
    values = _resolve_paths(values, folder)
    if "model" in values:
        values["model"] = _model_path(values["model"], folder)
    if "engine_args" in values:
        values["engine_args"] = tuple(a.replace("{recipes}", str(folder)) for a in values["engine_args"])
    return values


def _with_recipe(recipe: str, base: ServeConfig, folder: Path, where: str) -> ServeConfig:
    if recipe.endswith(".toml") or os.sep in recipe:
        recipe = str(folder / Path(recipe).expanduser())
    try:
        return apply_recipe(recipe, base)
    except RecipeError as exc:
        raise RecipeError(f"{where}: key 'recipe': {exc}") from exc


def _check_engine(engine: str, where: str) -> None:
    from coldstart.engine_adapters.registry import ADAPTERS

    if engine not in ADAPTERS:
        raise RecipeError(
            f"{where}: key 'engine' must be one of {', '.join(sorted(ADAPTERS))}, got {engine!r}"
        )


def _check_unique(deployments: Iterable[ServeConfig], tables: list[str], label: str) -> None:
    seen: dict[str, str] = {}
    for deployment, table in zip(deployments, tables, strict=True):
        public = deployment.public_model_name
        if public in seen:
            raise RecipeError(
                f"{label}: {_table_ref(seen[public])} and {_table_ref(table)} both serve the model name "
                f"{public!r}: give one another table name or served_model_name"
            )
        seen[public] = table


# -- shared ----------------------------------------------------------------------------------------------
def _convert_all(table: dict[str, Any], where: str) -> dict[str, Any]:
    return {k: convert(v, HINTS[ALIASES.get(k, k)], k, where) for k, v in table.items()}


def _resolve_paths(values: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Relative ``Path`` values against the file's folder (``~`` expanded)."""
    return {k: folder / v.expanduser() if isinstance(v, Path) else v for k, v in values.items()}


def _model_path(model: str, folder: Path) -> str:
    model = os.path.expanduser(model.replace("{cache}", str(coldstart_cache())))
    if model.startswith(("./", "../")):
        return os.path.normpath(folder / model)
    return model


def _with_server_fields(config: ServeConfig, server: ServeConfig) -> ServeConfig:
    return dataclasses.replace(config, **{n: getattr(server, n) for n in (*SERVER_KEYS, "config")})


def _check_values(config: ServeConfig, names: Iterable[str], where: str, name: Namer) -> None:
    """Bounds of the fields in ``names`` (``ge``/``gt``/``le``), replica bounds, the memory budget."""
    for field_name in names:
        problem = bound_error(FIELDS[field_name], getattr(config, field_name))
        if problem:
            raise UsageError(f"{where}{name(field_name)} {problem}")
    lowest = max(config.min_replicas, config.initial_replicas)
    if config.max_replicas < lowest:
        other = "min_replicas" if config.min_replicas == lowest else "initial_replicas"
        raise UsageError(
            f"{where}{name('max_replicas')} ({config.max_replicas}) must be >= {name(other)} ({lowest})"
        )
    if config.memory_budget is not None:
        try:
            parse_bytes(config.memory_budget)
        except ValueError as exc:
            raise UsageError(f"{where}{name('memory_budget')}: {exc}") from exc
