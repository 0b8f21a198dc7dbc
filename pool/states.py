"""The lifecycle of one GPU unit, as an enum and the table of legal moves.

::

    REQUESTED ─▶ BOOTING ─▶ HEALTH_CHECKING ─▶ IDLE ─▶ ASSIGNED ─▶ DRAINING ─▶ IDLE (back to buffer)
        │           │              │             │  ▲       │          │
        └───────────┴──────────────┴─────────────┴──┼───────┴──────────┴─▶ FAILED ─▶ RELEASED
                                        IDLE ─▶ HEALTH_CHECKING (deep check on a slow cadence)
    IDLE / DRAINING / FAILED ─▶ RELEASED (handed back to the provider; terminal)

A unit is paid for from REQUESTED until RELEASED; it runs application code only while ASSIGNED.
"""

from __future__ import annotations

import enum


class UnitState(enum.Enum):
    REQUESTED = "requested"
    BOOTING = "booting"
    HEALTH_CHECKING = "health-checking"
    IDLE = "idle"
    ASSIGNED = "assigned"
    DRAINING = "draining"
    FAILED = "failed"
    RELEASED = "released"


_S = UnitState
TRANSITIONS: dict[UnitState, frozenset[UnitState]] = {
    _S.REQUESTED: frozenset({_S.BOOTING, _S.FAILED}),
    _S.BOOTING: frozenset({_S.HEALTH_CHECKING, _S.FAILED}),
    _S.HEALTH_CHECKING: frozenset({_S.IDLE, _S.FAILED}),
    _S.IDLE: frozenset({_S.ASSIGNED, _S.HEALTH_CHECKING, _S.FAILED, _S.RELEASED}),
    _S.ASSIGNED: frozenset({_S.DRAINING, _S.FAILED}),
    _S.DRAINING: frozenset({_S.IDLE, _S.HEALTH_CHECKING, _S.FAILED, _S.RELEASED}),
    _S.FAILED: frozenset({_S.RELEASED}),
    _S.RELEASED: frozenset(),
}


def can_move(src: UnitState, dst: UnitState) -> bool:
    return dst in TRANSITIONS[src]
