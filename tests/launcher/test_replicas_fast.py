"""The gateway (``Gateway``, ``Deployment``, ``LocalHost`` over a real CPU-slot pool) and ``Proxy`` built
for real over fake sandboxes (``tests/fake_engine.py``): the proxy is served by uvicorn on a loopback port and
called over HTTP, each replica is a small HTTP server. Routing, queueing, scaling, liveness, swaps and
fairness between deployments in seconds; the real engines are in ``test_scaling_and_faults.py``,
``test_faults_e2e.py`` and ``test_many_models.py``."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import resource
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fake_engine import FakeAdapter, FakeSandbox, FakeSnapshots

from coldstart.engine_adapters.base import EngineConfig
from coldstart.launcher.autoscaler import ScalingPolicy
from coldstart.launcher.control import control_client
from coldstart.launcher.deployment import Deployment
from coldstart.launcher.gateway import Gateway
from coldstart.launcher.liveness import HEALTH_FAILURES
from coldstart.launcher.local_host import LocalHost
from coldstart.launcher.metrics import Metrics
from coldstart.launcher.proxy import Proxy, _token_event
from coldstart.launcher.replica import FailureKind, ReplicaState
from coldstart.pool import Pool, make_provider


def run(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), 60))

    return wrapper


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class Launched:
    gateway: Gateway
    proxy: Proxy
    client: httpx.AsyncClient
    fakes: dict[str, FakeSnapshots] = field(default_factory=dict)

    @property
    def snapshots(self) -> FakeSnapshots:
        return next(iter(self.fakes.values()))

    def deployment(self, name: str = "fake") -> Deployment:
        return self.gateway.deployments[name]

    def sandbox(self, replica_id: str) -> FakeSandbox:
        for fake in self.fakes.values():
            if replica_id in fake.sandboxes:
                return fake.sandboxes[replica_id]
        raise KeyError(replica_id)

    def states(self) -> dict[str, ReplicaState]:
        return {r.id: r.state for r in self.gateway.replicas()}

    def model_of(self, port: int) -> str:
        for name, fake in self.fakes.items():
            if any(s.engine.port == port for s in fake.sandboxes.values()):
                return name
        raise KeyError(port)

    async def until(self, condition: Callable[[], bool], what: str, timeout: float = 20.0) -> float:
        """Wait for ``condition``; returns the seconds it took."""
        started = time.monotonic()
        while not condition():
            if time.monotonic() - started > timeout:
                raise AssertionError(f"timed out waiting for {what}: {self.states()}")
            await asyncio.sleep(0.01)
        return time.monotonic() - started

    async def ready(self, n: int = 1) -> None:
        await self.until(lambda: list(self.states().values()).count(ReplicaState.READY) >= n, f"{n} ready")

    async def chat(self, model: str = "fake", **body: Any) -> httpx.Response:
        return await self.client.post("/v1/chat/completions", json={"model": model, "messages": [], **body})


@contextlib.asynccontextmanager
async def launched(
    restore_s: float | list[float] = 0.0,
    stop_s: float = 0.0,
    proxy_kw: dict[str, Any] | None = None,
    **policy: Any,
) -> AsyncIterator[Launched]:
    """One deployment, ``fake``, on as many CPU slots as its ``max_replicas``."""
    model = {"restore_s": restore_s, "stop_s": stop_s, **policy}
    async with gateway_launched({"fake": model}, units=policy.get("max_replicas", 1), proxy_kw=proxy_kw) as h:
        yield h


@contextlib.asynccontextmanager
async def gateway_launched(
    models: dict[str, dict[str, Any]],
    *,
    units: int = 1,
    min_residency: float = 0.0,
    proxy_kw: dict[str, Any] | None = None,
) -> AsyncIterator[Launched]:
    """Deployments by name, each ``{restore_s, stop_s, weight, priority, **policy}``, sharing ``units``
    CPU slots of one pool."""
    metrics = Metrics()
    fakes: dict[str, FakeSnapshots] = {}
    deployments = []
    for name, options in models.items():
        options = dict(options)
        fake = fakes[name] = FakeSnapshots(options.pop("restore_s", 0.0), options.pop("stop_s", 0.0))
        weight, priority = options.pop("weight", 1.0), options.pop("priority", 0)
        deployments.append(
            Deployment(
                name,
                FakeAdapter(),
                EngineConfig(model=name),
                ScalingPolicy(**options),
                metrics.for_model(name),
                upstream_model=name,
                snapshots=fake,
                weight=weight,
                priority=priority,
            )
        )
    http = control_client()
    pool = Pool(make_provider("cpu", slots=units), target_idle=0)
    await pool.start()
    host = LocalHost(pool, http, Path("/nonexistent"))
    gateway = Gateway(deployments, host, metrics, http, min_residency=min_residency)
    proxy = Proxy(gateway, metrics, **(proxy_kw or {}))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = _Server(
        uvicorn.Config(proxy.app(), log_level="warning", lifespan="off", http=proxy.http_protocol())
    )
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    await gateway.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            yield Launched(gateway, proxy, client, fakes)
    finally:
        server.should_exit = True
        await serving
        await gateway.close()
        await host.close()
        await proxy.aclose()
        await http.aclose()
        sock.close()


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    error: dict[str, Any] = body["error"]
    return error


# ---------------------------------------------------------------------------- faults
@run
async def test_bad_requests_never_kill_a_healthy_replica() -> None:
    async with launched() as h:
        await h.ready()
        for _ in range(5):
            bad = await h.chat(max_tokens=-1)  # 422 from the engine, which then drops the connection
            assert bad.status_code == 422
            assert "max_tokens: must be >= 1" in _error(bad)["message"]
            good = await h.chat()
            assert good.status_code == 200, good.text
        assert h.states() == {"r1": ReplicaState.READY}
        assert h.snapshots.restores == 1
        assert h.sandbox("r1").engine.received == 10


@run
async def test_a_request_the_engine_may_have_received_is_not_replayed() -> None:
    async with launched() as h:
        await h.ready()
        lost = await h.chat(drop=True)  # read by the engine, then the connection closes
        assert lost.status_code == 502
        assert _error(lost)["code"] == "upstream_lost"
        assert "not retried" in _error(lost)["message"]
        assert h.sandbox("r1").engine.received == 1  # exactly once, never replayed
        # One lost connection is not a dead engine: the health probe says it is alive.
        assert (await h.chat()).status_code == 200
        assert h.states() == {"r1": ReplicaState.READY}


@run
async def test_connection_refused_is_retried_on_another_replica_and_the_dead_one_replaced() -> None:
    async with launched(initial_replicas=2, max_replicas=2, health_interval=0.2, health_timeout=0.3) as h:
        await h.ready(2)
        await h.sandbox("r1").engine.close()  # the port closes, the process "exists": only probes tell
        answers = [await h.chat() for _ in range(4)]
        assert [a.status_code for a in answers] == [200] * 4  # nothing was sent to r1: safe to retry
        await h.until(lambda: "r1" not in h.states(), "r1 failed by its probe and stopped")


@run
async def test_hung_engine_is_detected_its_requests_fail_and_it_is_replaced() -> None:
    interval, timeout = 0.2, 0.3
    async with launched(health_interval=interval, health_timeout=timeout) as h:
        await h.ready()
        pending = asyncio.create_task(h.chat(sleep=30))
        await h.until(lambda: h.sandbox("r1").engine.in_flight == 1, "request in the engine")
        h.sandbox("r1").engine.hang()  # SIGSTOP: connections open, nothing answers, /health neither
        took = await h.until(lambda: h.states().get("r1") is not ReplicaState.READY, "r1 failed")
        assert took <= interval + HEALTH_FAILURES * (timeout + interval) + 0.5
        answer = await pending
        assert answer.status_code == 502 and _error(answer)["code"] == "upstream_lost"
        metrics = (await h.client.get("/metrics")).text
        assert 'coldstart_replica_failures_total{kind="unresponsive",model="fake"} 1.0' in metrics
        again = await h.chat()
        assert again.status_code == 200
        assert again.json()["port"] == h.sandbox("r2").engine.port


@run
async def test_a_busy_engine_that_misses_probes_keeps_its_request_until_it_is_idle(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No /health answer while the engine uses CPU for a request in flight: not a miss (its request ends
    well; said once a minute, not once a probe); the same silence once it has nothing in flight fails it."""
    caplog.set_level(logging.INFO, logger="coldstart.lifecycle")
    async with launched(health_interval=0.1, health_timeout=0.2) as h:
        await h.ready()
        liveness = h.gateway.liveness
        pending = asyncio.create_task(h.chat(sleep=2.0))
        await h.until(lambda: h.sandbox("r1").engine.in_flight == 1, "request in the engine")
        h.sandbox("r1").engine.busy()
        await h.until(lambda: liveness.busy_misses >= 3, "probes missed while busy")
        assert h.states() == {"r1": ReplicaState.READY}
        assert sum("but it is busy" in r.getMessage() for r in caplog.records) == 1
        answer = await pending
        assert answer.status_code == 200 and answer.json()["port"] == h.sandbox("r1").engine.port
        await h.until(lambda: h.states().get("r1") is not ReplicaState.READY, "r1 failed once idle")
        metrics = (await h.client.get("/metrics")).text
        assert 'coldstart_replica_failures_total{kind="unresponsive",model="fake"} 1.0' in metrics


