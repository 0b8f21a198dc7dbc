"""Scale to zero and back, an engine killed mid-stream, queue overflow and queue timeout."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest
from support import REPO

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
    # The engine's exit (not the broken stream alone) fails r1 ...
    served.wait_for(lambda h: all(r["id"] != "r1" for r in h["replicas"]), 30, "r1 failed and stopped")
    # ... and the next request starts and is answered by a new replica.
    reply = client.chat.completions.create(
        model=str(tiny_model), messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert reply.choices[0].message.content is not None
    assert ("r1", "ready", "failed") in served.lifecycle()
    assert ("r2", "booting", "ready") in served.lifecycle()


def _gated_fake(gate: Path) -> list[str]:
    """A custom engine (bench/fake_openai.py) that starts only once ``gate`` exists: its boot lasts exactly
    as long as the test wants, whatever the host's speed."""
    fake = REPO / "bench" / "fake_openai.py"
    script = f'while [ ! -e "{gate}" ]; do sleep 0.05; done; exec "$0" "$@"'
    return ["--", "sh", "-c", script, sys.executable, str(fake), "--host", "{host}", "--port", "{port}"]


def test_queue_overflow_and_timeout_answer_503(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    gate = tmp_path / "boot-may-finish"
    served = serve(
        [
            "custom",
            "fake",
            "--initial-replicas",
            "0",
            "--max-queue",
            "1",
            "--queue-timeout",
            "1",
            "--work-dir",
            str(tmp_path),
            *_gated_fake(gate),
        ]
    )
    served.wait_for(lambda h: h["status"] == "ok", 30, "proxy up")
    body = {"model": "fake", "messages": [], "max_tokens": 1}
    first: list[httpx.Response] = []
    waiter = threading.Thread(
        target=lambda: first.append(httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=30))
    )
    waiter.start()
    served.wait_for(lambda h: h["queue_depth"] == 1, 10, "one queued request")
    overflow = httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=30)
    waiter.join()  # the boot cannot finish before the gate opens: the queue timeout always comes first
    assert overflow.status_code == 503 and overflow.headers["retry-after"]
    assert overflow.json()["error"]["code"] == "queue_full"
    timed_out = first[0]
    assert timed_out.status_code == 503 and timed_out.headers["retry-after"]
    assert timed_out.json()["error"]["code"] == "queue_timeout"
    # The request that arrived while nobody served started a replica: later requests are answered.
    gate.touch()
    served.wait_ready()
    assert httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=60).status_code == 200


def test_demand_starts_a_second_replica_and_routes_to_the_least_busy(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # A canned OpenAI upstream whose streams last 2 s makes the concurrency deterministic.
    fake = str(REPO / "bench" / "fake_openai.py")
    served = serve(
        [
            "custom",
            "fake",
            "--max-replicas",
            "2",
            "--target-concurrency",
            "1",
            "--work-dir",
            str(tmp_path),
            "--",
            sys.executable,
            fake,
            "--host",
            "{host}",
            "--port",
            "{port}",
        ]
    )
    served.wait_ready()
    # Streams that last far longer than any wait below (10 min): the test ends them by closing them.
    body = {"model": "fake", "messages": [], "stream": True, "chunks": 6000, "interval": 0.1}
    seen: list[int] = []
    done = threading.Event()

    def ask() -> None:
        with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body, timeout=60) as r:
            seen.append(r.status_code)
            for _ in r.iter_raw():
                if done.is_set():
                    return  # closing the stream cancels it upstream

    first = [threading.Thread(target=ask) for _ in range(2)]
    for t in first:
        t.start()
    served.wait_for(lambda h: len(h["replicas"]) == 2, 10, "demand above the target starts a second replica")
    served.wait_for(lambda h: sum(r["state"] == "ready" for r in h["replicas"]) == 2, 60, "two ready")
    # Both streams (the second one waited for r2) run at once, one on each replica.
    served.wait_for(lambda h: sorted(r["in_flight"] for r in h["replicas"]) == [1, 1], 30, "one request each")
    done.set()
    for t in first:
        t.join()
    assert seen == [200, 200]
    served.wait_for(lambda h: sum(r["in_flight"] for r in h["replicas"]) == 0, 30, "streams cancelled")
