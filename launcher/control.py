"""The one control-plane HTTP client: how the launcher talks to engines (health, warm-up, canary, hooks).

``trust_env=False``: never through an HTTP proxy from the environment (engines live on loopback or a private
netns). No keep-alive: each call's connection is closed by us when it ends, so an engine holds no
established or TIME_WAIT socket of ours when it is checkpointed (gVisor refuses to save them; CRIU would
carry them into the image). Connect fails fast (5 s); answers may take long (a cold engine's first request).
"""

from __future__ import annotations

import httpx

CONNECT_TIMEOUT_S = 5.0


def control_client(timeout_s: float = 300.0) -> httpx.AsyncClient:
    """A new control-plane client (use it as ``async with control_client() as http``)."""
    return httpx.AsyncClient(
        trust_env=False,
        timeout=httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S),
        limits=httpx.Limits(max_keepalive_connections=0),
    )