@run
async def test_exited_engine_fails_its_replica_and_demand_replaces_it() -> None:
    async with launched() as h:
        await h.ready()
        await h.sandbox("r1").die()
        assert (await h.chat()).status_code in (200, 502)  # raced against the exit being seen
        assert (await h.chat()).status_code == 200
        assert "r2" in h.snapshots.sandboxes


# ---------------------------------------------------------------------------- scaling
@run
async def test_burst_from_zero_spreads_over_every_replica_without_churn() -> None:
    # r1 restores quickly, r2 slowly; idle timeout short enough that an unused r2 would be stopped.
    async with launched(
        restore_s=[0.1, 0.6], initial_replicas=0, max_replicas=2, target_concurrency=1, idle_timeout=0.3
    ) as h:
        answers = await asyncio.gather(*(h.chat(sleep=0.05) for _ in range(40)))
        assert [a.status_code for a in answers] == [200] * 40
        ports = [a.json()["port"] for a in answers]
        per_replica = {rid: ports.count(s.engine.port) for rid, s in h.snapshots.sandboxes.items()}
        assert set(per_replica) == {"r1", "r2"}, per_replica  # no replica stopped and started again
        assert min(per_replica.values()) >= 5, per_replica  # the second one took its share
        assert h.deployment().peak_live == 2


