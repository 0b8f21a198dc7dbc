"""One replica: an engine in a sandbox, with an explicit lifecycle.

    NEW ──▶ BOOTING ──▶ SNAPSHOTTING ──▶ READY ──▶ DRAINING ──▶ STOPPED
     │        └───────────────────────▶ READY
     └─▶ RESTORING ──▶ READY
            └──(restore failed)──▶ BOOTING
    any state but STOPPED ──▶ FAILED ──▶ STOPPED   (boot failed, engine exited or hung, cancelled)

The same, one line per state (``tests/launcher/test_replica_state.py`` checks it against ``_ALLOWED``):

    NEW: BOOTING RESTORING FAILED
    BOOTING: SNAPSHOTTING READY FAILED
    RESTORING: READY BOOTING FAILED
    SNAPSHOTTING: READY FAILED
    READY: DRAINING FAILED
    DRAINING: STOPPED FAILED
    FAILED: STOPPED
    STOPPED:

A state changes only after the operation it names has succeeded, and an illegal change raises
``ReplicaStateError`` ("replica r3 cannot go from BOOTING to DRAINING"). Each change is logged as one
line with the time spent in the state left behind.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass

from coldstart.launcher.errors import ReplicaStateError
from coldstart.launcher.sandboxes.base import Sandbox
from coldstart.pool import Unit

log = logging.getLogger("coldstart.lifecycle")


class StartKind(enum.StrEnum):
    """How a replica came up (a metric label and a /health field)."""

    COLD_BOOT = "cold_boot"
    RESTORE = "restore"


class FailureKind(enum.StrEnum):
    """Why a replica was taken out of service (the ``kind`` label of ``coldstart_replica_failures``)."""

    EXITED = "exited"  # its engine process exited
    UNRESPONSIVE = "unresponsive"  # its liveness probe failed twice in a row
    BOOT = "boot"  # it never came up
    UNIT = "unit"  # its unit failed (a GPU's critical XID, a cluster node gone)
    OTHER = "other"


@dataclass(frozen=True)
class Swap:
    """The eviction that freed this replica's unit: logged and timed when the replica is ready."""

    evicted_model: str
    evicted_replica: str
    started: float  # monotonic, when the eviction began


class ReplicaState(enum.Enum):
    NEW = "new"
    BOOTING = "booting"
    RESTORING = "restoring"
    SNAPSHOTTING = "snapshotting"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"
    STOPPED = "stopped"


_ALLOWED: dict[ReplicaState, frozenset[ReplicaState]] = {
    ReplicaState.NEW: frozenset({ReplicaState.BOOTING, ReplicaState.RESTORING, ReplicaState.FAILED}),
    ReplicaState.BOOTING: frozenset({ReplicaState.READY, ReplicaState.SNAPSHOTTING, ReplicaState.FAILED}),
    ReplicaState.RESTORING: frozenset({ReplicaState.READY, ReplicaState.BOOTING, ReplicaState.FAILED}),
    ReplicaState.SNAPSHOTTING: frozenset({ReplicaState.READY, ReplicaState.FAILED}),
    ReplicaState.READY: frozenset({ReplicaState.DRAINING, ReplicaState.FAILED}),
    ReplicaState.DRAINING: frozenset({ReplicaState.STOPPED, ReplicaState.FAILED}),
    ReplicaState.FAILED: frozenset({ReplicaState.STOPPED}),
    ReplicaState.STOPPED: frozenset(),
}


class Replica:
    def __init__(self, replica_id: str, deployment: str = "") -> None:
        self.id = replica_id
        self.deployment = deployment  # the public model name of its deployment
        self.state = ReplicaState.NEW
        self.sandbox: Sandbox | None = None
        self.in_flight = 0
        self.created_at = time.monotonic()
        self.state_since = self.created_at
        self.last_used = self.created_at
        self.ready_at: float | None = None
        self.busy_since: float | None = None  # set while in_flight > 0: GPU-seconds serving
        self.served_seconds = 0.0
        self.how: StartKind | None = None  # how this replica came up
        self.unit: Unit | None = None  # the pool unit (GPU or CPU slot) the replica runs on
        self.unit_failure: str | None = None  # why its unit failed (a GPU's XID): handed back as failed
        self.memory = 0  # resident bytes measured once it was ready (0: unknown)
        self.swap: Swap | None = None  # set when it was placed on a unit freed by an eviction

    def transition(self, new: ReplicaState, **details: object) -> float:
        """Move to ``new`` (if legal), log one line, and return the seconds spent in the old state."""
        if new not in _ALLOWED[self.state]:
            raise ReplicaStateError(f"replica {self.id} cannot go from {self.state.name} to {new.name}")
        now = time.monotonic()
        spent = now - self.state_since
        old, self.state, self.state_since = self.state, new, now
        if new is ReplicaState.READY:
            self.ready_at = now
            self.last_used = now
        extra = "".join(f" {k}={v}" for k, v in details.items())
        log.info(
            "replica %s%s %s -> %s after %.2fs%s",
            self.id,
            f" ({self.deployment})" if self.deployment else "",
            old.value,
            new.value,
            spent,
            extra,
            extra={
                "event": "transition",
                "replica": self.id,
                "model": self.deployment,
                "from": old.value,
                "to": new.value,
                "duration_s": round(spent, 4),
                **details,
            },
        )
        return spent

    # -- request accounting (GPU allocation utilization = serving seconds / held seconds) --
    def begin_request(self) -> None:
        if self.in_flight == 0:
            self.busy_since = time.monotonic()
        self.in_flight += 1

    def end_request(self) -> float:
        """Returns the serving seconds to account when the replica went idle, else 0."""
        self.in_flight -= 1
        now = time.monotonic()
        self.last_used = now
        if self.in_flight == 0 and self.busy_since is not None:
            served, self.busy_since = now - self.busy_since, None
            self.served_seconds += served
            return served
        return 0.0
