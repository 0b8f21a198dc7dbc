"""Deployments files (launcher/deployments.py): the format, scopes, and one-line refusals naming file,
table and key. Pure parsing: nothing starts."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest
from support import REPO, SERVE

from coldstart.launcher.config import (
    CheckpointerName,
    GatewayConfig,
    ServeConfig,
    fields_of,
    parse_bytes,
)
from coldstart.launcher.deployments import load_deployments, single, with_server
from coldstart.launcher.errors import RecipeError, UsageError
from coldstart.launcher.recipes import load_recipe

SERVER_FIELDS = {
    "host",
    "port",
    "api_key",
    "api_key_file",
    "work_dir",
    "snapshot_dir",
    "snapshot_tiers",
    "snapshot_cache",
    "snapshot_publish",
    "snapshot_trust_key",
    "log_format",
    "log_level",
    "max_body_size",
    "read_timeout",
    "units",
    "memory_budget",
    "min_residency",
    "cluster",
    "config",
}

FULL = """
[server]
port = 8100
units = 3
min_residency = 5
snapshot_dir = "snaps"

[models.qwen]
recipe = "vllm-qwen3-0.6b"
engine_args = ["--max-model-len", "512"]
env = { VLLM_ENABLE_V1_MULTIPROCESSING = "0" }
min_replicas = 0
max_replicas = 2
idle_timeout = 60
target_concurrency = 4
weight = 2
priority = 1
snapshot = "cuda"
[[models.qwen.warmup]]
path = "/v1/chat/completions"
body = { messages = [{ role = "user", content = "Hi" }], max_tokens = 4 }
[models.qwen.canary]
prompt = "The capital of France is"
max_tokens = 4