@run
async def test_a_replica_still_stopping_counts_against_max_replicas() -> None:
    async with launched(stop_s=0.5, max_replicas=1) as h:
        await h.ready()
        await h.sandbox("r1").die()
        assert (await h.chat()).status_code in (200, 502)
        assert (await h.chat()).status_code == 200
        assert h.deployment().peak_live == 1
        assert h.sandbox("r1").stopped.is_set()


@run
async def test_a_request_above_target_waits_for_a_new_replica_not_a_busy_one() -> None:
    async with launched(restore_s=[0.0, 0.3], max_replicas=2, target_concurrency=1) as h:
        await h.ready()
        first = asyncio.create_task(h.chat(sleep=5))
        await h.until(lambda: h.sandbox("r1").engine.in_flight == 1, "first request in r1")
        second = await h.chat()
        assert second.status_code == 200
        assert second.json()["port"] == h.sandbox("r2").engine.port  # not queued behind r1's request
        first.cancel()


@run
async def test_a_replica_scaled_down_is_not_failed_by_its_probe_while_it_stops() -> None:
    async with launched(stop_s=1.0, idle_timeout=0.2, health_interval=0.05, health_timeout=0.1) as h:
        await h.ready()
        seen = set()
        while "r1" in h.states():
            seen.add(h.states()["r1"])
            await asyncio.sleep(0.005)
        assert ReplicaState.DRAINING in seen and ReplicaState.FAILED not in seen, seen


