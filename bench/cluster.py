"""Replicas on a Ray cluster: request at zero -> first token, on each kind of node; Ray's placement alone;
a node's death to a replacement serving; the relay's cost.

Two Ray nodes on one machine (``tests/cluster/ray_nodes.py``: two network namespaces on a bridge, each a
``coldstart node`` with its own Ray temp dir and snapshot store; both publish into one origin store and pull
from it). This process is the gateway, through Ray Client, and drives ``RayHost`` directly. The engine is
``transformers serve`` on the tiny model under CRIU. Each row starts a replica from zero (``RayHost.start``)
and sends one greedy request (max_tokens 1) through the node's relay: the clock covers placement, the
actor's set-up, lookup, pull, gate, restore, canary, the relay and the first token.

    A, local                    A took the snapshot: restore from A's own store (the baseline)
    B, pulled ahead             A published it, B pulled it ahead (``pull_ahead``): restore from B's store
    B, pulled on demand         B's copy removed: the restore pulls it from the origin first
    placement alone             actor created -> running on its node (no engine)
    node death -> serving       B killed (its raylet and every process, its namespace removed) with a replica
                                on it: until that replica is seen dead (-1), and until a new one serves on A
    relay                       one small completion through the relay vs straight to the sandbox, from
                                inside node A (medians of 20)

    sudo flock /tmp/coldstart-heavy.lock .venv/bin/python bench/cluster.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "cluster"))  # the two-node harness the tests use

import httpx  # noqa: E402
from ray_nodes import RayNodes  # noqa: E402

from coldstart.launcher.config import ServeConfig  # noqa: E402
from coldstart.launcher.metrics import Metrics  # noqa: E402
from coldstart.launcher.replica import Replica  # noqa: E402
from coldstart.launcher.tiny_model import make_model  # noqa: E402


class Deployment:
    def __init__(self, model: Path) -> None:
        self.name = "tiny"
        self.config = ServeConfig(engine="transformers", model=str(model), snapshot="criu", boot_timeout=300)
        self.metrics = Metrics().for_model("tiny")


MODEL = str(REPO / ".cache" / "models" / "tiny")


def first_token(base_url: str) -> None:
    messages = [{"role": "user", "content": "hi"}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 1, "temperature": 0}
    httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120, trust_env=False).raise_for_status()


class Bench:
    def __init__(self, cluster: RayNodes, deployment: Deployment) -> None:
        from coldstart.launcher.cluster.ray_host import RayHost

        self.cluster = cluster
        self.d = deployment
        self.host = RayHost(cluster.address, ServeConfig(), Metrics(), gateway_id="gw-bench")
        self.host.allowed += (cluster.a.ip,)  # the relay-cost row asks from inside node A
        self.loop = asyncio.new_event_loop()
        self.n = 0

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def start(self) -> tuple[Replica, float]:
        """A replica from zero and its first token: (replica, seconds)."""
        self.n += 1
        replica = Replica(f"r{self.n}", "tiny")
        t0 = time.monotonic()
        self.run(self.host.start(self.d, replica))
        assert replica.sandbox is not None
        first_token(replica.sandbox.base_url)
        return replica, time.monotonic() - t0

    def stop(self, replica: Replica) -> None:
        self.run(self.host.stop(replica, 5.0))

    def block(self, ip: str) -> Any:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = next(n["NodeID"] for n in ray.nodes() if n["NodeManagerAddress"] == ip and n["Alive"])

        class Blocker:
            def ping(self) -> bool:
                return True

        actor = (
            ray.remote(Blocker)
            .options(
                num_cpus=0,
                resources={"coldstart_slot": 1},
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            )
            .remote()
        )
        ray.get(actor.ping.remote(), timeout=60)
        return actor

    def wait(self, predicate: Any, timeout: float) -> None:
        async def poll() -> None:
            deadline = time.monotonic() + timeout
            while not predicate() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)

        self.run(poll())


def relay_cost(cluster: RayNodes, relay_url: str, engine_url: str, n: int = 20) -> tuple[float, float]:
    """Median seconds of one small completion through the relay and straight to the sandbox, from node A."""
    script = f"""
