"""Many models on one CPU slot, with the real engines: the real vLLM (lean CPU configuration) and
`transformers serve` behind one ``coldstart-serve --config``, CRIU snapshots, ``units = 1``.

One launcher for the module; the tests run in file order and tell one story: each model's first request
cold-boots it (and snapshots it), evicting the other; after that every swap is a restore, answering the same
greedy tokens (vLLM: the same token ids) as before the swap; concurrent requests for both are all answered
and never put two replicas on the slot; an eviction waits for a request in flight (a long stream) to finish;
a damaged snapshot is refused with its reason and cold-booted; a model whose engine exits at boot every time
gets 503s carrying the reason while the others are served; every swap is one log line.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
from openai import OpenAI
from support import Served, make_cached_model, vllm_module_marks

from coldstart.engine_adapters.vllm import LEAN_CPU_ARGS, LEAN_CPU_ENV

pytestmark = vllm_module_marks()

PROMPT = [{"role": "user", "content": "Name a colour."}]
BROKEN = "import sys; print('RuntimeError: weights file is truncated'); sys.exit(3)"


def _toml_list(items: tuple[str, ...] | list[str]) -> str:
    return json.dumps(list(items))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    model = make_cached_model("tiny")
    work = tmp_path_factory.mktemp("many")
    env = "\n".join(f'{k} = "{v}"' for k, v in LEAN_CPU_ENV.items())
    config = work / "models.toml"
    config.write_text(
        f"""
[server]
units = 1
min_residency = 0.5

[models.vllm-tiny]
engine = "vllm"
model = "{model}"
engine_args = {_toml_list(LEAN_CPU_ARGS)}
snapshot = "criu"
initial_replicas = 0
idle_timeout = 600
boot_timeout = 600
[models.vllm-tiny.env]
{env}

[models.chat]
engine = "transformers"
model = "{model}"
served_model_name = "chat"
snapshot = "criu"
initial_replicas = 0
idle_timeout = 600

[models.broken]
engine = "custom"
model = "{model}"
engine_args = ["{sys.executable}", "-c", "{BROKEN}"]
snapshot = "off"
initial_replicas = 0
queue_timeout = 120
"""
    )
    served = Served(
        [
            "--config",
            str(config),
            "--snapshot-dir",
            str(work / "snapshots"),
            "--work-dir",
            str(work / "run"),
        ],
        work / "serve.log",
    )
    served.wait_for(lambda h: True, timeout=60, what="the proxy")
    yield served
    assert served.stop() == 0, served.log()[-3000:]


def client(served: Served) -> OpenAI:
    return OpenAI(base_url=f"{served.url}/v1", api_key="unused", timeout=600, max_retries=0)


def ask(served: Served, model: str, **extra: object) -> tuple[str, list[int] | None]:
    """Greedy answer of ``model``: its text and, where the engine reports them (vLLM), its token ids."""
    body = {"return_token_ids": True} if model.startswith("vllm") else {}
    answer = client(served).chat.completions.create(
        model=model, messages=PROMPT, max_tokens=8, temperature=0, extra_body={**body, **extra}
    )
    choice = answer.choices[0]
    ids = getattr(choice, "token_ids", None) or (choice.model_extra or {}).get("token_ids")
    return choice.message.content or "", ids


def swaps(served: Served) -> list[tuple[str, str, str]]:
    """(evicted, placed, how) of every swap line in the log."""
    return re.findall(r"swap: (\S+) \(r\d+\) evicted, (\S+) \(r\d+\) placed by (\w+)", served.log())


first: dict[str, tuple[str, list[int] | None]] = {}


def test_first_requests_cold_boot_each_model_and_snapshot_it(served: Served) -> None:
    first["chat"] = ask(served, "chat")
    first["vllm-tiny"] = ask(served, "vllm-tiny")  # evicts chat's idle replica: the one slot is its
    assert first["vllm-tiny"][1], "vLLM reports token ids when asked"
    models = {m["id"]: m["state"] for m in httpx.get(f"{served.url}/v1/models").json()["data"]}
    assert models == {"vllm-tiny": "ready", "chat": "at_zero", "broken": "at_zero"}
    assert ("chat", "vllm-tiny", "cold_boot") in swaps(served)


def test_every_later_swap_is_a_restore_with_the_same_greedy_tokens(served: Served) -> None:
    before = len(swaps(served))
    for model in ("chat", "vllm-tiny", "chat", "vllm-tiny"):
        assert ask(served, model) == first[model], model
    later = swaps(served)[before:]
    assert [(placed, how) for _, placed, how in later] == [
        ("chat", "restore"),
        ("vllm-tiny", "restore"),
        ("chat", "restore"),
        ("vllm-tiny", "restore"),
    ]


def test_concurrent_requests_for_both_never_share_the_slot(served: Served) -> None:
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        models = ["chat", "vllm-tiny"] * 3
        answers = list(pool.map(lambda m: ask(served, m), models))
    assert answers == [first[m] for m in models]
    assert served.health()["units"]["peak_held"] == 1  # never two replicas on the one slot


def test_an_eviction_waits_for_a_stream_in_flight(served: Served) -> None:
    ask(served, "vllm-tiny")  # vLLM holds the slot
    stream = client(served).chat.completions.create(
        model="vllm-tiny",
        messages=PROMPT,
        max_tokens=120,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    got = [next(chunks)]  # the stream has started: the request is in flight
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        chat = pool.submit(ask, served, "chat")  # wants the slot: vLLM yields after its stream
        got += list(chunks)
        assert chat.result(timeout=300) == first["chat"]
    text = "".join(c.choices[0].delta.content or "" for c in got if c.choices)
    assert got[-1].choices[0].finish_reason == "length", got[-1]
    assert text  # whole, not cut by the eviction


def test_a_damaged_snapshot_is_refused_with_its_reason_and_cold_booted(served: Served) -> None:
    ask(served, "vllm-tiny")  # chat is at zero
    manifests = list((served.log_path.parent / "snapshots").rglob("manifest.json"))
    chat = [m.parent for m in manifests if '"transformers' in m.read_text()]
    assert len(chat) == 1, manifests
    pages = max(chat[0].rglob("pages-*.img"), key=lambda p: p.stat().st_size)
    with open(pages, "r+b") as f:
        f.seek(4096)
        f.write(b"\0garbage" * 64)
    assert ask(served, "chat") == first["chat"]
    log = served.log()
    assert re.search(r"restore failed \(digest\)", log), log[-3000:]


def test_a_model_that_never_boots_gets_503s_with_its_reason_while_others_are_served(served: Served) -> None:
    started = time.monotonic()
    errors = []
    for _ in range(2):
        answer = httpx.post(
            f"{served.url}/v1/chat/completions",
            json={"model": "broken", "messages": PROMPT, "max_tokens": 4},
            timeout=120,
        )
        assert answer.status_code == 503, answer.text
        errors.append(answer.json()["error"])
    assert [e["code"] for e in errors] == ["boot_failed", "boot_failed"], errors
    assert all("weights file is truncated" in e["message"] or "status 3" in e["message"] for e in errors)
    assert int(answer.headers["retry-after"]) >= 1
    assert time.monotonic() - started < 100  # the reason came back, not the 120 s queue timeout
    assert ask(served, "chat") == first["chat"]
    models = {m["id"]: m["state"] for m in httpx.get(f"{served.url}/v1/models").json()["data"]}
    assert models["broken"] == "failing"