@run
async def test_close_finishes_when_a_probe_is_poked_as_it_is_cancelled() -> None:
    # suspect() completes the watcher's wait_for(poke.wait()) in the same loop turn as close() cancels
    # it: Python 3.11's wait_for then returns instead of raising, and the watcher used to go on forever.
    async with launched(health_interval=60) as h:
        await h.ready()
        await asyncio.sleep(0.05)  # the watcher waits on its poke
        h.gateway.suspect(h.deployment().replicas["r1"], "test")
        closing = asyncio.create_task(h.gateway.close())
        done, _ = await asyncio.wait([closing], timeout=5)  # not wait_for: its cancel would hide a hang
        assert done, "close() hangs"
        assert not h.deployment().replicas


@run
async def test_close_waits_for_a_stop_already_running() -> None:
    async with launched(stop_s=0.5) as h:
        await h.ready()
        sandbox = h.sandbox("r1")
        d = h.deployment()
        h.gateway.fail(d, d.replicas["r1"], "test", FailureKind.OTHER)
        await h.gateway.close()
        assert sandbox.stopped.is_set() and sandbox.stops == 1


@run
async def test_queue_timeout_is_an_openai_error() -> None:
    async with launched(restore_s=5.0, initial_replicas=0, queue_timeout=0.3) as h:
        answer = await h.chat()
        assert answer.status_code == 503 and _error(answer)["code"] == "queue_timeout"
        assert answer.headers["retry-after"]


# ---------------------------------------------------------------------------- proxy
@run
async def test_bodies_that_are_not_json_objects_get_a_400() -> None:
    async with launched() as h:
        await h.ready()
        for raw in (b"\xff\xfe\x00not utf-8", b"[" * 100_000 + b"]" * 100_000, b"{", b"[1, 2]"):
            answer = await h.client.post("/v1/chat/completions", content=raw)
            assert answer.status_code == 400, (raw[:20], answer.text)
            assert _error(answer)["type"] == "invalid_request_error"
        assert h.sandbox("r1").engine.received == 0


@run
async def test_a_body_over_the_limit_gets_a_413_without_being_read_whole() -> None:
    async with launched(proxy_kw={"max_body_bytes": 1 << 20}) as h:
        big = b'{"model": "fake", "x": "' + b"a" * (2 << 20) + b'"}'
        answer = await h.client.post("/v1/chat/completions", content=big)
        assert answer.status_code == 413 and _error(answer)["code"] == "request_too_large"

        async def chunks() -> AsyncIterator[bytes]:  # no content-length: counted as it arrives
            for _ in range(3):
                yield b"a" * (1 << 20)

        answer = await h.client.post("/v1/chat/completions", content=chunks())
        assert answer.status_code == 413


@run
async def test_engine_errors_are_openai_shaped_and_headers_are_not_doubled() -> None:
    async with launched() as h:
        await h.ready()
        answer = await h.chat(plain_500=True)
        assert answer.status_code == 500
        assert _error(answer) == {
            "message": "Internal Server Error",
            "type": "server_error",
            "param": None,
            "code": "engine_500",
        }
        for answer in (await h.chat(), await h.chat(stream=True)):
            assert answer.status_code == 200
            assert len(answer.headers.get_list("date")) == 1, answer.headers
            assert len(answer.headers.get_list("server")) == 1, answer.headers


@run
async def test_client_that_goes_away_cancels_its_engine_request() -> None:
    async with launched() as h:
        await h.ready()
        engine = h.sandbox("r1").engine
        with pytest.raises(httpx.ReadTimeout):
            await h.client.post(
                "/v1/chat/completions",
                json={"model": "fake", "sleep": 30},
                timeout=httpx.Timeout(30, read=0.5),
            )
        await h.until(lambda: engine.cancelled == 1, "the engine saw its request cancelled")
        await h.until(lambda: h.deployment().replicas["r1"].in_flight == 0, "the proxy released the replica")


