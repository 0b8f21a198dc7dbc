"""``RayHost`` on a real two-node Ray cluster (``ray_nodes.py``): real Ray, the real ``transformers serve`` on
the tiny model, real CRIU, in network namespaces. The test process is the gateway (Ray Client); until the
gateway drives ``RayHost``, the tests call ``start``/``stop`` with a stand-in deployment.

In order (one cluster and one gateway for the module):
  node A cold-boots and snapshots (B's unit held by a blocker), publishes; B pulls the snapshot ahead;
  with A's unit busy, a replica at zero is placed on B, restores A's snapshot from B's own store, and gives
  the same greedy answer; the buffer reaches Ray's autoscaler; a gateway killed -9 and restarted removes the
  actor and engine it left; B killed -> B's replica fails (exit code -1), a request in flight to it fails,
  the next replica is placed on A and restores; a clean close leaves no actor, engine or namespace.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from coldstart.launcher.config import ServeConfig
from coldstart.launcher.metrics import Metrics, ModelMetrics
from coldstart.launcher.replica import Replica, StartKind

pytestmark = [
    pytest.mark.slow,
    # Ray Client's streaming thread raises InvalidStateError(CANCELLED) when the session is shut down.
    pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning"),
]


@dataclass
class StandIn:
    """The lead's ``Deployment``, as far as ``RayHost`` reads it."""

    name: str
    config: ServeConfig
    metrics: ModelMetrics


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def host(cluster: Any, loop: asyncio.AbstractEventLoop) -> Iterator[Any]:
    from coldstart.launcher.cluster.ray_host import RayHost

    gateway = RayHost(cluster.address, ServeConfig(), Metrics(), gateway_id=f"gw-test{os.getpid()}")
    yield gateway
    loop.run_until_complete(gateway.close())


@pytest.fixture(scope="module")
def tiny(tiny_model: Path) -> StandIn:
    config = ServeConfig(engine="transformers", model=str(tiny_model), snapshot="criu", boot_timeout=300)
    MODEL["name"] = str(tiny_model)
    return StandIn("tiny", config, Metrics().for_model("tiny"))


def node_id(ip: str) -> str:
    import ray

    return next(n["NodeID"] for n in ray.nodes() if n["NodeManagerAddress"] == ip and n["Alive"])


