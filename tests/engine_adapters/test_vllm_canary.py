"""The canary with the real vLLM (lean CPU configuration) on models of shapes the suite's own model lacks.

Two small Llama-architecture models with their own byte-level tokenizer (``canary_models``), biased so the
greedy token is always one chosen id: one whose answer decodes to ``""`` (a special token, not EOS), one whose
first token is end-of-sequence. Before the vLLM adapter asked for ``return_token_ids``/``logprobs``/
``ignore_eos``, both answered the canary with text ``""`` and no ids, and no snapshot was ever taken
("the canary answer has no text and no token ids"): every scale-from-zero was a cold boot. Now the snapshot
is taken with the ids recorded, a restored replica answers, and a restore is refused on ids alone (the text
is ``""`` either way). One ``coldstart-serve`` per model (booting vLLM costs 20-45 s on 2 cores).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from canary_models import make_biased_model
from support import Served, vllm_module_marks

from coldstart.engine_adapters.vllm import LEAN_CPU_ARGS, LEAN_CPU_ENV

MODEL = "biased"
CANARY_TOKENS = 1  # DEFAULT_CANARY.max_tokens


pytestmark = vllm_module_marks()


@pytest.fixture(scope="module", params=["empty", "eos"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    model, token_id = make_biased_model(request.param)
    work = tmp_path_factory.mktemp(f"vllm-{request.param}")
    served = Served(
        [
            "vllm",
            str(model),
            "--snapshot",
            "criu",
            "--snapshot-dir",
            str(work / "snapshots"),
            "--work-dir",
            str(work / "run"),
            "--served-model-name",
            MODEL,
            "--idle-timeout",
            "2",
            "--boot-timeout",
            "600",
            *LEAN_CPU_ARGS,
        ],  # fmt: skip
        work / "serve.log",
        env=LEAN_CPU_ENV,
    )
    served.kind = request.param  # type: ignore[attr-defined]
    served.token_id = token_id  # type: ignore[attr-defined]
    served.snapshot_dir = work / "snapshots"  # type: ignore[attr-defined]
    try:
        served.wait_for(lambda h: True, timeout=60, what="the proxy")
        yield served
    finally:
        served.stop()


def chat(served: Served, **extra: object) -> dict:  # type: ignore[type-arg]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 3}
    response = httpx.post(f"{served.url}/v1/chat/completions", json={**body, **extra}, timeout=600)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]  # type: ignore[no-any-return]


def manifest(served: Served) -> tuple[Path, dict]:  # type: ignore[type-arg]
    found = list(served.snapshot_dir.glob("*/manifest.json"))  # type: ignore[attr-defined]
    assert len(found) == 1, f"expected one snapshot, found {found}"
    return found[0], json.loads(found[0].read_text())


def ready_lines(served: Served, how: str) -> int:
    return len(re.findall(rf"-> ready after [\d.]+s how={how}\b", served.log()))


def test_the_model_answers_nothing_visible(served: Served) -> None:
    """What the canary saw before: text "" and no ids unless asked (so text alone proves nothing)."""
    choice = chat(served)
    assert (choice["message"]["content"] or "") == ""
    assert choice.get("token_ids") is None
    asked = chat(served, return_token_ids=True, ignore_eos=True)
    assert asked["token_ids"] == [served.token_id] * 3  # type: ignore[attr-defined]


def test_snapshot_taken_with_the_token_ids_recorded(served: Served) -> None:
    served.wait_for(lambda h: h["ready"], timeout=600, what="a ready replica")
    log = served.log()
    assert re.search(r"snapshot \w+ taken", log), log[-3000:]
    assert "canary answer has no text" not in log
    canary = manifest(served)[1]["canary"]
    assert canary["text"] == ""
    assert canary["token_ids"] == [served.token_id] * CANARY_TOKENS  # type: ignore[attr-defined]
    assert canary["logprobs"] is not None and len(canary["logprobs"]) == CANARY_TOKENS
    assert canary["body"]["return_token_ids"] is True and canary["body"]["ignore_eos"] is True


def test_scale_from_zero_is_a_restore(served: Served) -> None:
    served.wait_for(lambda h: h["replicas"] == [], timeout=120, what="scale to zero")
    restores = ready_lines(served, "restore")
    assert chat(served, return_token_ids=True, ignore_eos=True)["token_ids"] == [served.token_id] * 3  # type: ignore[attr-defined]
    assert ready_lines(served, "restore") == restores + 1, served.log()[-3000:]


def test_restore_is_refused_on_token_ids_alone(served: Served) -> None:
    """A recording whose ids differ (the text is "" either way) fails the restored replica's canary."""
    if served.kind != "empty":  # type: ignore[attr-defined]
        pytest.skip("one model shows it (each refusal costs a cold boot)")
    served.wait_for(lambda h: h["replicas"] == [], timeout=120, what="scale to zero")
    path, data = manifest(served)
    other = served.token_id + 1  # type: ignore[attr-defined]
    data["canary"]["token_ids"] = [other] * CANARY_TOKENS
    path.write_text(json.dumps(data))
    chat(served)
    log = served.log()
    assert re.search(
        rf"answered the canary with token ids \[{served.token_id}\], expected \[{other}\]",  # type: ignore[attr-defined]
        log,
    ), log[-3000:]