@run
async def test_health_means_the_proxy_is_up_and_ready_means_a_replica_is() -> None:
    async with launched(restore_s=0.3, initial_replicas=0) as h:
        health = await h.client.get("/health")
        assert health.status_code == 200 and health.json()["ready"] is False
        assert (await h.client.get("/ready")).status_code == 503
        assert h.snapshots.restores == 0  # probes start nothing
        assert (await h.chat()).status_code == 200  # a request does
        assert (await h.client.get("/ready")).status_code == 200


@run
async def test_a_client_slow_to_send_its_headers_is_disconnected() -> None:
    async with launched(proxy_kw={"header_timeout": 0.5}) as h:
        await h.ready()
        host, port = str(h.client.base_url.host), int(h.client.base_url.port or 0)
        slow = []
        for _ in range(20):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # never finishes the head
            slow.append((reader, writer))
        idle_reader, idle_writer = await asyncio.open_connection(host, port)  # sends nothing at all
        assert (await h.chat()).status_code == 200  # others are served meanwhile
        for reader, _ in [*slow, (idle_reader, idle_writer)]:
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the proxy
        for _, writer in [*slow, (idle_reader, idle_writer)]:
            writer.close()


# ---------------------------------------------------------------------------- many models, one pool
@run
async def test_unknown_model_is_a_404_that_names_the_served_models() -> None:
    async with gateway_launched({"a": {}, "b": {"initial_replicas": 0}}) as h:
        answer = await h.chat("nope")
        assert answer.status_code == 404
        error = _error(answer)
        assert error["code"] == "model_not_found" and "'a'" in error["message"] and "'b'" in error["message"]
        models = (await h.client.get("/v1/models")).json()["data"]
        await h.ready()
        models = {m["id"]: m["state"] for m in (await h.client.get("/v1/models")).json()["data"]}
        assert models == {"a": "ready", "b": "at_zero"}


@run
async def test_alternating_models_on_one_unit_swap_and_never_share_it() -> None:
    async with gateway_launched(
        {"a": {"restore_s": 0.1}, "b": {"restore_s": 0.1, "initial_replicas": 0}}
    ) as h:
        await h.ready()
        for model in ("b", "a", "b", "a"):
            answer = await h.chat(model)
            assert answer.status_code == 200, answer.text
            assert h.model_of(answer.json()["port"]) == model
        assert h.gateway.peak_held == 1  # one unit: never two replicas at once, also while swapping
        metrics = (await h.client.get("/metrics")).text
        assert 'coldstart_swaps_total{model="b"} 2.0' in metrics
        assert 'coldstart_evictions_total{model="a"} 2.0' in metrics
        assert h.fakes["a"].restores == 3 and h.fakes["b"].restores == 2


@run
async def test_concurrent_requests_for_two_models_on_one_unit_all_answered_one_replica_at_a_time() -> None:
    async with gateway_launched(
        {"a": {"restore_s": 0.05}, "b": {"restore_s": 0.05, "initial_replicas": 0}}, min_residency=0.2
    ) as h:
        await h.ready()
        answers = await asyncio.gather(*(h.chat(m, sleep=0.02) for m in ["a", "b"] * 10))
        assert [a.status_code for a in answers] == [200] * 20
        assert all(h.model_of(a.json()["port"]) == m for a, m in zip(answers, ["a", "b"] * 10, strict=True))
        assert h.gateway.peak_held == 1


@run
async def test_an_eviction_never_cuts_a_request_in_flight() -> None:
    async with gateway_launched(
        {"a": {"restore_s": 0.05}, "b": {"restore_s": 0.05, "initial_replicas": 0}}, min_residency=0.0
    ) as h:
        await h.ready()
        long = asyncio.create_task(h.chat("a", sleep=1.0))
        await h.until(lambda: h.sandbox("r1").engine.in_flight == 1, "a's request in its engine")
        b = await h.chat("b")  # a yields its unit: its request in flight finishes first
        assert b.status_code == 200
        answer = await long
        assert answer.status_code == 200, answer.text  # not cut by the eviction
        assert h.model_of(answer.json()["port"]) == "a"


