from __future__ import annotations

import numpy as np
import pytest

from coldstart.pool.catalog import InstanceType
from coldstart.pool.errors import ConfigError
from coldstart.pool.simulate import (
    ASSIGNED,
    IDLE,
    RELEASED,
    REPLICA_DOWN,
    REPLICA_UP,
    REQUESTED,
    SERVE_END,
    SERVE_START,
    BufferRestore,
    FixedPeak,
    Reactive,
    ServiceModel,
    return_order,
    run_policy,
)
from coldstart.pool.trace import DAY_S, DemandShape, Trace, generate_trace, load_trace, save_trace

SHAPE = DemandShape(mean_rate_per_min=30.0, spikes_per_day=24.0, service_s=60.0)
ONE = ServiceModel(concurrency=1)


def exact(name: str, price: float, lead: float, cap: int = 1_000_000) -> InstanceType:
    """An instance type whose lead time does not vary, for hand-checked runs."""
    return InstanceType(name, price, lead, supply_cap=cap, lead_time_cv=0.0)


def quiet(arrivals: list[float], services: list[float], duration: float) -> Trace:
    """A hand-made trace that starts with nothing in service (no replica up at t=0)."""
    return Trace(np.array(arrivals), np.array(services), duration, rate_per_s=np.zeros(int(duration)))


def unit_codes(result, unit: int) -> list[tuple[float, str]]:  # type: ignore[no-untyped-def]
    return [(t, name) for t, u, name in result.log.rows() if u == unit]


TWO_TYPES = BufferRestore(types=(exact("r", 3.0, 300.0), exact("b", 5.0, 60.0)))


@pytest.fixture(scope="module")
def trace() -> Trace:
    return generate_trace(SHAPE, 3 * 3600.0, seed=7)


def test_trace_is_deterministic_for_a_seed() -> None:
    a, b = generate_trace(SHAPE, 3600.0, 5), generate_trace(SHAPE, 3600.0, 5)
    assert np.array_equal(a.arrivals, b.arrivals) and np.array_equal(a.services, b.services)
    assert not np.array_equal(a.arrivals, generate_trace(SHAPE, 3600.0, 6).arrivals[: len(a)])


def test_trace_has_weekends_and_a_peak_well_above_the_mean() -> None:
    shape = DemandShape(mean_rate_per_min=20.0, spikes_per_day=0.0, noise=0.0, growth_per_day=0.0)
    rate = generate_trace(shape, 7 * DAY_S, seed=0).rate_per_s
    assert rate is not None
    day = rate.reshape(7, -1).mean(axis=1)
    assert day[5] / day[0] == pytest.approx(0.6, rel=1e-6)  # Saturday carries 60% of Monday
    assert rate.max() / rate.min() > 5  # afternoon peak vs 04:00 trough


@pytest.mark.parametrize(
    "policy",
    [FixedPeak(), Reactive(300.0), TWO_TYPES],
)
def test_simulation_is_deterministic_for_a_seed(trace: Trace, policy) -> None:  # type: ignore[no-untyped-def]
    svc = ServiceModel(failure_rate=0.05)
    a, b = run_policy(trace, policy, svc, seed=1), run_policy(trace, policy, svc, seed=1)
    assert np.array_equal(a.log.t, b.log.t) and np.array_equal(a.log.code, b.log.code)
    assert np.array_equal(a.waits, b.waits)


def test_both_utilizations_by_hand_for_fixed_peak() -> None:
    # One owned GPU for 30 s. Request [0, 10) starts a replica at once; the one at t=5 waits 5 s for the
    # slot and serves [10, 20); the replica idles 10 s (keep-warm) and stops at 30.
    # Running the app (replica up): 30 of 30 paid; busy (>= 1 request in service): 20 of 30.
    result = run_policy(quiet([0.0, 5.0], [10.0, 10.0], 20.0), FixedPeak(gpus=1), ServiceModel(1, 10.0))
    u = result.log.utilization()
    assert (u.running_gpu_s, u.busy_gpu_s, u.paid_gpu_s) == (30.0, 20.0, 30.0)
    assert (result.utilization, result.busy_utilization) == (1.0, pytest.approx(2 / 3))
    assert list(result.waits) == [0.0, 5.0]


