"""Scale to zero and back, an engine killed mid-stream, queue overflow and queue timeout."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_scale_to_zero_and_back(serve, tiny_model: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    served = serve(["transformers", str(tiny_model), "--idle-timeout", "1", "--work-dir", str(tmp_path)])
    served.wait_ready()
    served.wait_for(lambda h: h["replicas"] == [], 30, "scale to zero")
    assert ("r1", "ready", "draining") in served.lifecycle()
    # The next request is held while r2 boots, then answered (not dropped).
    reply = _client(served.url).chat.completions.create(
        model=str(tiny_model), messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert reply.choices[0].message.content is not None
    assert ("r2", "booting", "ready") in served.lifecycle()


def test_engine_killed_mid_stream(serve, tiny_model: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    served = serve(["transformers", str(tiny_model), "--work-dir", str(tmp_path)])
    served.wait_ready()
    client = _client(served.url)
    stream = client.chat.completions.create(
        model=str(tiny_model),
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3000,
        temperature=0,  # greedy: this model answers ~96 tokens; it is killed at the 3rd
        stream=True,
    )
    received = 0
    with pytest.raises((openai.APIError, httpx.HTTPError)):
        for _ in stream:
            received += 1
            if received == 3:
                for pid in served.engine_pids():
                    os.killpg(pid, signal.SIGKILL)
    assert received >= 3
    # The dead replica is replaced; the next request is answered by a new one.
    reply = client.chat.completions.create(
        model=str(tiny_model), messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert reply.choices[0].message.content is not None
    assert ("r1", "ready", "failed") in served.lifecycle()
    assert ("r2", "booting", "ready") in served.lifecycle()


def test_queue_overflow_and_timeout_answer_503(serve, tiny_model: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    served = serve(
        [
            "transformers",
            str(tiny_model),
            "--initial-replicas",
            "0",
            "--max-queue",
            "1",
            "--queue-timeout",
            "1",
            "--work-dir",
            str(tmp_path),
        ]
    )
    served.wait_for(lambda h: h["status"] == "ok", 30, "proxy up")
    body = {"model": str(tiny_model), "prompt": "x", "max_tokens": 1}
    first: list[httpx.Response] = []
    waiter = threading.Thread(
        target=lambda: first.append(httpx.post(f"{served.url}/v1/completions", json=body, timeout=30))
    )
    waiter.start()
    served.wait_for(lambda h: h["queue_depth"] == 1, 10, "one queued request")
    overflow = httpx.post(f"{served.url}/v1/completions", json=body, timeout=30)
    waiter.join()
    assert overflow.status_code == 503 and overflow.headers["retry-after"]
    assert overflow.json()["error"]["code"] == "queue_full"
    timed_out = first[0]
    assert timed_out.status_code == 503 and timed_out.headers["retry-after"]
    assert timed_out.json()["error"]["code"] == "queue_timeout"
    # The request that arrived while nobody served started a replica: later requests are answered.
    served.wait_ready()
    assert httpx.post(f"{served.url}/v1/completions", json=body, timeout=60).status_code == 200
