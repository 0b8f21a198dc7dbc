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

import httpx

from coldstart import snapshot_hooks
from coldstart.engine_adapters.base import EngineAdapter, EngineConfig
from coldstart.engine_adapters.errors import EngineCallFailed
from coldstart.snapshot_hooks import client as hooks_client
from coldstart.snapshot_hooks.errors import ControlError

# Hooks enforce their own timeouts inside the engine; this only bounds a wedged engine.
PHASE_TIMEOUT_S = 900.0


class HooksChannel(EngineAdapter):
    """Adds the control channel to an adapter: its env, its health and the two snapshot phases."""

    def hooks_env(self, config: EngineConfig) -> dict[str, str]:
        return {
            "COLDSTART_CONTROL_HOST": config.host,
            "COLDSTART_CONTROL_PORT": str(hooks_client.control_port_for(config.port)),
            # libuv >= 1.45 (uvloop, hence uvicorn's default loop) opens an io_uring that CRIU and
            # gVisor cannot checkpoint; this makes it use epoll.
            "UV_USE_IO_URING": "0",
        }

    async def is_healthy(self, client: httpx.AsyncClient, base_url: str) -> bool:
        """The engine answers ``/health`` and its control channel is up and not broken."""
        if not await super().is_healthy(client, base_url):
            return False
        try:
            state = await hooks_client.get_state(hooks_client.control_url_for(base_url), timeout_s=2.0)
        except ControlError:
            return False
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