def test_both_utilizations_by_hand_for_the_buffer() -> None:
    # Buffer of 1 (refill lead 20 s), restore 2 s, keep-warm 10 s. t=0: u1 idle in the buffer. t=1: the
    # request takes u1, restores until 3, serves [3, 13), idles until 23 and hands u1 back. The tick at t=5
    # refills the empty buffer: u2 ordered, booting [5, 25), idle from 25. End at 25.
    # Paid 25 + 20 = 45; running (replica up [3, 23)) 20; busy 10. Idle and booting GPUs are paid only.
    policy = BufferRestore(restore_s=2.0, types=(exact("refill", 3.0, 20.0),), buffer=1)
    result = run_policy(quiet([1.0], [10.0], 5.0), policy, ServiceModel(1, 10.0))
    u = result.log.utilization()
    assert (u.running_gpu_s, u.busy_gpu_s, u.paid_gpu_s) == (20.0, 10.0, 45.0)
    assert result.utilization == pytest.approx(20 / 45) and result.busy_utilization == pytest.approx(10 / 45)
    assert list(result.waits) == [2.0]
    assert unit_codes(result, 1) == [
        (0.0, "requested"), (0.0, "idle"), (1.0, "assigned"), (3.0, "replica-up"), (3.0, "serve-start"),
        (13.0, "serve-end"), (23.0, "replica-down"), (23.0, "idle"), (25.0, "released"),
    ]  # fmt: skip
    assert unit_codes(result, 2) == [(5.0, "requested"), (25.0, "idle"), (25.0, "released")]
    assert result.cost == pytest.approx(45 / 3600 * 3.0)


def test_reactive_cold_start_by_hand() -> None:
    # the request at t=1 waits the 100 s cold start, serves 10 s, the replica idles 30 s and stops
    result = run_policy(quiet([1.0], [10.0], 5.0), Reactive(100.0), ServiceModel(keep_warm_s=30.0))
    assert list(result.waits) == [100.0]
    u = result.log.utilization()
    assert (u.running_gpu_s, u.busy_gpu_s, u.paid_gpu_s) == (40.0, 10.0, 140.0)


def test_fast_provider_is_chosen_when_the_buffer_is_empty() -> None:
    # No buffer: the request's GPU is ordered through the LP in dry mode, which picks the dear fast type
    # (lands at 61) over the cheap slow one (661); restore 2 s -> the request waits 62 s.
    types = (exact("slow", 3.0, 600.0), exact("fast", 4.5, 60.0))
    result = run_policy(quiet([1.0], [10.0], 5.0), BufferRestore(types=types, buffer=0), ONE)
    assert list(result.waits) == [62.0]
    assert result.log.unit_type[1] == 1 and result.burst_gpu_s > 0
    # with the fast type's supply used up the LP spills to the slow one
    capped = (exact("slow", 3.0, 600.0), exact("fast", 4.5, 60.0, cap=0))
    result = run_policy(quiet([1.0], [10.0], 5.0), BufferRestore(types=capped, buffer=0), ONE)
    assert list(result.waits) == [602.0] and result.log.unit_type[1] == 0


def test_surplus_orders_are_cancelled_and_idle_gpus_returned() -> None:
    # One replica up at t=0 (u1) serves A [0.5, 5.5); B at t=1 finds no slot and no buffer: u2 is ordered
    # for it (lands at 101) and B waits for A's slot instead [5.5, 10.5). The replica stops at 11.5 and
    # hands u1 to the replica still waiting for u2, which restores, idles and stops at 14.5: u1 idle.
    # Demand fell: the tick at 15 cancels u2 (paid while booting, never lands); u1 goes back once idle
    # for release_after_s (5 s: at the tick of t=20). C at t=40 keeps the control loop running.
    trace = Trace(np.array([0.5, 1.0, 40.0]), np.array([5.0, 5.0, 1.0]), 45.0, rate_per_s=np.full(45, 0.2))
    policy = BufferRestore(types=(exact("slow", 3.0, 100.0),), buffer=0, release_after_s=5.0)
    result = run_policy(trace, policy, ServiceModel(1, 1.0))
    assert list(result.waits[:2]) == [0.0, 4.5]
    assert unit_codes(result, 2) == [(1.0, "requested"), (15.0, "released")]
    assert unit_codes(result, 1)[-3:] == [(14.5, "replica-down"), (14.5, "idle"), (20.0, "released")]


