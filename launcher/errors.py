"""Errors of the launcher: every one is a single line a user can act on.

    ColdstartError                 base; ``str(exc)`` is the one-line message shown by the CLIs
    ├── UsageError                 bad command line or config (exit code 2)
    ├── PortInUse                  the proxy's (or engine's) port is taken
    ├── EngineExited               the engine died while booting (carries the tail of its log)
    ├── BootTimeout                the engine did not become healthy in time (carries the tail of its log)
    ├── WarmupFailed               a warm-up request failed
    ├── ReplicaStateError          an operation illegal in the replica's current state
    ├── CheckpointerUnavailable    criu/runsc missing or unusable here (names the fix)
    ├── SnapshotError              a snapshot could not be written, read or verified
    └── RestoreFailed              restore failed; ``reason`` is a short label for metrics

Engine adapters raise their own ``coldstart.engine_adapters.errors.AdapterError`` tree (UnknownEngine,
ModelNotFound, EngineNotInstalled, EngineCallFailed): adapters cannot import the launcher. The CLIs catch
both trees (``USER_ERRORS``).

Foreign errors (subprocess, httpx, OSError) are mapped where they cross into the launcher with
``raise ... from exc``; nothing below the CLI layer calls ``sys.exit``.
"""

from __future__ import annotations

from coldstart.engine_adapters.errors import AdapterError


class ColdstartError(Exception):
    """Base of all launcher errors; the message is one line naming what failed and what to do."""

    exit_code = 1


class UsageError(ColdstartError):
    exit_code = 2


class PortInUse(ColdstartError):
    pass


class _WithLogTail(ColdstartError):
    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail


class EngineExited(_WithLogTail):
    pass


class BootTimeout(_WithLogTail):
    pass


class WarmupFailed(ColdstartError):
    pass


class ReplicaStateError(ColdstartError):
    pass


class CheckpointerUnavailable(ColdstartError):
    pass


class SnapshotError(ColdstartError):
    pass


class RestoreFailed(ColdstartError):
    """A restore that did not produce a serving replica; the launcher cold-boots instead."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # short label: gate, digest, checkpointer, canary, timeout, hook, ...


def _user_errors() -> tuple[type[Exception], ...]:
    from coldstart.imagefs.errors import ImageError  # plain module: no FUSE imports

    return (ColdstartError, AdapterError, ImageError)


# What the CLIs catch and print as one line (with ``exc.exit_code``).
USER_ERRORS: tuple[type[Exception], ...] = _user_errors()
