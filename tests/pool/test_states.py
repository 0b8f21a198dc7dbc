from __future__ import annotations

import itertools

import pytest

from coldstart.pool.errors import IllegalTransitionError
from coldstart.pool.inventory import Inventory
from coldstart.pool.states import TRANSITIONS, UnitState

S = UnitState


def _clock():  # type: ignore[no-untyped-def]
    ticks = itertools.count()
    return lambda: float(next(ticks))


def test_illegal_transitions_are_refused_and_change_nothing() -> None:
    inv = Inventory(_clock())
    unit = inv.add("simulated", "t")
    with pytest.raises(IllegalTransitionError, match="cannot move unit u1 from requested to idle"):
        inv.move(unit, S.IDLE)
    assert unit.state is S.REQUESTED
    assert len(inv.log) == 1


def test_released_is_terminal_and_every_state_can_reach_it() -> None:
    assert TRANSITIONS[S.RELEASED] == frozenset()
    for state in S:
        seen, todo = {state}, [state]
        while todo:
            for nxt in TRANSITIONS[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        assert S.RELEASED in seen or state is S.RELEASED


def test_assigned_only_from_idle() -> None:
    assert [s for s in S if S.ASSIGNED in TRANSITIONS[s]] == [S.IDLE]


def test_time_in_each_state_and_the_log() -> None:
    inv = Inventory(_clock())  # t = 0, 1, 2, ...
    unit = inv.add("simulated", "t")  # t=0
    for state in (S.BOOTING, S.HEALTH_CHECKING, S.IDLE, S.ASSIGNED):  # t=1..4
        inv.move(unit, state)
    assert unit.seconds_in == {S.REQUESTED: 1.0, S.BOOTING: 1.0, S.HEALTH_CHECKING: 1.0, S.IDLE: 1.0}
    assert unit.time_in(S.ASSIGNED, now=10.0) == 6.0
    assert [(t.src, t.dst) for t in inv.log][-1] == (S.IDLE, S.ASSIGNED)
    assert inv.counts()[S.ASSIGNED] == 1