def test_burst_order_bridges_until_the_refill_and_goes_back_when_demand_falls() -> None:
    # Buffer of 1 cheap GPU (u1). A takes it at t=1 and serves [3, 23); the replica stops at 33. The tick at
    # t=5 sees nothing on hand: a burst bridge (u2, lands at 15) and a cheap refill (u3, lands at 105) are
    # ordered. At 33 u1 comes back, so at the tick of 35 the refill is cancelled (paid while booting) and
    # the bridge, idle since 15 (its lead 10 s: ski rental), goes back; u1 stays as the buffer.
    types = (exact("cheap", 3.0, 100.0), exact("burst", 4.5, 10.0))
    trace = quiet([1.0, 300.0], [20.0, 1.0], 301.0)
    result = run_policy(trace, BufferRestore(types=types, buffer=1), ServiceModel(8, 10.0))
    assert list(result.log.unit_type[1:4]) == [0, 1, 0]
    assert unit_codes(result, 2) == [(5.0, "requested"), (15.0, "idle"), (35.0, "released")]
    assert unit_codes(result, 3) == [(5.0, "requested"), (35.0, "released")]
    assert (300.0, "assigned") in unit_codes(result, 1)


def test_dearest_idle_gpu_goes_back_first() -> None:
    price = [0.0, 3.0, 4.5, 3.0]  # unit 2 is a burst GPU
    idle_since = {1: 10.0, 2: 30.0, 3: 5.0}
    assert return_order([1, 2, 3], idle_since, price) == [2, 3, 1]


@pytest.mark.parametrize(
    "policy",
    [FixedPeak(), Reactive(50.0), TWO_TYPES],
)
def test_log_accounts_for_every_request_and_replica(trace: Trace, policy) -> None:  # type: ignore[no-untyped-def]
    # with one request per replica, busy GPU-seconds must equal the sum of service times exactly
    result = run_policy(trace, policy, ONE)
    assert result.busy_gpu_s == pytest.approx(float(trace.services.sum()), rel=1e-9)
    log = result.log
    assert (log.code == SERVE_START).sum() == (log.code == SERVE_END).sum()
    assert (log.code == REPLICA_UP).sum() == (log.code == REPLICA_DOWN).sum()
    assert (log.code == REQUESTED).sum() == (log.code == RELEASED).sum()
    assert result.paid_gpu_s >= result.running_gpu_s >= result.busy_gpu_s
    assert (log.code == REQUESTED).sum() >= result.peak_gpus
    assert (log.code == IDLE).sum() + (log.code == ASSIGNED).sum() > 0


def test_policies_rank_as_the_seed_says(trace: Trace) -> None:
    # one request per GPU: ~30 GPUs of demand, enough for the buffer to be small next to it
    fixed = run_policy(trace, FixedPeak(), ONE)
    slow = run_policy(trace, Reactive(2000.0), ONE)
    buffered = run_policy(trace, BufferRestore(), ONE)
    assert fixed.p99_wait_s == 0.0
    assert buffered.utilization > fixed.utilization
    assert buffered.p99_wait_s < slow.p99_wait_s


def test_concurrency_packs_requests(trace: Trace) -> None:
    one = run_policy(trace, Reactive(50.0), ONE)
    eight = run_policy(trace, Reactive(50.0), ServiceModel(concurrency=8))
    assert eight.peak_gpus < one.peak_gpus


def test_bad_service_model_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        ServiceModel(concurrency=0)
    with pytest.raises(ConfigError):
        BufferRestore(types=())


def test_trace_file_round_trip(tmp_path, trace: Trace) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "trace.csv"
    save_trace(trace, path)
    back = load_trace(path)
    assert np.allclose(back.arrivals, trace.arrivals, atol=1e-3) and len(back) == len(trace)
    (tmp_path / "arrivals.csv").write_text("0.5\n1.5\n3.0\n")
    only = load_trace(tmp_path / "arrivals.csv", service_s=10.0)
    assert len(only) == 3 and (only.services > 0).all()
    (tmp_path / "bad.csv").write_text("arrival_s,service_s\nx,y\n")
    with pytest.raises(ConfigError, match="cannot read trace"):
        load_trace(tmp_path / "bad.csv")