def block_unit(ip: str) -> Any:
    """An actor holding the one unit of the node at ``ip``."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from coldstart.launcher.cluster.node import SLOT

    class Blocker:  # defined here: pickled by value (the workers cannot import this test module)
        def ping(self) -> bool:
            return True

    actor = (
        ray.remote(Blocker)
        .options(
            num_cpus=0,
            resources={SLOT: 1},
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id(ip), soft=False),
        )
        .remote()
    )
    ray.get(actor.ping.remote(), timeout=60)
    return actor


MODEL: dict[str, str] = {}  # the engine's own model name (the tiny model's path)


def greedy(base_url: str, prompt: str = "hello there", max_tokens: int = 8) -> str:
    body = {
        "model": MODEL["name"],
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120, trust_env=False)
    response.raise_for_status()
    return str(response.json()["choices"][0]["message"]["content"])


def stream_until_cut(base_url: str, started: threading.Event) -> None:
    """Stream a long greedy answer; ``started`` is set at its first chunk. Raises ``httpx.HTTPError`` when
    the connection is cut mid-answer; returns when the answer ends (the test then fails: nothing was cut)."""
    body = {
        "model": MODEL["name"],
        "messages": [{"role": "user", "content": "tell me a long story"}],
        "max_tokens": 2000,
        "temperature": 0,
        "stream": True,
    }
    url = f"{base_url}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, timeout=120, trust_env=False) as response:
        response.raise_for_status()
        for _ in response.iter_lines():
            started.set()


def wait_for(predicate: Any, timeout: float, loop: asyncio.AbstractEventLoop, what: str) -> None:
    async def poll() -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.1)

    loop.run_until_complete(poll())


STATE: dict[str, Any] = {}


def test_node_a_cold_boots_snapshots_and_b_pulls_it_ahead(
    cluster: Any, host: Any, tiny: StandIn, loop: Any
) -> None:
    import ray

    blocker = block_unit(cluster.b.ip)  # B's unit busy: the first replica goes to A
    try:
        r1 = Replica("r1", "tiny")
        how = loop.run_until_complete(host.start(tiny, r1))
    finally:
        ray.kill(blocker)
    assert how is StartKind.COLD_BOOT
    placed = host.placements["r1"]
    assert placed.node_ip == cluster.a.ip
    assert r1.sandbox is not None and r1.sandbox.base_url.startswith(f"http://{cluster.a.ip}:")
    STATE["answer"] = greedy(r1.sandbox.base_url)
    # Healthy as liveness probes it: by its actor on node A, where the engine's snapshot_hooks control channel
    # is (the relay carries the engine's port alone; through it the probe could never reach the channel).
    assert loop.run_until_complete(r1.sandbox.is_healthy(None, None)) is True
    STATE["r1"] = r1
    STATE.setdefault("actor_pids", []).append(r1.sandbox.report.actor_pid)
    key = host._keys["tiny"]
    assert cluster.a.snapshot_dir.joinpath(key).is_dir() or any(cluster.a.snapshot_dir.glob(f"*{key}*"))
    # Published by A; B pulls it ahead into its own store.
    b_id = node_id(cluster.b.ip)
    wait_for(lambda: b_id in host.holders.get(key, set()), 180, loop, "B to pull the snapshot ahead")
    assert any(p["node_id"] == b_id and p["pulled"] for p in host.pulls)


def test_with_a_busy_a_replica_at_zero_goes_to_b_and_restores_the_same_answer(
    cluster: Any, host: Any, tiny: StandIn, loop: Any
) -> None:
    r2 = Replica("r2", "tiny")
    how = loop.run_until_complete(host.start(tiny, r2))
    placed = host.placements["r2"]
    assert placed.node_ip == cluster.b.ip
    assert how is StartKind.RESTORE, placed
    assert "pull" not in placed.timings  # pulled ahead: restored from B's own store
    assert greedy(r2.sandbox.base_url) == STATE["answer"]
    STATE["r2"] = r2
    STATE["actor_pids"].append(r2.sandbox.report.actor_pid)


def test_the_buffer_reaches_the_autoscaler(host: Any, loop: Any) -> None:
    import ray

    async def in_the_loop() -> None:  # as the gateway calls it
        host.set_buffer(1)

    loop.run_until_complete(in_the_loop())

    def requested() -> Any:
        from ray.experimental.internal_kv import _internal_kv_get

        return _internal_kv_get(b"autoscaler_resource_request")

    async def settle() -> None:
        await asyncio.sleep(3.0)

    loop.run_until_complete(settle())
    got = ray.get(ray.remote(requested).options(num_cpus=0).remote(), timeout=60)
    assert got is not None and b"coldstart_slot" in got, got
    # two replicas + one free unit
    assert got.count(b"coldstart_slot") == 3, got


GATEWAY = """
import asyncio, sys
from coldstart.launcher.cluster.ray_host import RayHost
from coldstart.launcher.config import ServeConfig
from coldstart.launcher.metrics import Metrics, ModelMetrics
from coldstart.launcher.replica import Replica

class Tiny:
    name = "tiny"
    config = ServeConfig(engine="transformers", model=sys.argv[3], snapshot="criu", boot_timeout=300)
    metrics = Metrics().for_model("tiny")

