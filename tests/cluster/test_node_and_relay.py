"""Fast parts of the cluster host, without Ray: a node's settings and its ``ray start`` line, the actor's
relay (a real TCP relay between local sockets), the node a replica is placed on, and that nothing of Ray is
imported without ``--cluster``."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from coldstart.launcher.cluster.actor import Relay
from coldstart.launcher.cluster.node import CONFIG_ENV, SLOT, NodeSettings, NodeStart, with_node
from coldstart.launcher.config import ServeConfig
from coldstart.launcher.errors import UsageError


def test_node_settings_round_trip_and_reach_the_deployment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = NodeSettings(
        tmp_path / "snaps", tmp_path / "run", ("http://cache:8700", "/srv/origin"), Path("/srv/o")
    )
    node.write(tmp_path / "node.json")
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "node.json"))
    assert NodeSettings.load() == node
    config = with_node(ServeConfig(model="m", snapshot_publish=Path("/elsewhere")), node)
    assert config.snapshot_dir == tmp_path / "snaps" and config.work_dir == tmp_path / "run"
    assert config.snapshot_tiers == "http://cache:8700,/srv/origin"
    assert config.snapshot_publish is None  # the actor publishes itself, then the others pull


def test_a_node_not_started_by_coldstart_says_what_to_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    with pytest.raises(UsageError, match="coldstart node start"):
        NodeSettings.load()
    (tmp_path / "bad.json").write_text("{")
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "bad.json"))
    with pytest.raises(UsageError, match="cannot read"):
        NodeSettings.load()


def test_ray_start_lines() -> None:
    settings = NodeSettings(Path("/s"), Path("/w"))
    head = NodeStart(settings, head=True, address=None, node_ip="10.0.0.1", units=2, temp_dir=Path("/tmp/r"))
    argv = head.argv("ray")
    assert argv[:2] == ["ray", "start"] and "--head" in argv and "--ray-client-server-port" in argv
    assert json.loads(argv[argv.index("--resources") + 1]) == {SLOT: 2}
    assert argv[argv.index("--temp-dir") + 1] == "/tmp/r"
    worker = NodeStart(
        settings, head=False, address="10.0.0.1:6379", node_ip=None, units=1, temp_dir=Path("/t")
    )
    assert "--address" in worker.argv() and "--head" not in worker.argv()
    with pytest.raises(UsageError, match="--address"):
        NodeStart(settings, head=False, address=None, node_ip=None, units=1, temp_dir=Path("/t")).argv()


async def _echo_server() -> tuple[asyncio.Server, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data.upper())
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_the_relay_pipes_both_ways_and_refuses_other_peers() -> None:
    async def run() -> None:
        server, port = await _echo_server()
        relay = Relay(f"http://127.0.0.1:{port}", frozenset({"127.0.0.1"}))
        relay_port = await relay.open("127.0.0.1")
        reader, writer = await asyncio.open_connection("127.0.0.1", relay_port)
        big = b"x" * (3 << 20)  # bigger than one read: piped chunk by chunk, in order
        writer.write(b"hello " + big)
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(-1), 10)
        assert got == b"HELLO " + big.upper()
        writer.close()
        refusing = Relay(f"http://127.0.0.1:{port}", frozenset({"10.9.9.9"}))
        refusing_port = await refusing.open("127.0.0.1")
        reader, writer = await asyncio.open_connection("127.0.0.1", refusing_port)
        assert await asyncio.wait_for(reader.read(-1), 10) == b""  # closed without a byte
        writer.close()
        # The engine gone: the relay closes the client's connection (the gateway probes the replica).
        server.close()
        await server.wait_closed()
        reader, writer = await asyncio.open_connection("127.0.0.1", relay_port)
        assert await asyncio.wait_for(reader.read(-1), 10) == b""
        writer.close()
        await relay.close()
        await refusing.close()

    asyncio.run(run())


def test_nothing_of_ray_is_imported_without_cluster() -> None:
    code = (
        "import sys, coldstart.launcher.server, coldstart.launcher.cli.serve, coldstart.launcher.cli.main;"
        "print(any(m == 'ray' or m.startswith('ray.') for m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


def test_choose_node_takes_a_free_unit_holders_first() -> None:
    from coldstart.launcher.cluster.ray_host import choose_node

    units = {"a": 1, "b": 1}
    assert choose_node(units, [], {"a"}) == "a"  # the snapshot is there
    assert choose_node(units, ["a"], {"a"}) == "b"  # a's unit is busy: never wait on it
    assert choose_node(units, ["a", "b"], {"a", "b"}) is None  # nothing free by our count: Ray decides
    assert choose_node({"a": 2, "b": 2}, ["a"], set()) == "b"  # the least loaded
    assert choose_node({"a": 2, "b": 1}, [], {"b"}) == "b"
    assert choose_node({"a": 0, "b": 1}, [], set()) == "b"  # a declares no unit


def test_node_stop_finds_what_inherited_the_nodes_environment(tmp_path: Path) -> None:
    """The head's Ray Client servers name neither the node's temp dir nor a parent of ours (they were left
    running by ``coldstart node stop`` on a one-machine cluster): a process that inherited ``coldstart node
    start``'s ``COLDSTART_NODE_CONFIG`` for this node is found; one of another node is not."""
    from coldstart.launcher.cli.node import node_processes
    from coldstart.launcher.cluster.node import CONFIG_NAME

    ours, theirs = tmp_path / "ray-a", tmp_path / "ray-b"
    procs = [
        subprocess.Popen(["sleep", "60"], env={CONFIG_ENV: str(temp / CONFIG_NAME)})
        for temp in (ours, theirs)
    ]
    try:
        found = node_processes(ours)
        assert procs[0].pid in found and procs[1].pid not in found
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_relays_let_in_the_gateways_address_toward_every_node() -> None:
    """A one-machine cluster reached at 127.0.0.1 whose node Ray advertises by its eth0 address: the
    gateway's connections to that node's relay come from the eth0 address, which must be let in."""
    from coldstart.launcher.cluster.ray_host import RayHost, _own_addresses

    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True
    )
    addresses = [line.split()[3].split("/")[0] for line in out.stdout.splitlines()]
    if not addresses:
        pytest.skip("no global IPv4 address on this machine")
    host = object.__new__(RayHost)
    host.allowed = _own_addresses("ray://127.0.0.1:10001")
    host.alive_nodes = lambda: [{"NodeManagerAddress": addresses[0]}]  # type: ignore[method-assign]
    assert host.allowed == ("127.0.0.1",)
    assert set(host.peers()) == {"127.0.0.1", addresses[0]}
