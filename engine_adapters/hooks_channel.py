"""Engines that run ``coldstart.snapshot_hooks``' control channel (engine port + 1).

Shared by the ``custom`` adapter (the user's engine registers its own hooks) and the ``transformers``
adapter (``transformers serve`` started through ``transformers_entry``, which opens the channel so the
hooks library reseeds torch/NumPy/Python RNGs and refreshes host identity after every restore: two replicas
restored from one snapshot must not sample alike).

Before checkpoint and after restore go through the channel (``snapshot_hooks.client``): a fresh TCP
connection per call that the launcher closes first, at the engine's base_url host, so it works the same in a
plain process, a CRIU network namespace and a gVisor sandbox. Failures map to ``EngineCallFailed``: a failed
before-checkpoint aborts the checkpoint (the engine rolled back and keeps serving); a failed after-restore
means the replica must be discarded and a cold boot started instead.
"""

from __future__ import annotations

import time

import httpx

from coldstart import snapshot_hooks
from coldstart.engine_adapters.base import EngineAdapter, EngineConfig
from coldstart.engine_adapters.errors import EngineCallFailed
from coldstart.snapshot_hooks import client as hooks_client
from coldstart.snapshot_hooks.errors import ControlError

# Hooks enforce their own timeouts inside the engine; this only bounds a wedged engine.
PHASE_TIMEOUT_S = 900.0
# How long an engine may answer /health without its control channel before that is an error.
MISSING_CHANNEL_S = 5.0


class HooksChannel(EngineAdapter):
    """Adds the control channel to an adapter: its env, its health and the two snapshot phases."""

    def __init__(self) -> None:
        self._no_channel_since: dict[str, float] = {}  # base_url -> first /health 200 without a channel

    def hooks_env(self, config: EngineConfig) -> dict[str, str]:
        return {
            "COLDSTART_CONTROL_HOST": config.host,
            "COLDSTART_CONTROL_PORT": str(hooks_client.control_port_for(config.port)),
            # libuv >= 1.45 (uvloop, hence uvicorn's default loop) opens an io_uring that CRIU and
            # gVisor cannot checkpoint; this makes it use epoll.
            "UV_USE_IO_URING": "0",
        }

    async def is_healthy(self, client: httpx.AsyncClient, base_url: str) -> bool:
        """The engine answers ``/health`` and its control channel is up and not broken.

        An engine that answers ``/health`` but has no control channel for ``MISSING_CHANNEL_S`` never
        will (the channel starts before the engine's own server): ``EngineCallFailed`` says so at once,
        instead of a silent wait until ``--boot-timeout``."""
        if not await super().is_healthy(client, base_url):
            return False
        control = hooks_client.control_url_for(base_url)
        try:
            state = await hooks_client.get_state(control, timeout_s=2.0)
        except ControlError as exc:
            first = self._no_channel_since.setdefault(base_url, time.monotonic())
            if time.monotonic() - first >= MISSING_CHANNEL_S:
                raise EngineCallFailed(
                    f"{self.name} engine answers {self.health_path} at {base_url} but not the snapshot_hooks "
                    f"control channel at {control} ({exc}): call coldstart.snapshot_hooks.serve() in the "
                    "server before it starts serving (it reads COLDSTART_CONTROL_HOST/PORT)"
                ) from exc
            return False
        self._no_channel_since.pop(base_url, None)
        return state["state"] != snapshot_hooks.EngineState.BROKEN.value

    async def before_checkpoint(self, client: httpx.AsyncClient, base_url: str) -> None:
        try:
            await hooks_client.run_before_checkpoint(hooks_client.control_url_for(base_url), PHASE_TIMEOUT_S)
        except ControlError as exc:
            raise EngineCallFailed(f"{self.name} engine at {base_url}: {exc}") from exc

    async def after_restore(self, client: httpx.AsyncClient, base_url: str) -> None:
        try:
            await hooks_client.run_after_restore(hooks_client.control_url_for(base_url), PHASE_TIMEOUT_S)
        except ControlError as exc:
            raise EngineCallFailed(f"{self.name} engine at {base_url}: {exc}") from exc
