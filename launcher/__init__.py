"""The launcher: many models behind one OpenAI endpoint, each replica restored from a snapshot or booted.

Top level, in the order a request meets it: ``config`` (ServeConfig; ``deployments`` reads a deployments
file into a GatewayConfig) -> ``server`` (run: the proxy, the host, the gateway) -> ``proxy`` (OpenAI routes,
by model) -> ``gateway`` (many deployments on one set of units: swaps, fair shares, the buffer plan) ->
``deployment`` / ``router`` (one model's replicas and queue) -> ``autoscaler`` (pure: demand -> replicas) ->
``placement`` (the ReplicaHost seam; ``local_host`` here, ``cluster/`` on Ray) -> ``lifecycle`` (restore,
else cold boot) -> ``liveness`` (who decides a replica is dead) -> ``replica`` (one replica's states).
Rooms: ``cli/`` (one file per command), ``sandboxes/`` (where an engine runs), ``checkpointers/`` (CRIU,
runsc, CUDA), ``snapshots/`` (manager, store, identity, fingerprint, remote), ``gpu/`` (CUDA driver API,
inventory, doctor, the fake driver), ``cluster/`` (Ray).
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from coldstart.launcher.config import ServeConfig
    from coldstart.launcher.server import run

__all__ = ["ServeConfig", "run"]


def __getattr__(name: str) -> Any:
    # Lazy: `import coldstart.launcher.errors` must not pull in the server (uvicorn, aiohttp).
    if name == "ServeConfig":
        from coldstart.launcher.config import ServeConfig

        return ServeConfig
    if name == "run":
        from coldstart.launcher.server import run

        return run
    raise AttributeError(name)
