"""Inventory: every unit the pool holds, its state, the time spent in each state, and a log of every move.

The guard (``Inventory.move``) is the only place a unit's state changes; it refuses illegal moves with
``IllegalTransitionError`` and logs one line per transition with the time spent in the previous state.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from coldstart.pool.errors import IllegalTransitionError
from coldstart.pool.providers.base import Device
from coldstart.pool.states import UnitState, can_move

log = logging.getLogger("coldstart.pool")


@dataclass(frozen=True)
class Transition:
    at: float
    unit_id: str
    src: UnitState | None
    dst: UnitState
    reason: str


@dataclass
class Unit:
    """One GPU (or CPU slot) the pool pays for. ``device`` is set once the provider has booted it."""

    id: str
    provider: str
    type_name: str
    state: UnitState
    since: float
    device: Device | None = None
    # seconds spent in each state, closed intervals only (the current one is added by ``time_in``)
    seconds_in: dict[UnitState, float] = field(default_factory=dict)
    last_health: str = ""

    def time_in(self, state: UnitState, now: float) -> float:
        open_part = now - self.since if self.state is state else 0.0
        return self.seconds_in.get(state, 0.0) + open_part

    @property
    def label(self) -> str:
        return self.device.label if self.device else f"{self.provider}:{self.type_name}"


class Inventory:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._ids = itertools.count(1)
        self.units: dict[str, Unit] = {}
        self.log: list[Transition] = []

    def add(self, provider: str, type_name: str, reason: str = "buffer below target") -> Unit:
        now = self._clock()
        unit = Unit(f"u{next(self._ids)}", provider, type_name, UnitState.REQUESTED, now)
        self.units[unit.id] = unit
        self.log.append(Transition(now, unit.id, None, UnitState.REQUESTED, reason))
        log.info("unit %s requested from %s (%s): %s", unit.id, provider, type_name, reason)
        return unit

    def move(self, unit: Unit, dst: UnitState, reason: str = "") -> None:
        if not can_move(unit.state, dst):
            raise IllegalTransitionError(
                f"cannot move unit {unit.id} from {unit.state.value} to {dst.value}"
                + (f" ({reason})" if reason else "")
            )
        now = self._clock()
        spent = now - unit.since
        unit.seconds_in[unit.state] = unit.seconds_in.get(unit.state, 0.0) + spent
        self.log.append(Transition(now, unit.id, unit.state, dst, reason))
        log.info(
            "unit %s %s -> %s after %.3fs%s",
            unit.id,
            unit.state.value,
            dst.value,
            spent,
            f": {reason}" if reason else "",
        )
        unit.state, unit.since = dst, now

    def in_state(self, *states: UnitState) -> list[Unit]:
        return [u for u in self.units.values() if u.state in states]

    def counts(self) -> dict[UnitState, int]:
        out = {s: 0 for s in UnitState}
        for u in self.units.values():
            out[u.state] += 1
        return out
