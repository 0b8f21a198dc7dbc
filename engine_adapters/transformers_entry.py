"""``python -m coldstart.engine_adapters.transformers_entry serve MODEL ...``: ``transformers serve`` with

- the snapshot_hooks control channel open, so that after each restore the hooks library reseeds torch, NumPy
  and Python RNGs from fresh entropy (and refreshes host identity). ``transformers serve`` itself has no hook
  for this; sampling uses torch's global generator, which a snapshot would otherwise hand to every replica
  alike;
- generations aborted when their client goes away (as vLLM does). ``transformers serve`` (5.23) runs a
  non-streaming ``model.generate`` to the end whatever happens to the connection: ten abandoned 3000-token
  requests kept the engine busy for a minute while the proxy saw it idle. Here an ASGI wrapper notices the
  ``http.disconnect`` and sets a per-request event that a ``StoppingCriteria`` checks at every token. It is
  fitted to ``transformers.cli.serving`` of the pinned release; if those names move, serving goes on without
  it and says so once.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

# The event of the request being handled (set when its client disconnects): read where generation is
# submitted, which runs in the request's own context.
_client_gone: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "client_gone", default=None
)


def abort_on_disconnect(app: App) -> App:
    """ASGI wrapper: POST requests get an event that is set when their client disconnects."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await app(scope, receive, send)
            return
        gone = threading.Event()
        body_read = asyncio.Event()
        finished = False

        async def tracking_receive() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
            elif not message.get("more_body"):
                body_read.set()
            return message

        async def watch() -> None:
            await body_read.wait()  # the app has its body: what comes next can only be the disconnect
            while not finished and not gone.is_set():
                if (await receive())["type"] == "http.disconnect":
                    gone.set()

        token = _client_gone.set(gone)
        watcher = asyncio.create_task(watch())
        try:
            await app(scope, tracking_receive, send)
        finally:
            finished = True
            watcher.cancel()
            _client_gone.reset(token)

    return wrapped


def _install_abort() -> None:
    try:
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.cli.serving import server, utils
    except ImportError as exc:  # another transformers layout: serve without aborts
        print(f"coldstart: generations are not aborted on disconnect here ({exc})", file=sys.stderr)
        return

    class ClientGone(StoppingCriteria):
        def __init__(self, gone: threading.Event) -> None:
            self.gone = gone
            self.said = False

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            import torch

            stop = self.gone.is_set()
            if stop and not self.said:
                self.said = True
                print(
                    f"coldstart: generation stopped at {input_ids.shape[1]} tokens (prompt too): client gone",
                    file=sys.stderr,
                )
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    submit = utils.GenerateManager.async_submit

    def async_submit(self: Any, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        gone = _client_gone.get()
        if gone is not None and getattr(fn, "__name__", "") == "generate":
            criteria = StoppingCriteriaList(kwargs.get("stopping_criteria") or [])
            criteria.append(ClientGone(gone))
            kwargs["stopping_criteria"] = criteria
        return submit(self, fn, *args, **kwargs)

    build = server.build_server

    def build_server(*args: Any, **kwargs: Any) -> Any:
        return abort_on_disconnect(build(*args, **kwargs))

    utils.GenerateManager.async_submit = async_submit
    server.build_server = build_server


def main() -> int:
    from coldstart import snapshot_hooks

    snapshot_hooks.serve()  # reads COLDSTART_CONTROL_HOST/PORT; a no-op outside coldstart
    _install_abort()
    from transformers.cli.transformers import main as transformers_main

    sys.argv[0] = "transformers"
    transformers_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
