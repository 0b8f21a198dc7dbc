"""The launcher: the life of a replica behind an OpenAI proxy.

Top level, in the order a replica lives: ``config`` (ServeConfig, what a user asks for) -> ``server`` (run:
the proxy, the pool, the replicas) -> ``replicas`` (autoscaler: start, route, drain, stop) -> ``replica`` (one
replica's states) -> ``boot`` (cold boot) / ``snapshots/`` (restore, checkpoint) -> ``proxy`` (OpenAI routes).
Rooms: ``cli/`` (one file per command), ``sandboxes/`` (where an engine runs), ``checkpointers/`` (CRIU,
runsc, CUDA), ``snapshots/`` (manager, store, identity, fingerprint), ``gpu/`` (CUDA driver API, inventory,
doctor, the fake driver).
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
