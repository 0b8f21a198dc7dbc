"""The canary request each engine gets and what counts as evidence (launcher/snapshots/canary.py).

The real vLLM on models whose answer is "" or end-of-sequence: tests/engine_adapters/test_vllm_canary.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from coldstart.engine_adapters.base import EngineConfig
from coldstart.engine_adapters.sglang import SglangAdapter
from coldstart.engine_adapters.vllm import VllmAdapter
from coldstart.launcher.config import Canary
from coldstart.launcher.snapshots.canary import CanaryAnswer, VacuousCanary, canary_request


@pytest.mark.parametrize("adapter", [VllmAdapter, SglangAdapter])
def test_vllm_and_sglang_ask_for_ids_logprobs_and_a_fixed_length(adapter: type) -> None:
    """The vLLM adapter sent none of these: its canary compared decoded text only."""
    config = EngineConfig(model="org/model")
    chat = canary_request(adapter(), config, Canary("Say hi", 4)).body
    assert (chat["return_token_ids"], chat["logprobs"], chat["ignore_eos"]) == (True, True, True)
    completion = canary_request(adapter(), config, Canary("Say hi", 4, chat=False)).body
    assert (completion["return_token_ids"], completion["logprobs"], completion["ignore_eos"]) == (
        True,
        1,
        True,
    )


def _choice(text: str, **fields: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}, **fields}]}


def test_sglang_token_ids_are_read() -> None:
    answer = CanaryAnswer.from_response(_choice("", response_token_ids=[3, 3]))
    assert answer.token_ids == (3, 3)
    assert "token ids" in CanaryAnswer.from_response(_choice("", response_token_ids=[4, 3])).mismatch(answer)


def test_an_end_of_sequence_answer_with_ids_is_evidence() -> None:
    eos = CanaryAnswer.from_response(_choice("", token_ids=[2]))
    eos.require_meaningful("vllm")
    assert CanaryAnswer.from_response(_choice("", token_ids=[2])).mismatch(eos) == ""
    assert (
        CanaryAnswer.from_response(_choice("", token_ids=[1])).mismatch(eos) == "token ids [1], expected [2]"
    )


def test_logprobs_alone_are_evidence() -> None:
    CanaryAnswer.from_response(
        _choice("", logprobs={"content": [{"token": "", "logprob": -0.5}]})
    ).require_meaningful()


def test_nothing_to_compare_names_the_engine_and_the_fix() -> None:
    with pytest.raises(VacuousCanary) as caught:
        CanaryAnswer.from_response(_choice("")).require_meaningful("transformers")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("transformers's canary answer has no text, no token ids and no logprobs")
    assert "[canary] prompt" in message and "vllm" in message


def test_transformers_bounds_its_request_size() -> None:
    """``transformers serve`` blocked its health probe on a 30 MB prompt: the proxy refuses above this."""
    from coldstart.engine_adapters.registry import get_adapter

    limit = get_adapter("transformers").max_request_bytes
    assert limit is not None and limit < 30 << 20
    assert get_adapter("custom").max_request_bytes is None  # the proxy's --max-body-size alone
