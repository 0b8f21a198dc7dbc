"""``coldstart-serve --recipe tiny-engine`` end to end: the custom engine booted, snapshotted through its
hooks, scaled to zero, and restored (not booted) for the next request, which gets the same greedy answer."""

from __future__ import annotations

import shutil
from pathlib import Path

import openai
import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("criu") is None, reason="criu not installed (.ci/setup builds CRIU 4.2)"),
]


def test_recipe_serves_snapshots_and_restores_from_zero(serve, tiny_model: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    served = serve(
        [
            "custom",
            str(tiny_model),  # the recipe's model, without making one in ~/.cache
            "--recipe",
            "tiny-engine",
            "--snapshot",
            "criu",
            "--snapshot-dir",
            str(tmp_path / "snapshots"),
            "--work-dir",
            str(tmp_path / "run"),
            "--idle-timeout",
            "1",
        ]  # fmt: skip
    )
    served.wait_ready()
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="none", max_retries=0)
    chat = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Paris?"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    first = client.chat.completions.create(**chat).choices[0].message.content  # type: ignore[call-overload]
    served.wait_for(lambda h: not h["replicas"], 120, "scale to zero")
    again = client.chat.completions.create(**chat).choices[0].message.content  # type: ignore[call-overload]
    assert again == first
    health = served.health()
    assert [r["how"] for r in health["replicas"]] == ["restore"], served.log()