@run
async def test_a_flood_for_one_model_does_not_starve_another() -> None:
    # 100 requests for a, then 5 for b, on one unit: b's are answered after one swap plus their own
    # service time -- while most of a's queue still waits -- not after a's 100.
    async with gateway_launched(
        {"a": {"restore_s": 0.1}, "b": {"restore_s": 0.1, "initial_replicas": 0}}, min_residency=0.2
    ) as h:
        await h.ready()
        done: list[str] = []

        async def chat(model: str) -> httpx.Response:
            answer = await h.chat(model, sleep=0.05)
            done.append(model)
            return answer

        flood = [asyncio.create_task(chat("a")) for _ in range(100)]
        await h.until(lambda: h.deployment("a").router.waiting > 50, "a's queue filled")
        b_answers = await asyncio.gather(*(chat("b") for _ in range(5)))
        assert [a.status_code for a in b_answers] == [200] * 5
        last_b = max(i for i, m in enumerate(done) if m == "b")
        a_before_b = done[:last_b].count("a")
        a_answers = await asyncio.gather(*flood)
        assert [a.status_code for a in a_answers] == [200] * 100
        # a's replica yielded after its residency with its 4 in flight; b never waited for a's queue.
        assert a_before_b < 50, done
        metrics = (await h.client.get("/metrics")).text
        assert 'coldstart_swaps_total{model="b"} 1.0' in metrics


@run
async def test_nothing_to_evict_is_a_503_with_retry_after_for_the_waiting_model() -> None:
    """One unit, model a's replica busy with a request in flight and inside its residency: nothing can be
    evicted, so b's request waits in b's bounded queue and gets an OpenAI-shaped 503 with Retry-After past
    b's queue timeout; a's request is answered (an eviction never cuts it)."""
    async with gateway_launched(
        {"a": {}, "b": {"initial_replicas": 0, "queue_timeout": 0.5}}, min_residency=60.0
    ) as h:
        await h.ready()
        busy = asyncio.create_task(h.chat("a", sleep=2.0))
        await h.until(lambda: h.deployment("a").in_flight() == 1, "a's request in flight")
        waited = await h.chat("b")
        assert waited.status_code == 503, waited.text
        assert _error(waited)["code"] == "queue_timeout" and waited.headers["retry-after"]
        assert "b" in _error(waited)["message"] or "queue" in _error(waited)["message"]
        assert (await busy).status_code == 200
        assert set(h.deployment("a").replicas) == {"r1"} and not h.deployment("b").replicas


@run
async def test_idle_replica_of_lowest_priority_is_evicted_first() -> None:
    async with gateway_launched(
        {
            "hi": {"priority": 5},
            "lo": {"priority": 0},
            "new": {"initial_replicas": 0},
        },
        units=2,
    ) as h:
        await h.ready(2)
        answer = await h.chat("new")
        assert answer.status_code == 200
        assert {r.deployment for r in h.gateway.replicas() if r.state is ReplicaState.READY} == {"hi", "new"}


@run
async def test_min_residency_keeps_a_just_placed_replica() -> None:
    async with gateway_launched({"a": {}, "b": {"initial_replicas": 0}}, min_residency=0.8) as h:
        await h.ready()
        placed = h.deployment("a").replicas["r1"].ready_at or 0.0
        answer = await h.chat("b")
        assert answer.status_code == 200
        swap_started = h.deployment("b").replicas  # b is placed only once a's residency is over
        assert time.monotonic() - placed >= 0.8, swap_started


