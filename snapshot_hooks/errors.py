"""Errors of ``coldstart.snapshot_hooks``: every message is one line naming what failed and what to do.

    SnapshotHooksError              base
    ├── HookRegistrationError       a decorator used on something that is not a function, or a bad timeout
    ├── HookStateError              a phase asked for in a state that does not allow it (engine side)
    ├── HookFailed                  a hook raised; names the phase and the hook (engine side)
    │   └── HookTimeout             a hook ran past its timeout
    ├── ControlPortError            the control listener could not bind its port (engine side)
    └── ControlError                launcher side: talking to an engine's control channel
        ├── ControlUnreachable      nothing answers at the control URL (engine not using snapshot_hooks?)
        ├── ControlProtocolError    something answered, but not our protocol
        └── PhaseFailed             the engine ran the phase and reported a failure (``phase``, ``hook``)
            ├── CheckpointAborted   before-checkpoint failed; ``serving`` says whether the engine rolled back
            └── RestoreHooksFailed  after-restore failed; the replica must be discarded (cold boot instead)

The engine side raises the first group inside its own process; the control channel turns them into JSON
results; the client (used by ``engine_adapters.custom``) raises the ``ControlError`` group in the launcher.
"""

from __future__ import annotations


class SnapshotHooksError(Exception):
    """Base of all snapshot_hooks errors."""


class HookRegistrationError(SnapshotHooksError):
    pass


class HookStateError(SnapshotHooksError):
    pass


class HookFailed(SnapshotHooksError):
    def __init__(self, phase: str, hook: str, message: str) -> None:
        super().__init__(message)
        self.phase = phase
        self.hook = hook


class HookTimeout(HookFailed):
    pass


class ControlPortError(SnapshotHooksError):
    pass


class ControlError(SnapshotHooksError):
    pass


class ControlUnreachable(ControlError):
    pass


class ControlProtocolError(ControlError):
    pass


class PhaseFailed(ControlError):
    def __init__(self, phase: str, hook: str | None, message: str, *, serving: bool) -> None:
        super().__init__(message)
        self.phase = phase
        self.hook = hook
        # True when the engine is back to serving after the failure (a before-checkpoint rollback worked).
        self.serving = serving


class CheckpointAborted(PhaseFailed):
    pass


class RestoreHooksFailed(PhaseFailed):
    pass
