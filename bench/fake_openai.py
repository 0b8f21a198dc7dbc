"""A minimal OpenAI-shaped upstream for the proxy benchmark: canned answers, no model, so what is measured
is the proxy's own cost. ``stream: true`` sends ``chunks`` SSE events ``interval`` seconds apart.

    python bench/fake_openai.py --host 127.0.0.1 --port 9000
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

ANSWER = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 0,
    "model": "fake",
    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


async def chat(request: Request) -> Response:
    body = json.loads(await request.body())
    if not body.get("stream"):
        return JSONResponse(ANSWER)
    chunks = int(body.get("chunks", 8))
    interval = float(body.get("interval", 0.0))

    async def events() -> AsyncIterator[bytes]:
        for i in range(chunks):
            delta = {
                "id": "c",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": "fake",
                "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}],
            }
            yield f"data: {json.dumps(delta)}\n\n".encode()
            if interval:
                await asyncio.sleep(interval)
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/health", health)])

if __name__ == "__main__":
    from coldstart import snapshot_hooks

    snapshot_hooks.serve()  # so `coldstart-serve custom` sees a snapshot-ready engine (no hooks needed)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False, backlog=4096)
