"""Errors of the launcher, in one tree: every one is a single line a user can act on.

    ColdstartError                 base; ``str(exc)`` is the one-line message shown by the CLIs
    ├── UsageError                 bad command line or config (exit code 2)
    │   └── RecipeError            a recipe that does not exist, parse or fit the schema (names the key)
    ├── PortInUse                  the proxy's (or engine's) port is taken
    ├── EngineExited               the engine died while booting (carries its log tail and ``root_cause``)
    ├── BootTimeout                the engine did not become healthy in time (log tail and ``root_cause``)
    ├── WarmupFailed               a warm-up request failed
    ├── ReplicaStateError          an operation illegal in the replica's current state
    ├── QueueFull                  more requests waiting than --max-queue (503 to the client)
    ├── QueueTimeout               no replica became ready within --queue-timeout (503 to the client)
    ├── BootFailing                a deployment's boots fail the same way twice: 503 with the reason
    ├── NetnsError                 a network namespace could not be created or removed
    │   └── FirewallError          iptables failed guarding the replicas' addresses (it needs root)
    ├── CheckpointerUnavailable    criu/runsc missing or unusable here (names the fix)
    ├── SnapshotError              a snapshot could not be written, read or verified
    │   ├── SnapshotCorrupt        a snapshot file is missing, has the wrong size or the wrong digest
    │   └── RemoteSnapshotError    a snapshot on other hosts missing, refused by the gate, or not fetched
    ├── RestoreFailed              restore failed; ``reason`` (a ``RestoreReason``) labels metrics
    └── GpuError                   the GPU layer (CUDA checkpoint driver API, NVML)
        ├── NoNvidiaDriver         libcuda / libnvidia-ml not found: no NVIDIA driver on this host
        ├── CheckpointUnsupported  the driver (or cuda-bindings) has no CUDA checkpoint API
        ├── CudaCallFailed         a driver call returned an error; carries call, pid and CUresult name
        │   └── LockTimeout        lock timed out; the process was left RUNNING (snapshot aborted)
        ├── CudaCallTimeout        a call did not return in its bound; the helper running it was killed
        ├── CudaStateError         a process was not in the state a step expects
        ├── GpuRefused             a setup we refuse: tensor parallel > 1, old driver, other GPU model, ...
        └── GpuNotFound            a GPU UUID that this host does not have

Engine adapters raise their own ``coldstart.engine_adapters.errors.AdapterError`` tree (UnknownEngine,
ModelNotFound, EngineNotInstalled, EngineCallFailed): adapters cannot import the launcher. imagefs has its
own ``ImageError``. The CLIs catch all three (``USER_ERRORS``).

Foreign errors are mapped at one boundary each, with ``raise ... from exc``: subprocess and OSError where a
sandbox or checkpointer runs a tool, ``cuda.bindings``/``pynvml`` in ``gpu/driver.py`` and
``gpu/inventory.py``, httpx in the boot and snapshot paths. Nothing below the CLI layer calls ``sys.exit``.
"""

from __future__ import annotations

from enum import StrEnum

from coldstart.engine_adapters.errors import AdapterError


class ColdstartError(Exception):
    """Base of all launcher errors; the message is one line naming what failed and what to do."""

    exit_code = 1


class UsageError(ColdstartError):
    exit_code = 2


class RecipeError(UsageError):
    """A recipe that does not exist, does not parse, or does not fit the schema (names the key)."""


class PortInUse(ColdstartError):
    pass


class _WithLogTail(ColdstartError):
    def __init__(self, message: str, log_tail: str = "", *, root_cause: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail
        # The engine's one most telling line ("ValueError: Available memory ... less than desired ..."),
        # "" when its output named nothing: what a held request's 503 and a repeated-failure check use.
        self.root_cause = root_cause


class EngineExited(_WithLogTail):
    pass


class BootTimeout(_WithLogTail):
    pass


class WarmupFailed(ColdstartError):
    pass


class ReplicaStateError(ColdstartError):
    pass


class QueueFull(ColdstartError):
    pass


class QueueTimeout(ColdstartError):
    pass


class BootFailing(ColdstartError):
    """A deployment's boots fail the same way again and again: requests get a 503 with the reason."""

    def __init__(self, message: str, retry_after_s: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NetnsError(ColdstartError):
    """A network namespace could not be created or removed (needs root and iproute2)."""


class FirewallError(NetnsError):
    """iptables failed guarding the replicas' addresses and ports (it needs root)."""


class CheckpointerUnavailable(ColdstartError):
    pass


class SnapshotError(ColdstartError):
    pass


class SnapshotCorrupt(SnapshotError):
    """A snapshot file is missing, has the wrong size or the wrong digest."""


class RestoreReason(StrEnum):
    """Why a restore failed: the ``reason`` label of ``coldstart_restore_failures_total``."""

    MISSING = "missing"  # no snapshot for this identity
    DIGEST = "digest"  # unreadable manifest, wrong size or digest
    GATE = "gate"  # taken on a host or checkpointer this one does not fit
    MODEL_FILES = "model_files"  # the model's files changed since the snapshot
    CHECKPOINTER = "checkpointer"  # criu/runsc restore failed or the restored engine exited
    TIMEOUT = "timeout"  # restore or health did not finish in time
    HOOK = "hook"  # an after-restore hook failed
    CANARY = "canary"  # the restored replica answered the canary differently
    CUDA = "cuda"  # the CUDA driver could not restore the device state
    FETCH = "fetch"  # no tier delivered the snapshot's bytes (snapshots across hosts, remote.py)

    @property
    def replace_snapshot(self) -> bool:
        """True when a fresh snapshot fixes it (damaged, foreign, stale); after the other failures a new
        snapshot would fail alike."""
        return self in (
            RestoreReason.MISSING,
            RestoreReason.DIGEST,
            RestoreReason.GATE,
            RestoreReason.MODEL_FILES,
            RestoreReason.FETCH,  # a local snapshot (published again) serves the next restore
        )


class RemoteSnapshotError(SnapshotError):
    """A snapshot on other hosts could not be found, was refused by the gate, or could not be fetched."""

    def __init__(self, reason: RestoreReason, message: str) -> None:
        super().__init__(message)
        self.reason = RestoreReason(reason)  # what the restore that wanted it fails with


class RestoreFailed(ColdstartError):
    """A restore that did not produce a serving replica; the launcher cold-boots instead."""

    def __init__(self, reason: RestoreReason, message: str) -> None:
        super().__init__(message)
        self.reason = RestoreReason(reason)  # a label outside the enum fails here, not silently later


class GpuError(ColdstartError):
    pass


class NoNvidiaDriver(GpuError):
    pass


class CheckpointUnsupported(GpuError):
    pass


class CudaCallFailed(GpuError):
    def __init__(self, message: str, *, call: str, pid: int | None, result: str) -> None:
        super().__init__(message)
        self.call = call
        self.pid = pid
        self.result = result  # CUresult name, e.g. CUDA_ERROR_ILLEGAL_STATE


class LockTimeout(CudaCallFailed):
    pass


class CudaCallTimeout(GpuError):
    """A driver call did not return within its bound; the helper process running it was killed."""


class CudaStateError(GpuError):
    pass


class GpuRefused(GpuError):
    pass


class GpuNotFound(GpuError):
    pass


def _user_errors() -> tuple[type[Exception], ...]:
    from coldstart.imagefs.errors import ImageError  # plain module: no FUSE imports

    return (ColdstartError, AdapterError, ImageError)


# What the CLIs catch and print as one line (with ``exc.exit_code``).
USER_ERRORS: tuple[type[Exception], ...] = _user_errors()