async def main():
    host = RayHost(sys.argv[1], ServeConfig(), Metrics(), gateway_id=sys.argv[2])
    replica = Replica("r9", "tiny")
    await host.start(Tiny, replica)
    print("READY", replica.sandbox.base_url, host.placements["r9"].node_ip, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""
RESTARTED = """
import json, sys
from coldstart.launcher.cluster.ray_host import RayHost
from coldstart.launcher.config import ServeConfig
from coldstart.launcher.metrics import Metrics

print(json.dumps(RayHost(sys.argv[1], ServeConfig(), Metrics(), gateway_id=sys.argv[2]).removed), flush=True)
"""


def actor_leftovers(pid: int) -> list[str]:
    """What the replica actor with process ``pid`` (on either node) left: the process, its namespaces."""
    left = [f"netns {p.name}" for p in Path("/run/netns").glob(f"cs-{pid}-*")]
    return left + ([f"process {pid}"] if Path(f"/proc/{pid}").exists() else [])


def test_a_gateway_killed_and_restarted_removes_what_it_left(
    cluster: Any, host: Any, tiny: StandIn, tiny_model: Path, loop: Any
) -> None:
    """A second gateway (its own process and id) starts a replica on B and is killed -9: its detached actor
    and engine outlive it; the same gateway started again finds and removes them, and nothing is left."""
    loop.run_until_complete(host.stop(STATE.pop("r2"), 5.0))  # B's unit free for the orphan
    gateway_id = f"gw-killed{os.getpid()}"
    argv = [sys.executable, "-c", GATEWAY, cluster.address, gateway_id, str(tiny_model)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("READY"), line
        _, base_url, node_ip = line.split()
        assert node_ip == cluster.b.ip
        assert greedy(base_url) == STATE["answer"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert greedy(base_url) == STATE["answer"]  # the orphan still serves: nothing stopped it
    import ray

    orphan = ray.get_actor(f"{gateway_id}.tiny.r9", namespace="coldstart")
    orphan_pid = ray.get(orphan.pid.remote(), timeout=30)
    # The gateway started again: its own process (one Ray Client session per process).
    restarted = [sys.executable, "-c", RESTARTED, cluster.address, gateway_id]
    done = subprocess.run(restarted, capture_output=True, text=True, timeout=300)
    assert json.loads(done.stdout.splitlines()[-1]) == [f"{gateway_id}.tiny.r9"], done.stderr[-2000:]
    with pytest.raises(httpx.HTTPError):
        greedy(base_url)
    wait_for(lambda: actor_leftovers(orphan_pid) == [], 30, loop, "the orphan's process and namespace to go")
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    assert not any(n.startswith(gateway_id) for n in names)


def test_node_b_killed_its_replica_fails_and_the_next_goes_to_a(
    cluster: Any, host: Any, tiny: StandIn, loop: Any
) -> None:
    r1 = STATE["r1"]
    r2 = Replica("r4", "tiny")  # with A's unit busy (r1): on B, restored from B's store
    loop.run_until_complete(host.start(tiny, r2))
    assert host.placements["r4"].node_ip == cluster.b.ip
    STATE["actor_pids"].append(r2.sandbox.report.actor_pid)
    # A request in flight to B when B dies fails (the gateway turns it into an OpenAI-shaped 502).
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # Killed at its first streamed chunk (a few hundred tokens follow: seconds on the tiny model); a
        # fixed sleep let the whole answer finish first on a fast run.
        generating = threading.Event()
        inflight = pool.submit(stream_until_cut, r2.sandbox.base_url, generating)
        assert generating.wait(120), "the long answer never started"
        t0 = time.monotonic()
        cluster.kill_node(cluster.b)
        with pytest.raises(httpx.HTTPError):
            inflight.result(timeout=120)
    wait_for(lambda: r2.sandbox.exit_code() is not None, 60, loop, "B's replica to be seen dead")
    seen_dead = time.monotonic() - t0
    assert r2.sandbox.exit_code() == -1
    loop.run_until_complete(host.stop(r2, 2.0))
    assert greedy(r1.sandbox.base_url) == STATE["answer"]  # A still serves
    loop.run_until_complete(host.stop(r1, 5.0))
    r3 = Replica("r3", "tiny")
    how = loop.run_until_complete(host.start(tiny, r3))
    assert host.placements["r3"].node_ip == cluster.a.ip and how is StartKind.RESTORE
    STATE["actor_pids"].append(r3.sandbox.report.actor_pid)
    assert greedy(r3.sandbox.base_url) == STATE["answer"]
    replaced = time.monotonic() - t0
    print(
        f"node B killed: its replica seen dead after {seen_dead:.1f}s, "
        f"a new one serving on A after {replaced:.1f}s"
    )
    loop.run_until_complete(host.stop(r3, 5.0))


def test_a_clean_close_leaves_nothing(cluster: Any, host: Any, loop: Any) -> None:
    import ray

    from coldstart.launcher.cluster.ray_host import connect

    pids = [h.report.actor_pid for h in host._handles.values()]
    loop.run_until_complete(host.close())
    connect(cluster.address)  # retried as the gateway's own: a new Ray Client session may miss its start
    try:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
        assert not any(n.startswith(host.gateway_id) for n in names), names
    finally:
        ray.shutdown()
    for pid in STATE.get("actor_pids", []) + pids:
        assert actor_leftovers(int(pid)) == []
