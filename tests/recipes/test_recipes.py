"""Recipes: every shipped recipe loads; a bad key or type is refused naming the key; CLI and serve wiring."""

from __future__ import annotations

from pathlib import Path

import pytest

from coldstart.launcher.cli import recipes as cli_recipes
from coldstart.launcher.config import CheckpointerName, ServeConfig
from coldstart.launcher.recipes import RECIPES_DIR, Canary, RecipeError, apply_recipe, available, load_recipe

SHIPPED = ["sglang-qwen3-0.6b", "tiny-engine", "tiny-engine-cuda", "transformers-tiny", "vllm-qwen3-0.6b"]

GOOD = """
engine = "custom"
model = "{cache}/models/x"
engine_args = ["{python}", "{recipes}/server.py"]
idle_timeout = 30
[env]
A = "1"
[[warmup]]
path = "/v1/completions"
body = { prompt = "hi", max_tokens = 2 }
[canary]
prompt = "hi"
"""


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mine.toml"
    path.write_text(text)
    return str(path)


def test_every_shipped_recipe_loads() -> None:
    assert sorted(available()) == SHIPPED
    for name in SHIPPED:
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.engine in ("vllm", "sglang", "transformers", "custom")
        assert recipe.canary is not None and recipe.warmup and recipe.snapshot == "auto"
    tiny = load_recipe("tiny-engine")
    assert f"{RECIPES_DIR}/examples/tiny_engine.py" in tiny.engine_args
    assert Path(tiny.engine_args[1]).is_file()


def test_types_and_placeholders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    recipe = load_recipe(_write(tmp_path, GOOD))
    assert recipe.model == f"{tmp_path}/xdg/coldstart/models/x"
    assert recipe.engine_args == ("{python}", f"{tmp_path}/server.py")  # {python} is the adapter's
    assert recipe.idle_timeout == 30.0 and isinstance(recipe.idle_timeout, float)
    assert recipe.env == {"A": "1"} and recipe.warmup[0].body == {"prompt": "hi", "max_tokens": 2}
    assert recipe.canary == Canary(prompt="hi", max_tokens=8, chat=True)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ('colour = "blue"', "unknown key 'colour' (valid: engine, model, "),
        ('[canary]\nprompt = "x"\ntokens = 3', "unknown key 'canary.tokens'"),
        ('idle_timeout = "soon"', "key 'idle_timeout' must be a number, got a string 'soon'"),
        ("idle_timeout = true", "key 'idle_timeout' must be a number, got a boolean True"),
        ('snapshot = "fast"', "key 'snapshot' must be one of auto, criu, runsc, cuda, off, got 'fast'"),
        ("engine_args = [1]", "key 'engine_args[0]' must be a string, got an integer 1"),
        ('engine_args = "python x.py"', "key 'engine_args' must be an array"),
        ("[env]\nN = 1", "key 'env.N' must be a string, got an integer 1"),
        ('[canary]\nprompt = "x"\nmax_tokens = "8"', "key 'canary.max_tokens' must be an integer"),
        ("[canary]\nmax_tokens = 8", "missing key 'canary.prompt'"),
        ("[[warmup]]\npath = 3\nbody = {}", "key 'warmup[0].path' must be a string, got an integer 3"),
        ('make_model = "huge"', "key 'make_model' must be one of tiny, qwen3-0.6b"),
    ],
)
def test_bad_recipe_is_refused_naming_the_key(tmp_path: Path, edit: str, message: str) -> None:
    with pytest.raises(RecipeError, match="recipe 'mine'") as info:
        load_recipe(_write(tmp_path, f'engine = "vllm"\nmodel = "m"\n{edit}\n'))
    assert message in str(info.value)
    assert info.value.exit_code == 2


@pytest.mark.parametrize("name", ["auto", "criu", "runsc", "cuda", "off"])
def test_every_checkpointer_name_is_a_snapshot_value(tmp_path: Path, name: str) -> None:
    recipe = load_recipe(_write(tmp_path, f'engine = "vllm"\nmodel = "m"\nsnapshot = "{name}"\n'))
    assert recipe.snapshot is CheckpointerName(name)
    assert apply_recipe(str(tmp_path / "mine.toml"), ServeConfig()).snapshot is CheckpointerName(name)


def test_missing_required_key_unknown_name_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="missing key 'model'"):
        load_recipe(_write(tmp_path, 'engine = "vllm"\n'))
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(_write(tmp_path, "engine = \n"))
    with pytest.raises(RecipeError, match="unknown recipe 'nope'; valid: sglang-qwen3-0.6b, tiny-engine"):
        load_recipe("nope")
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(str(tmp_path / "gone.toml"))


def test_cli_ls_and_show(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_recipes.main(["ls"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["NAME", "ENGINE", "MODEL", "SNAPSHOT", "DESCRIPTION"]
    for name in SHIPPED:
        assert name in out
    assert cli_recipes.main(["show", "vllm-qwen3-0.6b"]) == 0
    shown = capsys.readouterr().out
    assert "engine             vllm" in shown and "canary             'The capital of France is'" in shown
    assert cli_recipes.main(["show", "nope"]) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err


def test_apply_recipe_fills_serve_config(tmp_path: Path, tiny_model: Path) -> None:
    path = _write(tmp_path, GOOD.replace("{cache}/models/x", str(tiny_model)))
    config = apply_recipe(path, ServeConfig())
    assert (config.engine, config.model, config.idle_timeout) == ("custom", str(tiny_model), 30.0)
    assert config.engine_args == ("{python}", f"{tmp_path}/server.py")


def test_make_model_when_serving_starts_not_while_parsing(tmp_path: Path) -> None:
    from coldstart.launcher.cli.serve import parse
    from coldstart.launcher.server import ensure_model

    model = tmp_path / "made"
    path = _write(tmp_path, f'engine = "transformers"\nmodel = "{model}"\nmake_model = "tiny"\n')
    config = parse(["--recipe", str(path)]).deployments[0]
    assert config.make_model == "tiny" and not model.exists()  # parsing (or --help) writes nothing
    ensure_model(config)
    assert (model / "config.json").is_file()


def test_recipe_env_warmup_and_canary_reach_the_engine_and_snapshots() -> None:
    """Every recipe key arrives where it acts (env and warm-ups used to be dropped on the way)."""
    from coldstart.launcher.settings import engine_config, snapshot_settings

    recipe = load_recipe("vllm-qwen3-0.6b")
    assert recipe.env and recipe.warmup and recipe.canary
    config = apply_recipe("vllm-qwen3-0.6b", ServeConfig())
    econf = engine_config(config)
    assert dict(econf.env) == recipe.env
    assert econf.warmup == tuple((w.path, w.body) for w in recipe.warmup)
    settings = snapshot_settings(config)
    assert settings is not None and settings.canary == recipe.canary
