from __future__ import annotations

import numpy as np
import pytest

from coldstart.pool.errors import ConfigError
from coldstart.pool.simulate import (
    REQUESTED,
    SERVE_END,
    SERVE_START,
    BufferRestore,
    FixedPeak,
    Reactive,
    ServiceModel,
    run_policy,
)
from coldstart.pool.trace import DemandShape, Trace, generate_trace, load_trace, save_trace

SHAPE = DemandShape(mean_rate_per_min=30.0, spikes_per_day=24.0)


@pytest.fixture(scope="module")
def trace() -> Trace:
    return generate_trace(SHAPE, 3 * 3600.0, seed=7)


def test_trace_is_deterministic_for_a_seed() -> None:
    a, b = generate_trace(SHAPE, 3600.0, 5), generate_trace(SHAPE, 3600.0, 5)
    assert np.array_equal(a.arrivals, b.arrivals) and np.array_equal(a.services, b.services)
    assert not np.array_equal(a.arrivals, generate_trace(SHAPE, 3600.0, 6).arrivals[: len(a)])


@pytest.mark.parametrize(
    "policy", [FixedPeak(), Reactive(300.0), BufferRestore(restore_s=2.0, lead_time_s=300.0)]
)
def test_simulation_is_deterministic_for_a_seed(trace: Trace, policy) -> None:  # type: ignore[no-untyped-def]
    svc = ServiceModel(failure_rate=0.05)
    a, b = run_policy(trace, policy, svc, seed=1), run_policy(trace, policy, svc, seed=1)
    assert np.array_equal(a.log.t, b.log.t) and np.array_equal(a.log.code, b.log.code)
    assert np.array_equal(a.waits, b.waits)


def test_utilization_by_hand_from_the_log() -> None:
    # two fixed GPUs for 20 s; requests [0, 10) and [5, 15): 20 GPU-s serving of 40 paid
    trace = Trace(np.array([0.0, 5.0]), np.array([10.0, 10.0]), 20.0)
    result = run_policy(trace, FixedPeak(gpus=2))
    assert result.log.utilization() == (20.0, 40.0, 0.5)
    assert result.utilization == 0.5 and list(result.waits) == [0.0, 0.0]


def test_reactive_cold_start_by_hand() -> None:
    # no replica at t=0; the request at t=1 waits the 100 s cold start, serves 10 s, idles 30 s
    trace = Trace(np.array([1.0]), np.array([10.0]), 5.0, rate_per_s=np.zeros(5))
    result = run_policy(trace, Reactive(100.0), ServiceModel(keep_warm_s=30.0))
    assert list(result.waits) == [100.0]
    serving, paid, util = result.log.utilization()
    assert (serving, paid) == (10.0, 140.0)
    assert util == pytest.approx(10 / 140)


@pytest.mark.parametrize("policy", [FixedPeak(), Reactive(50.0), BufferRestore(lead_time_s=300.0)])
def test_serving_time_in_the_log_is_the_work_in_the_trace(trace: Trace, policy) -> None:  # type: ignore[no-untyped-def]
    # with one request per replica, serving GPU-seconds must equal the sum of service times exactly
    result = run_policy(trace, policy, ServiceModel(concurrency=1))
    assert result.serving_gpu_s == pytest.approx(float(trace.services.sum()), rel=1e-9)
    log = result.log
    assert (log.code == SERVE_START).sum() == (log.code == SERVE_END).sum()
    assert result.paid_gpu_s >= result.serving_gpu_s
    assert (log.code == REQUESTED).sum() >= result.peak_gpus


def test_policies_rank_as_the_seed_says(trace: Trace) -> None:
    fixed = run_policy(trace, FixedPeak())
    slow = run_policy(trace, Reactive(2000.0))
    buffered = run_policy(trace, BufferRestore(restore_s=2.0, lead_time_s=300.0))
    assert fixed.p99_wait_s == 0.0
    assert buffered.utilization > fixed.utilization
    assert buffered.p99_wait_s < slow.p99_wait_s


def test_concurrency_packs_requests(trace: Trace) -> None:
    one = run_policy(trace, Reactive(50.0), ServiceModel(concurrency=1))
    eight = run_policy(trace, Reactive(50.0), ServiceModel(concurrency=8))
    assert eight.peak_gpus < one.peak_gpus


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
