"""The canary: one greedy request answered before the checkpoint, asked again of every restored replica.

It compares what the model computed, not only the decoded text: a random model with a 151,936-row head and
a 245-entry tokenizer greedily emits ids that decode to ``""``, and a model whose greedy first token is
end-of-sequence answers ``""`` too, so comparing text alone passed on two empty strings. The adapter asks the
engine to report what it computed (``EngineAdapter.canary_fields``): vLLM ``return_token_ids``, ``logprobs``
and ``ignore_eos`` (a fixed number of tokens, whatever the model's first token is), SGLang likewise (its ids
come back as ``response_token_ids``), our ``snapshot_hooks`` example engine always. Recorded and compared: the
token ids, the logprobs where the engine gives them (within ``LOGPROB_TOLERANCE``: the same process image
computes the same numbers, batching aside), the text and the completion token count.
Only an answer with no text, no token ids and no logprobs proves nothing (an engine that reports neither,
such as ``transformers serve``, on a model whose answer decodes to ``""``): the snapshot is not taken, and
``VacuousCanary`` names the engine and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from coldstart.engine_adapters.base import EngineAdapter, EngineConfig
from coldstart.launcher.config import Canary
from coldstart.launcher.errors import SnapshotError

LOGPROB_TOLERANCE = 1e-3
# One greedy token: a full forward pass (weights, KV cache, sampling, detokenizer) checked against the
# recording. Every further token costs a decode step before the replica may serve (0.25-0.7 s each for
# Qwen3-0.6B on this CPU, measured by bench/startup.py); a recipe's [canary] can ask for more.
DEFAULT_CANARY = Canary(prompt="coldstart canary: repeat after me, the quick brown fox", max_tokens=1)


class VacuousCanary(SnapshotError):
    """The engine's canary answer carries no text and no token ids: a restore could not be verified."""


@dataclass(frozen=True)
class CanaryRequest:
    path: str
    body: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "body": self.body}


@dataclass(frozen=True)
class CanaryAnswer:
    text: str
    token_ids: tuple[int, ...] | None  # None: the engine does not report them
    logprobs: tuple[float, ...] | None
    completion_tokens: int | None

    @classmethod
    def from_response(cls, payload: dict[str, Any]) -> CanaryAnswer:
        """From an OpenAI chat or completion response (raises KeyError/TypeError/ValueError if malformed)."""
        choice = payload["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        ids = choice.get("token_ids")  # vLLM
        if ids is None:
            ids = choice.get("response_token_ids")  # SGLang
        usage = payload.get("usage") or {}
        return cls(
            text=str(text or ""),
            token_ids=tuple(int(i) for i in ids) if ids is not None else None,
            logprobs=_logprobs(choice.get("logprobs")),
            completion_tokens=int(usage["completion_tokens"]) if "completion_tokens" in usage else None,
        )

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CanaryAnswer:
        """From a manifest's ``canary`` (older manifests recorded only ``text``)."""
        ids, lps = data.get("token_ids"), data.get("logprobs")
        return cls(
            text=str(data.get("text", "")),
            token_ids=tuple(ids) if ids is not None else None,
            logprobs=tuple(lps) if lps is not None else None,
            completion_tokens=data.get("completion_tokens"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": list(self.token_ids) if self.token_ids is not None else None,
            "logprobs": list(self.logprobs) if self.logprobs is not None else None,
            "completion_tokens": self.completion_tokens,
        }

    def require_meaningful(self, engine: str = "the engine") -> None:
        """Raise ``VacuousCanary`` when the answer carries nothing a restore could be compared with."""
        if not self.text and not self.token_ids and not self.logprobs:
            raise VacuousCanary(
                f"{engine}'s canary answer has no text, no token ids and no logprobs, so a restore could "
                f"not be verified and no snapshot is taken (every start is a cold boot): {engine} reports "
                "neither ids nor logprobs and this model's answer decodes to '' -- give the recipe a "
                "[canary] prompt (or more max_tokens) the model answers with visible text, or serve it "
                "with an engine that reports token ids (vllm)"
            )

    def mismatch(self, recorded: CanaryAnswer) -> str:
        """'' when this answer matches the recording, else what differs (one line)."""
        if recorded.token_ids is not None and self.token_ids is not None:
            if self.token_ids != recorded.token_ids:
                return f"token ids {list(self.token_ids)}, expected {list(recorded.token_ids)}"
        if self.text != recorded.text:
            return f"text {self.text!r}, expected {recorded.text!r}"
        if recorded.completion_tokens is not None and self.completion_tokens is not None:
            if self.completion_tokens != recorded.completion_tokens:
                return f"{self.completion_tokens} tokens, expected {recorded.completion_tokens}"
        if recorded.logprobs is not None and self.logprobs is not None:
            if len(self.logprobs) != len(recorded.logprobs) or any(
                abs(a - b) > LOGPROB_TOLERANCE for a, b in zip(self.logprobs, recorded.logprobs, strict=False)
            ):
                return f"logprobs {list(self.logprobs)}, expected {list(recorded.logprobs)}"
        return ""


def _logprobs(raw: Any) -> tuple[float, ...] | None:
    if not isinstance(raw, dict):
        return None
    if isinstance(raw.get("content"), list):  # chat: [{"token", "logprob", ...}]
        return tuple(float(item["logprob"]) for item in raw["content"])
    if isinstance(raw.get("token_logprobs"), list):  # completions
        return tuple(float(x) for x in raw["token_logprobs"])
    return None


def canary_request(adapter: EngineAdapter, config: EngineConfig, canary: Canary) -> CanaryRequest:
    body: dict[str, Any] = {
        "model": adapter.upstream_model_name(config),
        "max_tokens": canary.max_tokens,
        "temperature": 0,
        **adapter.canary_fields(canary.chat),
    }
    if canary.chat:
        return CanaryRequest(
            "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": canary.prompt}]}
        )
    return CanaryRequest("/v1/completions", {**body, "prompt": canary.prompt})
