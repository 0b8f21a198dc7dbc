from __future__ import annotations

import logging

import pytest

from coldstart.launcher.errors import ReplicaStateError
from coldstart.launcher.replica import Replica, ReplicaState


def test_legal_path_logs_one_line_per_transition(caplog: pytest.LogCaptureFixture) -> None:
    replica = Replica("r7")
    with caplog.at_level(logging.INFO, logger="coldstart.lifecycle"):
        for state in (
            ReplicaState.RESTORING,
            ReplicaState.BOOTING,
            ReplicaState.READY,
            ReplicaState.DRAINING,
            ReplicaState.STOPPED,
        ):
            replica.transition(state)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5
    assert lines[0].startswith("replica r7 new -> restoring after ")
    assert caplog.records[2].__dict__["to"] == "ready"


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        ((), ReplicaState.READY),
        ((ReplicaState.BOOTING,), ReplicaState.RESTORING),
        ((ReplicaState.BOOTING, ReplicaState.READY), ReplicaState.BOOTING),
        ((ReplicaState.BOOTING, ReplicaState.FAILED, ReplicaState.STOPPED), ReplicaState.READY),
    ],
)
def test_illegal_transitions_are_refused(path: tuple[ReplicaState, ...], bad: ReplicaState) -> None:
    replica = Replica("r1")
    for state in path:
        replica.transition(state)
    before = replica.state
    with pytest.raises(ReplicaStateError, match=f"replica r1 cannot go from {before.name} to {bad.name}"):
        replica.transition(bad)
    assert replica.state is before  # state changes only after success


def test_docstring_diagram_matches_the_transition_table() -> None:
    import coldstart.launcher.replica as module

    documented = {}
    for line in (module.__doc__ or "").splitlines():
        name, sep, targets = line.strip().partition(":")
        if sep and name in ReplicaState.__members__:
            documented[ReplicaState[name]] = frozenset(ReplicaState[t] for t in targets.split())
    assert documented == module._ALLOWED


def test_serving_seconds_accumulate_only_while_busy() -> None:
    replica = Replica("r1")
    replica.begin_request()
    replica.begin_request()
    assert replica.end_request() == 0.0  # still one in flight
    assert replica.busy_since is not None
    replica.busy_since -= 0.5  # as if the requests had taken half a second
    assert replica.end_request() >= 0.5
    assert replica.in_flight == 0 and replica.busy_since is None
    assert replica.served_seconds >= 0.5
