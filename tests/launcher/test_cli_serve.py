"""``coldstart-serve``'s command line (launcher/cli/serve.py): the two forms, engine flags in order, flags
appended to a recipe's, the API key kept out of the process list. Parsing only: nothing starts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from support import SERVE

from coldstart.launcher.cli.serve import parse
from coldstart.launcher.config import CheckpointerName
from coldstart.launcher.errors import UsageError
from coldstart.launcher.recipes import load_recipe

MODELS = '[server]\nport = 8100\n[models.a]\nengine = "transformers"\nmodel = "/a"\n'


@pytest.fixture(autouse=True)
def no_key_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLDSTART_API_KEY", raising=False)


def test_engine_flags_after_a_recipe_reach_the_engine_in_order() -> None:
    """Used to fail with "unknown engine '512'": an optional ENGINE positional took the flag's value."""
    gateway = parse(["--recipe", "tiny-engine", "--max-model-len", "512", "--port", "9000", "--dtype", "x"])
    (config,) = gateway.deployments
    recipe = load_recipe("tiny-engine")
    assert config.engine == "custom" and config.model == recipe.model
    assert config.engine_args == (*recipe.engine_args, "--max-model-len", "512", "--dtype", "x")
    assert config.port == 9000


def test_engine_flags_after_model_in_order_around_ours() -> None:
    argv = [
        "vllm",
        "M",
        "--max-model-len",
        "512",
        "--snapshot",
        "criu",
        "-cc",
        "{}",
        "--foo=-1",
        "--",
        "--port",
    ]
    (config,) = parse(argv).deployments
    assert (config.engine, config.model, config.snapshot) == ("vllm", "M", CheckpointerName.CRIU)
    # -cc is the engine's (not -c c); after -- even our own flags go to the engine
    assert config.engine_args == ("--max-model-len", "512", "-cc", "{}", "--foo=-1", "--port")


def test_recipe_engine_args_are_appended_to_not_replaced() -> None:
    """Issue 18: ``--recipe R -- ARGS`` dropped the recipe's --max-model-len and --gpu-memory-utilization."""
    recipe = load_recipe("vllm-qwen3-0.6b")
    (config,) = parse(["--recipe", "vllm-qwen3-0.6b", "--", "--dtype", "bfloat16"]).deployments
    assert config.engine_args == (*recipe.engine_args, "--dtype", "bfloat16")
    (config,) = parse(["--recipe", "vllm-qwen3-0.6b"]).deployments
    assert config.engine_args == recipe.engine_args
    (config,) = parse(["--recipe", "vllm-qwen3-0.6b", "vllm", "other/model", "--seed", "1"]).deployments
    assert config.model == "other/model" and config.engine_args == (*recipe.engine_args, "--seed", "1")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["vllm"], "ENGINE and MODEL are required (or --recipe NAME, or --config FILE)"),
        ([], "ENGINE and MODEL are required"),
        (["--dtype", "x", "vllm", "M"], "'--dtype' before ENGINE MODEL: engine flags go after MODEL"),
        (["vllm", "M", "--weight", "0"], "--weight must be > 0, got 0.0"),
        (["vllm", "M", "--min-replicas", "2"], "--max-replicas (1) must be >= --min-replicas (2)"),
        (["vllm", "M", "--memory-budget", "lots"], "--memory-budget: 'lots' is not a size"),
    ],
)
def test_one_model_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as info:
        parse(argv)
    assert str(info.value).startswith(message) and info.value.exit_code == 2


def test_config_form_with_server_flags_beside_it(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(MODELS)
    for option in ("--config", "-c"):
        gateway = parse([option, str(path), "--port", "9000", "--units", "2"])
        assert gateway.names == ("a",) and gateway.server.port == 9000 and gateway.server.units == 2
        assert gateway.deployments[0].port == 9000 and gateway.server.config == path
    assert parse(["-c", str(path)]).server.port == 8100  # the file's [server] without flags


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--max-replicas", "3"],
            "--max-replicas is per model: write max_replicas = ... under [models.NAME] in",
        ),
        (["--recipe", "tiny-engine"], "--recipe is per model: write recipe = ..."),
        (["vllm", "M"], "ENGINE MODEL (vllm M) and --config are two forms: give one"),
        (["--", "--dtype", "x"], "engine arguments beside --config (--dtype x): write them as engine_args"),
        (["--dtype", "x"], "engine arguments beside --config (--dtype x)"),
    ],
)
def test_per_model_options_beside_config_are_usage_errors(
    tmp_path: Path, extra: list[str], message: str
) -> None:
    path = tmp_path / "models.toml"
    path.write_text(MODELS)
    with pytest.raises(UsageError) as info:
        parse(["--config", str(path), *extra])
    assert str(info.value).startswith(message)


def test_api_key_from_file_or_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert parse(["t", "/m", "--api-key-file", str(key_file)]).server.api_key == "from-file"
    monkeypatch.setenv("COLDSTART_API_KEY", "from-env")
    (config,) = parse(["t", "/m"]).deployments
    assert config.api_key == "from-env"
    assert parse(["t", "/m", "--api-key", "flag"]).server.api_key == "flag"  # a flag wins over the variable
    assert parse(["t", "/m", "--api-key-file", str(key_file)]).server.api_key == "from-file"
    path = tmp_path / "models.toml"
    path.write_text('[server]\napi_key_file = "key"\n' + MODELS.replace("[server]\n", ""))
    assert parse(["-c", str(path)]).server.api_key == "from-file"  # the file's [server] wins too
    with pytest.raises(UsageError, match="^--api-key-file: cannot read"):
        parse(["t", "/m", "--api-key-file", str(tmp_path / "missing")])


def test_help_explains_both_forms_and_the_key_options() -> None:
    result = subprocess.run([*SERVE, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for text in (
        "coldstart-serve ENGINE MODEL [options] [-- engine args]",
        "coldstart-serve --config FILE [server options]",
        "[models.tiny]",
        "--api-key-file FILE",
        "$COLDSTART_API_KEY",
        "server options:",
        "per-model options:",
        "--weight SHARE",
        "--snapshot {auto,criu,runsc,cuda,off}",
    ):
        assert text in result.stdout, text
