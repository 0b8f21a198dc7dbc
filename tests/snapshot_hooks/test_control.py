"""The control channel over real TCP: results, failures, and no socket left in the engine afterwards."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest

from coldstart.snapshot_hooks import HookRegistry, Phase, serve
from coldstart.snapshot_hooks.client import (
    control_url_for,
    get_state,
    run_after_restore,
    run_before_checkpoint,
)
from coldstart.snapshot_hooks.control import ControlServer
from coldstart.snapshot_hooks.errors import (
    CheckpointAborted,
    ControlPortError,
    ControlUnreachable,
    RestoreHooksFailed,
)

TCP_STATES = {"01": "ESTABLISHED", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN"}


def _sockets(port: int) -> list[tuple[str, str]]:
    """(side, state) of every IPv4 TCP socket touching ``port``: 'server' if it is the local port."""
    out = []
    with open("/proc/net/tcp", encoding="ascii") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, remote, state = (
                int(fields[1].split(":")[1], 16),
                int(fields[2].split(":")[1], 16),
                fields[3],
            )
            if port in (local, remote):
                out.append(("server" if local == port else "client", TCP_STATES.get(state, state)))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def registry() -> HookRegistry:
    return HookRegistry()


@pytest.fixture
def server(registry: HookRegistry) -> Iterator[ControlServer]:
    with ControlServer(registry, "127.0.0.1", _free_port()) as srv:
        yield srv


def _url(server: ControlServer) -> str:
    host, port = server.address
    return f"http://{host}:{port}"


def test_control_url_is_the_engine_host_at_port_plus_one() -> None:
    assert control_url_for("http://10.88.0.2:8000") == "http://10.88.0.2:8001"
    assert control_url_for("http://[fd00::2]:8000") == "http://[fd00::2]:8001"
    assert control_url_for("http://127.0.0.1:65535") == "http://127.0.0.1:65534"


def test_phases_over_tcp_and_the_engine_keeps_no_connection(
    server: ControlServer, registry: HookRegistry
) -> None:
    calls: list[str] = []
    registry.register(Phase.BEFORE_CHECKPOINT, lambda: calls.append("offload"), name="offload")
    registry.register(Phase.AFTER_RESTORE, lambda: calls.append("reload"), name="reload")
    url = _url(server)

    async def drive() -> tuple[dict, dict, dict]:
        state = await get_state(url)
        before = await run_before_checkpoint(url, 10)
        after = await run_after_restore(url, 10)
        return state, before, after

    state, before, after = asyncio.run(drive())
    assert state["state"] == "serving" and state["hooks"] == {
        "before_checkpoint": ["offload"],
        "after_restore": ["reload"],
    }
    assert before["state"] == "checkpoint_ready" and [h["name"] for h in before["hooks"]] == ["offload"]
    assert after["state"] == "serving" and calls == ["offload", "reload"]
    # The launcher closed first: TIME_WAIT is on its side; the engine has nothing but its listener left
    # (its side of each connection goes through LAST_ACK to CLOSED as soon as the final ACK arrives).
    port = server.address[1]
    deadline = time.monotonic() + 5
    while (
        any(side == "server" and st != "LISTEN" for side, st in _sockets(port))
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    sockets = _sockets(port)
    assert [s for s in sockets if s[0] == "server"] == [("server", "LISTEN")]
    assert ("client", "TIME_WAIT") in sockets


def test_failed_before_checkpoint_raises_checkpoint_aborted_engine_serving(
    server: ControlServer, registry: HookRegistry
) -> None:
    def fail() -> None:
        raise RuntimeError("requests in flight")

    registry.register(Phase.BEFORE_CHECKPOINT, fail, name="drain")
    with pytest.raises(CheckpointAborted) as info:
        asyncio.run(run_before_checkpoint(_url(server), 10))
    assert info.value.hook == "drain" and info.value.serving
    assert "before_checkpoint hook 'drain' failed: RuntimeError: requests in flight" in str(info.value)
    assert "keeps serving" in str(info.value)
    assert asyncio.run(get_state(_url(server)))["state"] == "serving"


def test_failed_after_restore_raises_restore_hooks_failed(
    server: ControlServer, registry: HookRegistry
) -> None:
    registry.register(Phase.AFTER_RESTORE, lambda: 1 / 0, name="reload")
    url = _url(server)
    asyncio.run(run_before_checkpoint(url, 10))
    with pytest.raises(
        RestoreHooksFailed, match="after_restore hook 'reload' failed: ZeroDivisionError"
    ) as info:
        asyncio.run(run_after_restore(url, 10))
    assert not info.value.serving
    assert asyncio.run(get_state(url))["state"] == "broken"


def test_phase_in_wrong_state_is_refused(server: ControlServer) -> None:
    with pytest.raises(RestoreHooksFailed, match="cannot run after_restore in state serving"):
        asyncio.run(run_after_restore(_url(server), 10))


def test_unreachable_control_channel_says_what_to_check() -> None:
    with pytest.raises(ControlUnreachable, match=r"snapshot_hooks.serve\(\)"):
        asyncio.run(get_state(f"http://127.0.0.1:{_free_port()}"))


def test_serve_is_a_no_op_outside_coldstart(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLDSTART_CONTROL_PORT", raising=False)
    assert serve(registry=HookRegistry()) is None


def test_busy_control_port_is_named(server: ControlServer) -> None:
    host, port = server.address
    with pytest.raises(ControlPortError, match=f"cannot listen on {host}:{port}"):
        ControlServer(HookRegistry(), host, port)
