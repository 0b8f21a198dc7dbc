"""The openai client against coldstart-serve in front of a real ``transformers serve`` (tiny model)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from support import Served

pytestmark = pytest.mark.slow
API_KEY = "sk-test-key"


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("proxy")
    served = Served(
        [
            "transformers",
            str(tiny_model),
            "--api-key",
            API_KEY,
            "--served-model-name",
            "tiny",
            "--work-dir",
            str(tmp / "run"),
        ],
        tmp / "serve.log",
    )
    served.wait_ready()
    yield served
    assert served.stop() == 0, served.log()


@pytest.fixture(scope="module")
def client(server: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_chat_completion(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=6, temperature=0
    )
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens == 6


def test_chat_completion_streams_token_by_token(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=6,
        temperature=0,
        stream=True,
    )
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2  # several chunks, not one buffered blob
    whole = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=6, temperature=0
    )
    assert "".join(pieces) == whole.choices[0].message.content  # greedy: the same text either way


def test_completion_streaming_and_not(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="tiny", prompt="The quick", max_tokens=5, temperature=0)
    assert whole.choices[0].text
    chunks = list(
        client.completions.create(model="tiny", prompt="The quick", max_tokens=5, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])


def test_wrong_api_key_is_401(server: Served) -> None:
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2)


@pytest.mark.parametrize(
    "path",
    [
        "/sleep?level=1",
        "/wake_up",
        "/collective_rpc",
        "/release_memory_occupation",
        "/resume_memory_occupation",
        "/pause",
        "/load_model",
        "/v1/../sleep",
        "/coldstart/control/before_checkpoint",
    ],
)
def test_engine_control_routes_are_not_reachable(server: Served, path: str) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.post(f"{server.url}{path}", headers=headers, json={}).status_code == 404
    assert httpx.get(f"{server.url}{path}", headers=headers).status_code == 404


def test_metrics_count_requests_and_boots(server: Served, client: openai.OpenAI) -> None:
    client.completions.create(model="tiny", prompt="x", max_tokens=1)
    text = httpx.get(f"{server.url}/metrics").text
    assert 'coldstart_cold_boots_total{model="tiny"} 1.0' in text
    assert 'coldstart_requests_total{model="tiny",route="/v1/completions",status="200"}' in text
    allocation = float(
        re.search(r'^coldstart_gpu_allocation_utilization{model="tiny"} (\S+)$', text, re.M)[1]
    )  # type: ignore[index]
    busy = float(re.search(r'^coldstart_gpu_busy_utilization{model="tiny"} (\S+)$', text, re.M)[1])  # type: ignore[index]
    assert 0 < busy <= allocation <= 1  # a replica up is counted; a request in flight is a subset of that
