"""Make your own inference engine snapshot-safe: the five lines are in ``snapshot_hooks/README.md``.

    from coldstart import snapshot_hooks as hooks

    @hooks.before_checkpoint           # runs in registration order before the launcher checkpoints
    def offload(): ...

    @hooks.after_restore(timeout_s=30) # runs in reverse order after each restore (and after a resume)
    async def reload(): ...

    hooks.serve()                      # control listener for the launcher; no-op outside coldstart

Torch helpers (``coldstart.snapshot_hooks.torch_helpers``, imports torch): ``WeightOffloader``,
``ReleasableBuffers``, ``empty_device_cache``. RNG reseeding and host identity refresh run by themselves
after every restore (``process_state``). This package imports nothing else of coldstart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, overload

from coldstart.snapshot_hooks.control import PROTOCOL_VERSION, ControlServer, serve
from coldstart.snapshot_hooks.errors import (
    CheckpointAborted,
    ControlError,
    ControlUnreachable,
    HookFailed,
    HookTimeout,
    PhaseFailed,
    RestoreHooksFailed,
    SnapshotHooksError,
)
from coldstart.snapshot_hooks.process_state import process_identity, refresh_process_state, reseed_rngs
from coldstart.snapshot_hooks.registry import (
    DEFAULT_TIMEOUT_S,
    EngineState,
    HookRegistry,
    Phase,
    PhaseResult,
    default_registry,
)

# Part of a snapshot's identity: a new hooks protocol or semantics means a new snapshot.
__version__ = f"1.{PROTOCOL_VERSION}"

F = Callable[..., Any]


def _decorator(phase: Phase) -> Callable[..., Any]:
    @overload
    def register(fn: F, /) -> F: ...
    @overload
    def register(
        *, timeout_s: float = ..., name: str | None = ..., registry: HookRegistry | None = ...
    ) -> Callable[[F], F]: ...

    def register(
        fn: F | None = None,
        /,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        name: str | None = None,
        registry: HookRegistry | None = None,
    ) -> Any:
        target = registry or default_registry

        def wrap(f: F) -> F:
            return target.register(phase, f, timeout_s=timeout_s, name=name)

        return wrap if fn is None else wrap(fn)

    register.__name__ = phase.value
    register.__doc__ = f"Register a sync or async function to run at {phase.value} (bare or with options)."
    return register


before_checkpoint = _decorator(Phase.BEFORE_CHECKPOINT)
after_restore = _decorator(Phase.AFTER_RESTORE)


def state() -> EngineState:
    """The default registry's state: serving, running_hooks, checkpoint_ready or broken."""
    return default_registry.state


__all__ = [
    "PROTOCOL_VERSION",
    "CheckpointAborted",
    "ControlError",
    "ControlServer",
    "ControlUnreachable",
    "EngineState",
    "HookFailed",
    "HookRegistry",
    "HookTimeout",
    "Phase",
    "PhaseFailed",
    "PhaseResult",
    "RestoreHooksFailed",
    "SnapshotHooksError",
    "after_restore",
    "before_checkpoint",
    "default_registry",
    "process_identity",
    "refresh_process_state",
    "reseed_rngs",
    "serve",
    "state",
]
