"""Fixtures of the launcher tests: which real checkpointers work here."""

from __future__ import annotations

import os

import pytest

from coldstart.launcher.errors import CheckpointerUnavailable


def _working_checkpointer(name: str):  # type: ignore[no-untyped-def]
    from coldstart.launcher.checkpointers.registry import get_checkpointer

    if os.geteuid() != 0:
        pytest.skip(f"{name} needs root")
    checkpointer = get_checkpointer(name)
    try:
        checkpointer.probe()
    except CheckpointerUnavailable as exc:
        pytest.skip(f"{name} unavailable here: {exc}")
    return checkpointer


@pytest.fixture
def working_checkpointer():  # type: ignore[no-untyped-def]
    """``working_checkpointer(name)``: the named checkpointer probed, or a skip with the reason (they
    need root, CRIU >= 4.2 or runsc with --compression: .ci/install-checkpointers)."""
    return _working_checkpointer