import httpx, statistics, time
messages = [{{"role": "user", "content": "hi"}}]
body = {{"model": {MODEL!r}, "messages": messages, "max_tokens": 1, "temperature": 0}}
out = []
for url in ({relay_url!r}, {engine_url!r}):
    with httpx.Client(trust_env=False, timeout=60) as c:
        c.post(url + "/v1/chat/completions", json=body)
        ts = []
        for _ in range({n}):
            t = time.perf_counter(); c.post(url + "/v1/chat/completions", json=body).raise_for_status()
            ts.append(time.perf_counter() - t)
    out.append(statistics.median(ts))
print(*out)
"""
    done = subprocess.run(
        [*cluster.a.enter(), sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    relay, direct = (float(x) for x in done.stdout.split())
    return relay, direct


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    model = REPO / ".cache" / "models" / "tiny"
    if not (model / "config.json").exists():
        make_model(model, "tiny")
    rows: dict[str, list[float]] = {}
    try:
        with RayNodes(root) as cluster:
            b = Bench(cluster, Deployment(model))
            blocker = b.block(cluster.b.ip)
            first, boot_s = b.start()  # cold boot + snapshot on A, published
            import ray

            ray.kill(blocker)
            key = b.host._keys["tiny"]
            b_id = next(n["NodeID"] for n in ray.nodes() if n["NodeManagerAddress"] == cluster.b.ip)
            b.wait(lambda: b_id in b.host.holders.get(key, set()), 300)
            pulled = [p for p in b.host.pulls if p["node_id"] == b_id]
            assert first.sandbox is not None
            engine_url = first.sandbox.report.engine_url  # type: ignore[attr-defined]
            rows["relay (median request)"], rows["direct to sandbox"] = [], []
            relay, direct = relay_cost(cluster, first.sandbox.base_url, engine_url)
            rows["relay (median request)"].append(relay)
            rows["direct to sandbox"].append(direct)
            b.stop(first)
            for _ in range(args.rounds):
                blocker = b.block(cluster.b.ip)  # A's restore: B busy
                r, s = b.start()
                rows.setdefault("A, local restore", []).append(s)
                rows.setdefault("placement alone", []).append(b.host.placements[r.id].placed_s)
                ray.kill(blocker)
                r2, s = b.start()  # A busy (r): on B, from the copy it pulled ahead
                assert b.host.placements[r2.id].node_ip == cluster.b.ip
                rows.setdefault("B, pulled ahead", []).append(s)
                b.stop(r2)
                shutil.rmtree(cluster.b.snapshot_dir / key, ignore_errors=True)
                r2, s = b.start()  # B again, its copy gone: pulled from the origin on demand
                rows.setdefault("B, pulled on demand", []).append(s)
                b.stop(r2)
                b.stop(r)
            # A node's death with a replica on it -> a replacement serving on A.
            blocker = b.block(cluster.a.ip)
            on_b, _ = b.start()
            ray.kill(blocker)
            t0 = time.monotonic()
            cluster.kill_node(cluster.b)
            assert on_b.sandbox is not None
            b.wait(lambda: on_b.sandbox.exit_code() is not None, 120)  # type: ignore[union-attr]
            seen = time.monotonic() - t0
            b.stop(on_b)
            r, _ = b.start()
            rows["node death -> seen dead"] = [seen]
            rows["node death -> new replica serving"] = [time.monotonic() - t0]
            b.stop(r)
            b.run(b.host.close())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\ncold boot + snapshot on A (once): {boot_s:.2f} s; B's pull ahead: {pulled}")
    print("\n| row | median s | runs |\n|---|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {statistics.median(values):.3f} | {', '.join(f'{v:.3f}' for v in values)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