@run
async def test_a_model_whose_boots_fail_the_same_way_gets_503s_with_the_reason_others_are_served() -> None:
    async with gateway_launched(
        {"good": {}, "bad": {"initial_replicas": 0, "queue_timeout": 30}}, units=2
    ) as h:
        fake = h.fakes["bad"]

        async def broken(*_args: Any, **_kw: Any) -> Any:
            raise RuntimeError("CUDA out of memory: tried to allocate 2 GiB")

        fake.restore = broken  # type: ignore[method-assign]
        await h.ready()
        started = time.monotonic()
        answer = await h.chat("bad")
        assert answer.status_code == 503, answer.text
        assert _error(answer)["code"] == "boot_failed"
        assert "CUDA out of memory" in _error(answer)["message"]
        assert int(answer.headers["retry-after"]) >= 1
        assert time.monotonic() - started < 10  # not the 30 s queue timeout
        again = await h.chat("bad")  # backing off: refused at once, same reason
        assert again.status_code == 503 and "CUDA out of memory" in _error(again)["message"]
        assert (await h.chat("good")).status_code == 200
        models = {m["id"]: m["state"] for m in (await h.client.get("/v1/models")).json()["data"]}
        assert models["bad"] == "failing"


@run
async def test_health_shows_every_deployment_and_the_buffer_plan() -> None:
    async with gateway_launched({"a": {}, "b": {"initial_replicas": 0}}, units=2) as h:
        await h.ready()
        body = (await h.client.get("/health")).json()
        assert set(body["deployments"]) == {"a", "b"}
        assert body["deployments"]["a"]["state"] == "ready"
        assert body["units"] == {"host": "local", "capacity": 2, "held": 1, "peak_held": 1}
        assert set(body["buffer"]) == {"target", "explanation", "rates"}


@run
async def test_the_launcher_out_of_descriptors_is_not_an_engine_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Probes the launcher cannot send (EMFILE on its side) are not misses; said once a minute."""
    caplog.set_level(logging.INFO, logger="coldstart.lifecycle")
    async with launched(health_interval=0.05, health_timeout=0.5) as h:
        await h.ready()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        held: list[int] = []
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 64, hard))
            with contextlib.suppress(OSError):
                while True:
                    held.append(os.open("/dev/null", os.O_RDONLY))
            liveness = h.gateway.liveness
            await h.until(lambda: liveness.local_errors >= 5, "five probes failing with EMFILE on our side")
        finally:
            for fd in held:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert h.states() == {"r1": ReplicaState.READY}
        assert (await h.chat()).status_code == 200
        assert sum("cannot probe replica" in r.getMessage() for r in caplog.records) == 1


@run
async def test_a_unit_failure_fails_the_replica_on_it_and_a_new_one_serves() -> None:
    async with launched() as h:
        await h.ready()
        host = h.gateway.host
        assert isinstance(host, LocalHost)
        pool = host.pool
        unit = h.deployment().replicas["r1"].unit
        assert unit is not None and unit.device is not None
        failing = unit.device.id
        pool.provider.poll_failures = lambda devices: {  # type: ignore[method-assign]
            d.id: "XID 79: GPU has fallen off the bus" for d in devices if d.id == failing
        }
        await pool.monitor_once()  # what the pool's monitor does every few seconds
        await h.until(lambda: "r1" not in h.states(), "r1 failed and stopped")
        metrics = (await h.client.get("/metrics")).text
        assert 'coldstart_replica_failures_total{kind="unit",model="fake"} 1.0' in metrics
        pool.provider.poll_failures = lambda devices: {}  # type: ignore[method-assign]
        assert (await h.chat()).status_code == 200
        assert "r2" in h.states()


@run
async def test_a_prompt_above_the_engines_bound_is_a_413_before_it_reaches_the_engine() -> None:
    async with launched() as h:
        await h.ready()
        h.deployment().adapter.max_request_bytes = 4096  # type: ignore[attr-defined]
        big = await h.chat(messages=[{"role": "user", "content": "x" * 10_000}])
        assert big.status_code == 413 and _error(big)["code"] == "request_too_large"
        assert "4096" in _error(big)["message"]
        assert h.sandbox("r1").engine.received == 0
        assert (await h.chat()).status_code == 200


@run
async def test_a_replica_that_would_not_fit_the_memory_budget_is_not_started() -> None:
    async with gateway_launched({"a": {}, "b": {"initial_replicas": 0}}, units=2) as h:
        await h.ready()
        host = h.gateway.host
        assert isinstance(host, LocalHost)
        host._memory_budget = 3 << 30
        h.deployment("a").replicas["r1"].memory = 2 << 30  # measured when it became ready
        h.deployment("b").memory_estimate = 2 << 30  # its last replica's
        answer = await h.chat("b")  # a free unit, but not the memory: a (idle) is evicted first
        assert answer.status_code == 200
        assert h.gateway.peak_held == 1
        metrics = (await h.client.get("/metrics")).text
        assert 'coldstart_evictions_total{model="a"} 1.0' in metrics


@run
async def test_a_model_bigger_than_the_memory_budget_gets_a_503_naming_the_budget() -> None:
    async with gateway_launched({"a": {"initial_replicas": 0}}, units=2) as h:
        host = h.gateway.host
        assert isinstance(host, LocalHost)
        host._memory_budget = 1 << 30
        h.deployment("a").memory_estimate = 2 << 30
        answer = await h.chat("a")
        assert answer.status_code == 503 and _error(answer)["code"] == "boot_failed"
        assert "--memory-budget" in _error(answer)["message"]
        assert h.gateway.peak_held == 0  # never started


# ---------------------------------------------------------------------------- the end-to-end clock
def phase(metrics: str, name: str) -> tuple[float, float]:
    """(count, sum) of ``coldstart_phase_seconds`` for the fake deployment's phase ``name``."""

    def value(kind: str) -> float:
        found = re.search(rf'coldstart_phase_seconds_{kind}{{model="fake",phase="{name}"}} (\S+)', metrics)
        return float(found.group(1)) if found else 0.0

    return value("count"), value("sum")


