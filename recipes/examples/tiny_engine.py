"""A complete, small OpenAI-compatible engine made snapshot-safe with ``coldstart.snapshot_hooks``.

    python tiny_engine.py --model /path/to/model --host 127.0.0.1 --port 8000 [--device cpu|cuda]

What it shows (the pattern to copy into your own server):
- a transformers causal LM, and a static KV cache allocated *up front* (not on the first request);
- all model work on one thread (a single-worker executor), so hooks never race a generation step;
- before checkpoint: refuse while requests are in flight, on CPU with ``--weights-dir DIR`` move the weights
  into content-addressed files under DIR (``file_back_module``: not in the CPU checkpoint, shared by every
  replica restored on a host; keep DIR as long as the snapshot) and mark the rest of its memory mergeable
  (``mergeable``: shared by KSM where the host runs it), move the weights to (pinned) host memory,
  free the KV cache, empty the CUDA allocator, then record this engine's own report of what it holds;
- after restore (reverse order): re-create the KV cache with the same shape, move the weights back;
  ``snapshot_hooks`` reseeds the RNGs first, so two restored replicas sample differently.

Routes: ``/v1/chat/completions`` and ``/v1/completions`` (``stream: true`` gives SSE), ``/v1/models``,
``/health``, and ``GET /coldstart/state``: where the weights live, whether the KV cache is allocated,
memory in use, and the same report as measured at the end of the last before-checkpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import resource
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import torch
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, StaticCache

from coldstart import snapshot_hooks as hooks
from coldstart.snapshot_hooks.file_backed import mergeable
from coldstart.snapshot_hooks.torch_helpers import (
    ReleasableBuffers,
    WeightOffloader,
    device_memory,
    empty_device_cache,
    file_back_module,
)

T = TypeVar("T")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EngineBusy(Exception):
    pass


class TinyEngine:
    """The model, its static KV cache, and the single thread that runs them."""

    def __init__(
        self,
        model_path: str,
        device: str,
        dtype: str,
        max_cache_len: int,
        name: str,
        weights_dir: str | None = None,
    ) -> None:
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("tiny_engine: --device cuda but torch sees no CUDA device")
        self.name = name
        self.device = torch.device(device)
        self.weights_dir = weights_dir if device == "cpu" else None  # CUDA weights are offloaded instead
        self.weights_in_files: dict[str, Any] | None = None
        self.dtype = (
            DTYPES[dtype] if dtype != "auto" else (torch.bfloat16 if device == "cuda" else torch.float32)
        )
        self.max_cache_len = max_cache_len
        # One thread owns the model: generation steps and hook work are queued here, never concurrent.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = self.on_model_thread(self._load, model_path)
        self.offloader = WeightOffloader(self.model)
        self.kv_cache = ReleasableBuffers()
        self.cache = self.on_model_thread(self._allocate_cache)
        self.request_lock = asyncio.Lock()  # one sequence at a time: there is one static cache
        self.in_flight = 0
        self.served = 0
        self.created = int(time.time())
        self.at_last_checkpoint: dict[str, Any] | None = None
        eos = {self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids("<|im_end|>")}
        self.stop_ids = {i for i in eos if isinstance(i, int) and i >= 0}

    def on_model_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return self._executor.submit(fn, *args).result()

    def _load(self, model_path: str) -> torch.nn.Module:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype)
        return model.to(self.device).eval()

    def _allocate_cache(self) -> StaticCache:
        config = self.model.config
        cache = StaticCache(config=config, max_cache_len=self.max_cache_len)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        cache.early_initialization(1, config.num_key_value_heads, head_dim, self.dtype, self.device)
        for i, layer in enumerate(cache.layers):
            self.kv_cache.register(f"layer{i}.keys", layer.keys)
            self.kv_cache.register(f"layer{i}.values", layer.values)
        return cache

    # -- generation (model thread) ---------------------------------------------------------------------
    def _logits(self, ids: list[int], start: int) -> torch.Tensor:
        with torch.inference_mode():
            x = torch.tensor([ids], device=self.device)
            pos = torch.arange(start, start + len(ids), device=self.device)
            out = self.model(input_ids=x, past_key_values=self.cache, cache_position=pos, use_cache=True)
            return out.logits[0, -1].float()

    def _prefill(self, ids: list[int]) -> torch.Tensor:
        if not self.kv_cache.is_allocated or self.offloader.is_offloaded:
            raise EngineBusy("engine is suspended for a snapshot")
        self.cache.reset()
        return self._logits(ids, 0)

    @staticmethod
    def _choose(logits: torch.Tensor, temperature: float) -> int:
        if temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / temperature, dim=-1)
        return int(torch.multinomial(probs, 1))  # the global torch RNG: reseeded after each restore

    async def tokens(self, prompt_ids: list[int], max_tokens: int, temperature: float) -> AsyncIterator[int]:
        """Yield generated token ids one by one; each step runs on the model thread."""
        loop = asyncio.get_running_loop()
        budget = min(max_tokens, self.max_cache_len - len(prompt_ids))
        if budget <= 0:
            raise ValueError(
                f"prompt of {len(prompt_ids)} tokens leaves no room in a {self.max_cache_len} cache"
            )
        logits = await loop.run_in_executor(self._executor, self._prefill, prompt_ids)
        position = len(prompt_ids)
        for step in range(budget):
            token = self._choose(logits, temperature)
            yield token
            if token in self.stop_ids or step == budget - 1:
                return
            logits = await loop.run_in_executor(self._executor, self._logits, [token], position)
            position += 1

    # -- snapshot hooks (run by the control thread; model work goes to the model thread) ---------------
    def install_hooks(self) -> None:
        @hooks.before_checkpoint(timeout_s=10)
        def refuse_while_busy() -> None:
            if self.in_flight:
                raise EngineBusy(f"{self.in_flight} request(s) in flight; drain before checkpointing")

        @hooks.before_checkpoint(timeout_s=120)
        def weights_into_files() -> None:
            if self.weights_dir is not None:
                # Every tensor with whole pages in it (64 KiB and up): the small model's are small.
                report = self.on_model_thread(file_back_module, self.model, self.weights_dir, 64 << 10)
                # The rest of the process's memory (the interpreter's, torch's) marked for KSM: where the
                # host runs it, replicas restored from one image share what they still hold alike.
                self.weights_in_files = {**report.to_json(), "mergeable_bytes": mergeable()}

        @hooks.before_checkpoint(timeout_s=120)
        def offload_weights() -> None:
            self.on_model_thread(self.offloader.offload)

        @hooks.before_checkpoint(timeout_s=60)
        def free_kv_cache() -> None:
            self.on_model_thread(self.kv_cache.free)
            self.on_model_thread(empty_device_cache)

        @hooks.before_checkpoint(timeout_s=10)
        def record_checkpoint_state() -> None:
            # Measured now, kept in memory: it is inside the snapshot and readable after every restore.
            self.at_last_checkpoint = {**self.report(), "recorded_at": time.time()}

        @hooks.after_restore(timeout_s=120)
        def reload_weights() -> None:
            self.on_model_thread(self.offloader.reload)

        @hooks.after_restore(timeout_s=60)
        def recreate_kv_cache() -> None:  # runs first after restore: reverse registration order
            self.on_model_thread(self.kv_cache.recreate)

    def report(self) -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "model": self.name,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "weights": self.offloader.report(),
            "weights_in_files": self.weights_in_files,
            "kv_cache": self.kv_cache.report(),
            "memory": {"rss_bytes": _rss_bytes(), "max_rss_bytes": usage.ru_maxrss * 1024, **device_memory()},
            "hooks_state": hooks.state().value,
            "identity": hooks.process_identity().as_dict(),
            "in_flight": self.in_flight,
            "served": self.served,
            "pid": os.getpid(),
        }


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


# -- HTTP ----------------------------------------------------------------------------------------------
def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def build_app(engine: TinyEngine) -> Starlette:
    async def health(_: Request) -> Response:
        return JSONResponse({"status": "ok", "hooks_state": hooks.state().value})

    async def models(_: Request) -> Response:
        card = {"id": engine.name, "object": "model", "created": engine.created, "owned_by": "coldstart"}
        return JSONResponse({"object": "list", "data": [card]})

    async def state(_: Request) -> Response:
        return JSONResponse({**engine.report(), "at_last_checkpoint": engine.at_last_checkpoint})

    async def completions(request: Request) -> Response:
        return await _generate(request, chat=False)

    async def chat(request: Request) -> Response:
        return await _generate(request, chat=True)

    async def _generate(request: Request, *, chat: bool) -> Response:
        try:
            body = await request.json()
            if chat:
                messages = body["messages"]
                text = engine.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True
                )
            else:
                text = body["prompt"]
                text = text[0] if isinstance(text, list) else text
            prompt_ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
            max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
            temperature = float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0)
            stream = bool(body.get("stream", False))
        except (ValueError, KeyError, TypeError) as exc:
            return _error(400, f"bad request: {exc!r}")
        if hooks.state() is not hooks.EngineState.SERVING:
            return _error(503, f"engine is {hooks.state().value}", "unavailable")
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        ctx = _Ctx(rid, chat, engine.name, len(prompt_ids))
        if stream:
            return StreamingResponse(
                _sse(ctx, prompt_ids, max_tokens, temperature), media_type="text/event-stream"
            )
        async with _in_flight():
            try:
                ids = [t async for t in engine.tokens(prompt_ids, max_tokens, temperature)]
            except (EngineBusy, ValueError) as exc:
                return _error(503 if isinstance(exc, EngineBusy) else 400, str(exc))
        text_out = engine.tokenizer.decode(ids, skip_special_tokens=True)
        return JSONResponse(ctx.final(text_out, ids, _finish(ids, max_tokens)))

    def _finish(ids: list[int], max_tokens: int) -> str:
        return "stop" if ids and ids[-1] in engine.stop_ids else "length"

    class _in_flight:  # noqa: N801 - used as a context manager
        async def __aenter__(self) -> None:
            engine.in_flight += 1
            await engine.request_lock.acquire()

        async def __aexit__(self, *exc: object) -> None:
            engine.request_lock.release()
            engine.in_flight -= 1
            engine.served += 1

    async def _sse(
        ctx: _Ctx, prompt_ids: list[int], max_tokens: int, temperature: float
    ) -> AsyncIterator[str]:
        ids: list[int] = []
        sent = ""
        async with _in_flight():
            try:
                async for token in engine.tokens(prompt_ids, max_tokens, temperature):
                    ids.append(token)
                    text = engine.tokenizer.decode(ids, skip_special_tokens=True)
                    if text.endswith("\ufffd"):  # half a UTF-8 character: wait for the rest
                        continue
                    piece, sent = text[len(sent) :], text
                    if piece:
                        yield _data(ctx.chunk(piece, None))
            except (EngineBusy, ValueError) as exc:
                yield _data({"error": {"message": str(exc), "type": "unavailable", "code": 503}})
                return
        yield _data(ctx.chunk("", _finish(ids, max_tokens)))
        yield "data: [DONE]\n\n"

    routes = [
        Route("/health", health),
        Route("/v1/models", models),
        Route("/coldstart/state", state),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ]
    return Starlette(routes=routes)


def _data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class _Ctx:
    """Builds OpenAI-shaped responses for one request."""

    def __init__(self, rid: str, chat: bool, model: str, prompt_tokens: int) -> None:
        self.rid, self.chat, self.model, self.prompt_tokens = rid, chat, model, prompt_tokens
        self.created = int(time.time())
        self._first = True

    def chunk(self, piece: str, finish: str | None) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"content": piece}
            if self._first:
                delta["role"] = "assistant"
                self._first = False
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": piece, "finish_reason": finish, "logprobs": None}
            kind = "text_completion"
        return {
            "id": self.rid,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }

    def final(self, text: str, ids: list[int], finish: str) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
            }
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            kind = "text_completion"
        choice["token_ids"] = ids  # as vLLM's return_token_ids: what the launcher's canary compares
        usage = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": len(ids),
            "total_tokens": self.prompt_tokens + len(ids),
        }
        return {
            "id": self.rid,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage,
        }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a local transformers causal LM folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bfloat16 on cuda, else float32"
    )
    p.add_argument("--max-cache-len", type=int, default=1024, help="static KV cache length in tokens")
    p.add_argument("--served-model-name", default=None, help="name in /v1/models (default: --model)")
    p.add_argument(
        "--weights-dir",
        default=None,
        help="CPU: before a checkpoint, move the weights into content-addressed files here (not dumped)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # tqdm (transformers' loading bars) otherwise makes a multiprocessing lock: a POSIX semaphore in
    # /dev/shm, unlinked at once, that CRIU must carry as a "ghost" file which replicas restored at the same
    # time on one host then race to re-create. A thread lock does the same job here.
    tqdm.set_lock(threading.RLock())
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    engine = TinyEngine(
        args.model,
        args.device,
        args.dtype,
        args.max_cache_len,
        args.served_model_name or args.model,
        weights_dir=args.weights_dir,
    )
    engine.install_hooks()
    hooks.serve()  # the launcher's control channel (COLDSTART_CONTROL_PORT); no-op when run by hand
    # loop="asyncio": uvloop's libuv (>= 1.45) opens an io_uring, which neither CRIU nor gVisor can save.
    uvicorn.run(
        build_app(engine),
        host=args.host,
        port=args.port,
        loop="asyncio",
        log_level="warning",
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