[models."org/tiny"]
engine = "custom"
model = "./models/tiny"
engine_args = ["{python}", "{recipes}/server.py", "--port", "{port}"]
image = "tiny.idx"
"""

MINIMAL = '[models.m]\nengine = "transformers"\nmodel = "/m"\n'


def write(tmp_path: Path, text: str, name: str = "models.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- the format ------------------------------------------------------------------------------------------
def test_full_file_resolves_recipe_paths_names_and_server_options(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    gateway = load_deployments(path)
    assert gateway.names == ("qwen", "org/tiny")
    qwen, tiny = gateway.deployments

    recipe = load_recipe("vllm-qwen3-0.6b")
    assert qwen.engine == "vllm" and qwen.model == "Qwen/Qwen3-0.6B"
    # appended to the recipe's engine args (the recipe's --max-model-len 4096 is overridden by the later one)
    assert qwen.engine_args == (*recipe.engine_args, "--max-model-len", "512")
    assert qwen.engine_env == {**recipe.env, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    assert qwen.served_model_name == "qwen"  # the table names the model, not the recipe's "qwen3-0.6b"
    assert (qwen.max_replicas, qwen.idle_timeout, qwen.weight, qwen.priority) == (2, 60.0, 2.0, 1)
    assert isinstance(qwen.weight, float) and qwen.snapshot is CheckpointerName.CUDA
    assert [w.body["max_tokens"] for w in qwen.warmup] == [4]  # the table's warm-ups replace the recipe's
    assert qwen.canary is not None and qwen.canary.max_tokens == 4
    assert qwen.boot_timeout == recipe.boot_timeout  # keys the table leaves out come from the recipe

    assert tiny.model == str(tmp_path / "models" / "tiny")  # ./ is relative to the file
    assert tiny.engine_args == ("{python}", f"{tmp_path}/server.py", "--port", "{port}")
    assert tiny.image == tmp_path / "tiny.idx" and tiny.weight == 1.0

    server = gateway.server
    assert (server.port, server.units, server.min_residency) == (8100, 3, 5.0)
    assert server.snapshot_dir == tmp_path / "snaps" and server.config == path
    for deployment in gateway.deployments:  # every server option copied into every deployment
        for f in fields_of("server"):
            assert getattr(deployment, f.name) == getattr(server, f.name), f.name
    assert gateway.cpu_units == 3


def test_cpu_units_default_to_the_sum_of_max_replicas(tmp_path: Path) -> None:
    text = MINIMAL + '[models.n]\nengine = "vllm"\nmodel = "x"\nmax_replicas = 3\n'
    gateway = load_deployments(write(tmp_path, text))
    assert gateway.server.units is None and gateway.cpu_units == 4
    assert gateway.deployment("n").max_replicas == 3
    with pytest.raises(KeyError):
        gateway.deployment("nope")


def test_served_model_name_renames_the_table(tmp_path: Path) -> None:
    gateway = load_deployments(write(tmp_path, MINIMAL + 'served_model_name = "public"\n'))
    assert gateway.names == ("public",)


def test_flags_beside_config_override_server(tmp_path: Path) -> None:
    key = write(tmp_path, "s3cret\n", "key")
    text = '[server]\nport = 8100\nhost = "0.0.0.0"\napi_key_file = "key"\n' + MINIMAL
    path = write(tmp_path, text)
    assert load_deployments(path).server.api_key == "s3cret"  # api_key_file relative to the file
    gateway = load_deployments(path, {"port": 9000, "api_key": "flag"})
    assert (gateway.server.port, gateway.server.host, gateway.server.api_key) == (9000, "0.0.0.0", "flag")
    assert gateway.deployments[0].port == 9000 and gateway.deployments[0].api_key == "flag"
    gateway = load_deployments(path, {"api_key_file": key})
    assert gateway.server.api_key == "s3cret"


def test_the_shipped_example_loads() -> None:
    gateway = load_deployments(REPO / "examples" / "two-models.toml")
    assert gateway.names == ("chat", "tiny")
    chat, tiny = gateway.deployments
    assert (chat.engine, tiny.engine) == ("transformers", "custom")
    assert chat.make_model == "tiny" and tiny.make_model == "tiny"
    assert tiny.weight == 2.0 and tiny.priority == 1 and chat.priority == 0


def test_single_is_a_file_of_one(tmp_path: Path) -> None:
    config = ServeConfig(engine="vllm", model="m", port=9001, weight=3.0)
    gateway = single(config)
    assert isinstance(gateway, GatewayConfig) and gateway.names == ("m",)
    assert gateway.deployments == (config,) and gateway.server.port == 9001
    assert gateway.server.engine == ServeConfig().engine  # the server holds only server options
    with pytest.raises(UsageError, match=r"^--weight must be > 0, got 0.0$"):
        single(ServeConfig(model="m", weight=0.0))
    with pytest.raises(UsageError, match=r"^--max-replicas \(1\) must be >= --min-replicas \(2\)$"):
        single(ServeConfig(model="m", min_replicas=2))
    key = write(tmp_path, "k1\nignored\n", "key")
    assert single(ServeConfig(model="m", api_key_file=key)).deployments[0].api_key == "k1"
    with pytest.raises(UsageError, match="give --api-key or --api-key-file, not both"):
        single(ServeConfig(model="m", api_key="a", api_key_file=key))
    with pytest.raises(UsageError, match="is empty: write the key on its first line"):
        single(ServeConfig(model="m", api_key_file=write(tmp_path, "\n", "empty")))


def test_with_server_changes_server_and_every_deployment(tmp_path: Path) -> None:
    gateway = with_server(load_deployments(write(tmp_path, FULL)), api_key="k")
    assert gateway.server.api_key == "k" and all(d.api_key == "k" for d in gateway.deployments)
    with pytest.raises(ValueError, match="not server options: weight"):
        with_server(gateway, weight=2.0)


def test_scopes() -> None:
    assert {f.name for f in fields_of("server")} == SERVER_FIELDS
    deployment = {f.name for f in fields_of("deployment")}
    assert {"engine", "model", "weight", "priority", "recipe", "snapshot", "max_replicas"} <= deployment
    assert not deployment & SERVER_FIELDS
    defaults = ServeConfig()
    assert (defaults.weight, defaults.priority, defaults.units, defaults.min_residency) == (1.0, 0, None, 2.0)
    assert defaults.memory_budget is None and defaults.cluster is None and defaults.config is None


def test_checkpointer_names_are_one_list() -> None:
    field = next(f for f in dataclasses.fields(ServeConfig) if f.name == "snapshot")
    assert list(field.metadata["choices"]) == list(CheckpointerName)
    assert [str(n) for n in CheckpointerName] == ["auto", "criu", "runsc", "cuda", "off"]


@pytest.mark.parametrize(
    ("text", "size"),
    [("17179869184", 17179869184), ("16GiB", 16 * 2**30), ("16 gib", 16 * 2**30), ("500MB", 500 * 10**6)]
    + [("1.5KiB", 1536), ("2TB", 2 * 10**12), ("7B", 7)],
)
def test_parse_bytes(text: str, size: int) -> None:
    assert parse_bytes(text) == size


@pytest.mark.parametrize("text", ["", "lots", "16 GiBs", "-1GiB", "16Gi B", "1e9"])
def test_parse_bytes_refuses_what_it_cannot_read(text: str) -> None:
    with pytest.raises(ValueError, match="is not a size: write bytes or e.g. 16GiB"):
        parse_bytes(text)


# -- refusals: one line naming the file, the table and the key ---------------------------------------
M = "[models.m]"
BAD = [
    # (file text, the message after "deployments file '<path>'")
    (MINIMAL + 'colour = "blue"\n', f", {M}: unknown key 'colour' (valid: engine, model, engine_args, "),
    (
        MINIMAL + "max_replica = 2\n",
        f", {M}: unknown key 'max_replica': did you mean 'max_replicas'? (valid: ",
    ),
    (MINIMAL + 'weight = "heavy"\n', f", {M}: key 'weight' must be a number, got a string 'heavy'"),
    (MINIMAL + "max_replicas = 1.5\n", f", {M}: key 'max_replicas' must be an integer, got a number 1.5"),
    (MINIMAL + "engine_args = [1]\n", f", {M}: key 'engine_args[0]' must be a string, got an integer 1"),
    (MINIMAL + 'snapshot = "fast"\n', f", {M}: key 'snapshot' must be one of auto, criu, runsc, cuda, off"),
    (MINIMAL + "weight = 0\n", f", {M}: key 'weight' must be > 0, got 0.0"),
    (MINIMAL + "weight = -1.5\n", f", {M}: key 'weight' must be > 0, got -1.5"),
    (
        MINIMAL + "min_replicas = 3\nmax_replicas = 2\n",
        f", {M}: key 'max_replicas' (2) must be >= key 'min_replicas' (3)",
    ),
    (
        MINIMAL + "initial_replicas = 2\n",
        f", {M}: key 'max_replicas' (1) must be >= key 'initial_replicas' (2)",
    ),
    (MINIMAL + "port = 9000\n", f", {M}: key 'port' is a server option: put it under [server]"),
    (MINIMAL + "units = 2\n", f", {M}: key 'units' is a server option: put it under [server]"),
    (MINIMAL + 'recipe = "nope"\n', f", {M}: key 'recipe': unknown recipe 'nope'; valid: sglang-qwen3-0.6b"),
    (
        MINIMAL + 'env = {A = "1"}\nengine_env = {B = "2"}\n',
        f", {M}: keys 'env' and 'engine_env' are one option",
    ),
    ('[models.m]\nengine = "transformers"\n', f", {M}: missing key 'model' (or a recipe that sets it)"),
    ('[models.m]\nmodel = "/m"\n', f", {M}: missing key 'engine' (or a recipe that sets it)"),
    (
        '[models.m]\nengine = "vlm"\nmodel = "m"\n',
        f", {M}: key 'engine' must be one of custom, sglang, transformers, vllm, got 'vlm'",
    ),
    (
        MINIMAL + '[models.n]\nengine = "vllm"\nmodel = "x"\nserved_model_name = "m"\n',
        ": [models.m] and [models.n] both serve the model name 'm'",
    ),
    (
        "[server]\nmax_replicas = 2\n" + MINIMAL,
        ", [server]: key 'max_replicas' is per model: put it under each [models.NAME]",
    ),
    ("[server]\nprot = 2\n" + MINIMAL, ", [server]: unknown key 'prot': did you mean 'port'? (valid: host, "),
    ("[server]\nunits = 0\n" + MINIMAL, ", [server]: key 'units' must be >= 1, got 0"),
    ('[server]\nmemory_budget = "lots"\n' + MINIMAL, ", [server]: key 'memory_budget': 'lots' is not a size"),
    ("port = 8000\n" + MINIMAL, ": key 'port' is a server option: put it under [server]"),
    ('engine = "vllm"\n' + MINIMAL, ": key 'engine' is per model: put it under a [models.NAME] table"),
    ("[modles.m]\n", ": unknown top-level key 'modles' (valid: server, models)"),
    ("[server]\nport = 8000\n", ": no [models.NAME] table: add one per model"),
    ('[[models]]\nengine = "x"\n', ": no [models.NAME] table: add one per model (NAME is what clients"),
    ('[models]\nm = "vllm"\n', f", {M}: must be a table of options, got a string"),
    ('[models." "]\nengine = "vllm"\nmodel = "m"\n', ', [models." "]: the table\'s name is the model name'),
    (
        MINIMAL + "[models.m]\n",
        ": not valid TOML: Cannot declare ('models', 'm') twice (at line 4, column 10)",
    ),
    ("[models.m]\nengine = \n", ": not valid TOML: Invalid value (at line 2, column 10)"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_bad_file_is_refused_in_one_line_naming_file_table_and_key(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UsageError) as info:
        load_deployments(path)
    line = str(info.value)
    assert line.startswith(f"deployments file {str(path)!r}{message}"), line
    assert "\n" not in line and info.value.exit_code == 2


def test_missing_file_and_bad_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="does not exist: check --config"):
        load_deployments(tmp_path / "gone.toml")
    write(tmp_path, 'engine = "vllm"\nmodel = "m"\ncolour = 1\n', "mine.toml")
    path = write(tmp_path, '[models.m]\nrecipe = "./mine.toml"\n')
    refused = r"\[models.m\]: key 'recipe': recipe 'mine' .* unknown key 'colour'"
    with pytest.raises(RecipeError, match=refused):
        load_deployments(path)


# -- through the real command -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "message"),
    [
        (MINIMAL + 'colour = "blue"\n', "[models.m]: unknown key 'colour' (valid: engine, model, "),
        ("[models.m]\nengine = \n", "not valid TOML: Invalid value (at line 5, column 10)"),
    ],
)
def test_coldstart_serve_config_refuses_a_bad_file_before_anything_starts(
    tmp_path: Path, text: str, message: str
) -> None:
    work_dir = tmp_path / "run"
    path = write(tmp_path, f'[server]\nwork_dir = "{work_dir}"\nport = 0\n{text}')
    result = subprocess.run([*SERVE, "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"coldstart-serve: error: deployments file '{path}'")
    assert message in lines[0]
    assert not work_dir.exists()  # nothing started: the launcher makes its work dir first thing