async def streamed(client: httpx.AsyncClient, chunks: int = 3) -> list[str]:
    body = {"model": "fake", "messages": [], "stream": True, "chunks": chunks}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        return [line async for line in response.aiter_lines() if line.startswith("data: {")]


@run
async def test_first_token_of_a_request_that_arrived_at_zero_is_on_the_clock() -> None:
    async with launched(restore_s=0.3, initial_replicas=0, idle_timeout=60) as h:
        assert h.deployment().state == "at_zero"
        assert len(await streamed(h.client)) == 3
        count, seconds = phase((await h.client.get("/metrics")).text, "first_token")
        assert count == 1 and 0.3 <= seconds < 5, (count, seconds)  # the restore is inside it
        await streamed(h.client)  # a replica was ready when it came: not the clock of a cold request
        await h.client.post("/v1/chat/completions", json={"model": "fake", "messages": []})
        assert phase((await h.client.get("/metrics")).text, "first_token")[0] == 1


@run
async def test_a_whole_answer_at_zero_has_no_first_token() -> None:
    async with launched(restore_s=0.05, initial_replicas=0) as h:
        answer = await h.client.post("/v1/chat/completions", json={"model": "fake", "messages": []})
        assert answer.status_code == 200
        metrics = (await h.client.get("/metrics")).text
        assert phase(metrics, "first_token")[0] == 0
        assert phase(metrics, "restore")[0] == 1  # the lifecycle's own step was measured


def test_a_token_is_content_text_a_finish_or_a_text_delta_not_a_role() -> None:
    assert _token_event(b'data: {"choices": [{"delta": {"role": "assistant", "content": ""}}]}') is None
    assert _token_event(b'data: {"choices": [{"delta": {"content": "Hi"}}]}') is True
    assert _token_event(b'data: {"choices": [{"index": 0, "text": " the"}]}') is True
    assert _token_event(b'data: {"choices": [{"delta": {}, "finish_reason": "length"}]}') is True
    assert _token_event(b'data: {"type": "response.output_text.delta", "delta": "Hi"}') is True
    assert _token_event(b'data: {"type": "response.created"}') is None
    assert _token_event(b"data: [DONE]") is False
    assert _token_event(b'data: {"error": {"message": "lost"}}') is False
    assert _token_event(b": keep-alive") is None
