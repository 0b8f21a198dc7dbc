"""``examples/two-models.toml`` as the README tells a new user to run it: ``coldstart-serve --config
examples/two-models.toml`` (here with ``--units 1``, the comment's "take turns", and folders of the test's
own). Both tiny models are made on first use in a fresh cache; the openai client lists both and gets answers
from each in turn, the second "chat" answer from a replica restored after a swap."""

from __future__ import annotations

from pathlib import Path

import pytest
from openai import OpenAI
from support import REPO, Served

pytestmark = pytest.mark.slow


def test_the_example_file_serves_both_models_taking_turns_on_one_unit(tmp_path: Path) -> None:
    served = Served(
        [
            "--config",
            str(REPO / "examples" / "two-models.toml"),
            "--units",
            "1",
            "--work-dir",
            str(tmp_path / "run"),
            "--snapshot-dir",
            str(tmp_path / "snapshots"),
        ],
        tmp_path / "serve.log",
        env={"XDG_CACHE_HOME": str(tmp_path / "cache")},  # the models are made there on first use
    )
    try:
        served.wait_for(lambda h: True, timeout=120, what="the proxy")
        client = OpenAI(base_url=f"{served.url}/v1", api_key="unused", timeout=600, max_retries=0)
        assert sorted(m.id for m in client.models.list()) == ["chat", "tiny"]
        answers = {}
        for model in ("chat", "tiny", "chat"):
            answer = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=4, temperature=0
            )
            text = answer.choices[0].message.content
            assert text, (model, answer)
            assert answers.setdefault(model, text) == text  # greedy: the same answer after the swap
        assert served.health()["units"]["peak_held"] == 1
        assert "chat" in served.log() and "restore" in served.log()
    finally:
        assert served.stop() == 0, served.log()[-3000:]
