"""The example engine (recipes/examples/tiny_engine.py) driven through the ``custom`` adapter.

Its OpenAI routes with the real ``openai`` client, then before-checkpoint / after-restore as the launcher
runs them: what the engine holds is asserted from its own report (``GET /coldstart/state``).
"""

from __future__ import annotations

import openai
import pytest

from coldstart.engine_adapters.errors import EngineCallFailed

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def _client(engine) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=f"{engine.base_url}/v1", api_key="none", max_retries=0)


def _greedy(engine) -> str:  # type: ignore[no-untyped-def]
    reply = _client(engine).chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0)
    return reply.choices[0].message.content or ""


def test_openai_routes_stream_and_not(tiny_engine) -> None:  # type: ignore[no-untyped-def]
    client = _client(tiny_engine)
    assert [m.id for m in client.models.list()] == ["tiny"]
    text = _greedy(tiny_engine)
    assert text
    stream = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=12, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    done = client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0)
    assert done.usage is not None and done.usage.completion_tokens <= 6
    streamed = client.completions.create(
        model="tiny", prompt="Hello", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text


def test_hooks_offload_weights_free_cache_and_bring_both_back(tiny_engine) -> None:  # type: ignore[no-untyped-def]
    before_text = _greedy(tiny_engine)
    serving = tiny_engine.state()
    assert serving["weights"]["location"] == "device" and serving["weights"]["module_bytes"] > 0
    assert serving["kv_cache"]["allocated"] and serving["kv_cache"]["bytes_allocated"] > 0

    tiny_engine.call("before_checkpoint")
    suspended = tiny_engine.state()
    assert suspended["hooks_state"] == "checkpoint_ready"
    assert suspended["weights"]["location"] == "host"
    assert suspended["weights"]["module_bytes"] == 0  # the model holds no weight bytes on its device
    assert suspended["weights"]["host_backup_bytes"] == serving["weights"]["module_bytes"]
    assert not suspended["kv_cache"]["allocated"] and suspended["kv_cache"]["bytes_allocated"] == 0
    assert suspended["kv_cache"]["shapes"] == serving["kv_cache"]["shapes"]
    # measured by the engine itself at the end of its before-checkpoint hooks, kept in its memory
    recorded = suspended["at_last_checkpoint"]
    assert recorded["weights"]["module_bytes"] == 0 and not recorded["kv_cache"]["allocated"]
    with pytest.raises(openai.APIStatusError) as refused:
        _greedy(tiny_engine)
    assert refused.value.status_code == 503

    tiny_engine.call("after_restore")
    restored = tiny_engine.state()
    assert restored["hooks_state"] == "serving"
    assert restored["weights"] == serving["weights"]
    assert restored["kv_cache"] == serving["kv_cache"]
    assert restored["identity"]["refreshes"] == serving["identity"]["refreshes"] + 1
    assert _greedy(tiny_engine) == before_text


def test_after_restore_without_checkpoint_is_refused_and_engine_keeps_serving(tiny_engine) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(EngineCallFailed, match="cannot run after_restore in state serving"):
        tiny_engine.call("after_restore")
    assert tiny_engine.state()["hooks_state"] == "serving" and _greedy(tiny_engine)
