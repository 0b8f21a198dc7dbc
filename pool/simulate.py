"""Trace-driven, event-driven simulator of three ways to hold GPUs for an inference service.

Policies (one ``run_policy`` call each, same trace, same service model):

- ``FixedPeak``: ``gpus`` replicas up all the time (default: the trace's peak demand).
- ``Reactive``: no buffer; a queued request that no starting replica will take orders a new GPU, which
  serves after ``cold_start_s`` (allocation + boot + load: 2000 s naive, 300 s, 50 s with snapshots).
- ``BufferRestore``: a buffer of idle healthy GPUs sized by the LP (``sizing.py``) from the demand seen so
  far; scale-up takes a buffered GPU and restores a snapshot in ``restore_s``; an empty buffer means
  ordering a GPU (``lead_time_s``) and then restoring. Replicas that go idle return their GPU to the buffer;
  the buffer above its target goes back to the cloud.

Requests queue FIFO; a replica serves ``concurrency`` requests at once; requests are packed onto the
busiest replica with a free slot so that the others go idle and scale down after ``keep_warm_s``.

Every unit's life is written to an ``EventLog`` (paid from REQUESTED to RELEASED, serving between
SERVE_START and SERVE_END = at least one request in service). Utilization, cost and the allocated-GPU curve
are computed from that log (``EventLog.utilization``), not estimated from the policy's parameters.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from coldstart.pool.catalog import InstanceType
from coldstart.pool.errors import ConfigError
from coldstart.pool.sizing import Forecast, SizingInput, size_buffer
from coldstart.pool.states import UnitState
from coldstart.pool.trace import Trace

# Event-log codes: unit lifecycle states, plus serving edges.
REQUESTED, IDLE, ASSIGNED, FAILED, RELEASED = 0, 1, 2, 3, 4
SERVE_START, SERVE_END, READY = 5, 6, 7
CODE_NAMES = {
    REQUESTED: UnitState.REQUESTED.value, IDLE: UnitState.IDLE.value, ASSIGNED: UnitState.ASSIGNED.value,
    FAILED: UnitState.FAILED.value, RELEASED: UnitState.RELEASED.value,
    SERVE_START: "serve-start", SERVE_END: "serve-end", READY: "replica-ready",
}  # fmt: skip

# Heap event kinds
_COMPLETE, _READY, _UNIT_ARRIVES, _IDLE_CHECK, _TICK = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class ServiceModel:
    concurrency: int = 1  # requests one replica serves at once
    keep_warm_s: float = 30.0  # an idle replica stops after this long
    price_per_hour: float = 3.0  # per GPU
    slo_s: float = 5.0  # a request waiting longer than this misses the SLO
    failure_rate: float = 0.0  # share of newly booted GPUs that fail their health check

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.keep_warm_s < 0 or not 0 <= self.failure_rate < 1:
            raise ConfigError("service model: concurrency >= 1, keep_warm_s >= 0, failure_rate in [0, 1)")


@dataclass(frozen=True)
class FixedPeak:
    gpus: int | None = None  # None: the trace's peak demand

    @property
    def name(self) -> str:
        return "fixed peak" + (f" ({self.gpus})" if self.gpus else "")


@dataclass(frozen=True)
class Reactive:
    cold_start_s: float = 300.0

    @property
    def name(self) -> str:
        return f"reactive, cold start {self.cold_start_s:g}s"


@dataclass(frozen=True)
class BufferRestore:
    restore_s: float = 2.0
    lead_time_s: float = 600.0  # cloud allocation + boot + health check of a buffer GPU
    buffer: int | None = None  # fixed buffer size; None: the LP sizes it
    confidence: float = 0.99
    sizing_every_s: float = 60.0
    history_s: float = 4 * 3600.0
    tick_s: float = 5.0
    release_after_s: float | None = None  # None: the lead time (ski rental)

    @property
    def name(self) -> str:
        size = f"buffer {self.buffer}" if self.buffer is not None else "LP buffer"
        return f"{size} (lead {self.lead_time_s:g}s) + restore {self.restore_s:g}s"


Policy = FixedPeak | Reactive | BufferRestore


@dataclass
class EventLog:
    t: np.ndarray
    unit: np.ndarray
    code: np.ndarray
    end_s: float

    def utilization(self) -> tuple[float, float, float]:
        """(GPU-seconds serving, GPU-seconds paid, utilization), from the log alone."""
        held = self.t[self.code == RELEASED].sum() - self.t[self.code == REQUESTED].sum()
        serving = self.t[self.code == SERVE_END].sum() - self.t[self.code == SERVE_START].sum()
        return float(serving), float(held), float(serving / held) if held > 0 else 0.0

    def allocated(self, grid: np.ndarray) -> np.ndarray:
        """GPUs paid for at each grid time."""
        ups = np.sort(self.t[self.code == REQUESTED])
        downs = np.sort(self.t[self.code == RELEASED])
        return np.searchsorted(ups, grid, side="right") - np.searchsorted(downs, grid, side="right")

    def rows(self) -> list[tuple[float, int, str]]:
        return [
            (float(t), int(u), CODE_NAMES[int(c)])
            for t, u, c in zip(self.t, self.unit, self.code, strict=True)
        ]


@dataclass
class PolicyResult:
    policy: str
    log: EventLog
    waits: np.ndarray
    cost: float
    serving_gpu_s: float
    paid_gpu_s: float
    utilization: float
    p50_wait_s: float
    p99_wait_s: float
    over_slo: float
    peak_gpus: int
    buffer_targets: list[tuple[float, int]] = field(default_factory=list)


def run_policy(
    trace: Trace, policy: Policy, svc: ServiceModel = ServiceModel(), seed: int = 0
) -> PolicyResult:
    sim = _Sim(trace, policy, svc, seed)
    sim.run()
    log = sim.event_log()
    serving, paid, util = log.utilization()
    waits = sim.waits
    return PolicyResult(
        policy.name, log, waits, paid / 3600.0 * svc.price_per_hour, serving, paid, util,
        float(np.percentile(waits, 50)) if len(waits) else 0.0,
        float(np.percentile(waits, 99)) if len(waits) else 0.0,
        float((waits > svc.slo_s).mean()) if len(waits) else 0.0,
        int(log.allocated(np.unique(log.t)).max(initial=0)), sim.targets,
    )  # fmt: skip


class _Sim:
    """One run. Plain lists and ints in the hot loop: this has to do ~10^5-10^6 events per second."""

    def __init__(self, trace: Trace, policy: Policy, svc: ServiceModel, seed: int) -> None:
        self.trace, self.policy, self.svc = trace, policy, svc
        self.rng = np.random.default_rng(seed)
        self.c = svc.concurrency
        self.waits = np.zeros(len(trace))
        self.heap: list[tuple[float, int, int, int, float]] = []
        self.seq = 0
        self.log_t: list[float] = []
        self.log_u: list[int] = []
        self.log_c: list[int] = []
        self.n_units = 0
        # replicas
        self.r_unit: list[int] = []
        self.r_active: list[int] = []
        self.r_idle_since: list[float] = []
        self.r_alive: list[bool] = []
        self.buckets: list[dict[int, None]] = [{} for _ in range(self.c)]  # ready replicas by requests held
        self.queue: deque[int] = deque()
        self.starting = 0
        # buffer policy
        self.buffer: list[int] = []  # idle units, oldest first; scale-up takes the newest
        self.idle_since: dict[int, float] = {}
        self.ordered_for_buffer = 0
        self.pending_direct: deque[int] = deque()  # replicas waiting for a GPU ordered just for them
        self.target = 0
        self.targets: list[tuple[float, int]] = []
        self.history: list[int] = []
        self.now = 0.0
        self.alive = 0  # replicas not stopped (starting or ready)
        self.mean_service = float(trace.services.mean()) if len(trace) else 1.0
        self.window_start = 0  # first arrival of the last minute
        self.next_arrival = 0

    # -- plumbing ----------------------------------------------------------------------------------------
    def push(self, t: float, kind: int, a: int, b: float = 0.0) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, a, b))

    def log(self, t: float, unit: int, code: int) -> None:
        self.log_t.append(t)
        self.log_u.append(unit)
        self.log_c.append(code)

    def new_unit(self, t: float) -> int:
        self.n_units += 1
        self.log(t, self.n_units, REQUESTED)
        return self.n_units

    def new_replica(self, unit: int) -> int:
        self.r_unit.append(unit)
        self.r_active.append(0)
        self.r_idle_since.append(-1.0)
        self.r_alive.append(True)
        self.alive += 1
        return len(self.r_unit) - 1

    def boot_fails(self) -> bool:
        return self.svc.failure_rate > 0 and bool(self.rng.random() < self.svc.failure_rate)

    # -- requests ---------------------------------------------------------------------------------------
    def start(self, i: int, r: int, t: float) -> None:
        self.waits[i] = t - self.trace.arrivals[i]
        a = self.r_active[r]
        del self.buckets[a][r]
        a += 1
        self.r_active[r] = a
        if a == 1:
            self.log(t, self.r_unit[r], SERVE_START)
        if a < self.c:
            self.buckets[a][r] = None
        self.push(t + self.trace.services[i], _COMPLETE, r)

    def arrive(self, i: int, t: float) -> None:
        for k in range(self.c - 1, -1, -1):  # the busiest replica with a free slot
            if self.buckets[k]:
                r = next(reversed(self.buckets[k]))  # most recently used: lets the others go idle
                self.start(i, r, t)
                return
        self.queue.append(i)
        self.scale_up(t)

    def complete(self, r: int, t: float) -> None:
        if self.queue:  # hand the slot straight to the next queued request
            i = self.queue.popleft()
            self.waits[i] = t - self.trace.arrivals[i]
            self.push(t + self.trace.services[i], _COMPLETE, r)
            return
        a = self.r_active[r]
        if a < self.c:
            del self.buckets[a][r]
        a -= 1
        self.r_active[r] = a
        self.buckets[a][r] = None
        if a == 0:
            self.log(t, self.r_unit[r], SERVE_END)
            self.went_idle(r, t)

    def went_idle(self, r: int, t: float) -> None:
        self.r_idle_since[r] = t
        if not isinstance(self.policy, FixedPeak):
            self.push(t + self.svc.keep_warm_s, _IDLE_CHECK, r, t)

    # -- replicas ---------------------------------------------------------------------------------------
    def initial_load(self) -> float:
        """Requests in service at t=0 in steady state (rate times mean service time)."""
        tr = self.trace
        rate = tr.rate_per_s[0] if tr.rate_per_s is not None else float((tr.arrivals < 60.0).sum()) / 60.0
        return float(rate) * self.mean_service

    def desired(self, t: float, delay: float) -> int:
        """Replicas for the arrival rate of the last minute, plus enough to drain the queue within the
        time a new replica takes to start (a replica that comes in ``delay`` seconds drains
        ``c * delay / mean_service`` queued requests, not one)."""
        arrivals, j = self.trace.arrivals, self.window_start
        while arrivals[j] <= t - 60.0:
            j += 1
        self.window_start = j
        rate = (self.next_arrival - j) / 60.0
        drain = len(self.queue) / (self.c * max(1.0, delay / self.mean_service))
        return math.ceil(rate * self.mean_service / self.c + drain)

    def scale_up(self, t: float) -> None:
        p = self.policy
        if isinstance(p, Reactive):
            for _ in range(self.desired(t, p.cold_start_s) - self.alive):
                self.start_replica(t)
        elif isinstance(p, BufferRestore):
            fast = self.desired(t, p.restore_s) - self.alive
            while fast > 0 and self.buffer:
                self.start_replica(t)
                fast -= 1
            if not self.buffer:
                for _ in range(self.desired(t, p.lead_time_s + p.restore_s) - self.alive):
                    self.start_replica(t)

    def start_replica(self, t: float) -> None:
        self.starting += 1
        p = self.policy
        if isinstance(p, Reactive):
            r = self.new_replica(self.new_unit(t))
            self.log(t, self.r_unit[r], ASSIGNED)
            self.push(t + p.cold_start_s, _READY, r)
        elif isinstance(p, BufferRestore):
            if self.buffer:
                r = self.new_replica(self.buffer.pop())
                self.log(t, self.r_unit[r], ASSIGNED)
                self.push(t + p.restore_s, _READY, r)
            else:
                unit = self.new_unit(t)
                r = self.new_replica(unit)
                self.pending_direct.append(r)
                self.push(t + p.lead_time_s, _UNIT_ARRIVES, unit, float(r))

    def ready(self, r: int, t: float) -> None:
        if isinstance(self.policy, Reactive) and self.boot_fails():
            self.log(t, self.r_unit[r], FAILED)  # health check failed: order another, start over
            self.log(t, self.r_unit[r], RELEASED)
            self.r_unit[r] = self.new_unit(t)
            self.push(t + self.policy.cold_start_s, _READY, r)
            return
        self.starting -= 1
        self.log(t, self.r_unit[r], READY)
        self.buckets[0][r] = None
        while self.queue and self.r_active[r] < self.c:
            self.start(self.queue.popleft(), r, t)
        if self.r_active[r] == 0:
            self.went_idle(r, t)

    def idle_check(self, r: int, since: float, t: float) -> None:
        if not self.r_alive[r] or self.r_active[r] or self.r_idle_since[r] != since:
            return
        self.r_alive[r] = False
        self.alive -= 1
        del self.buckets[0][r]
        unit = self.r_unit[r]
        if isinstance(self.policy, BufferRestore):
            self.to_buffer(unit, t)
        else:
            self.log(t, unit, RELEASED)

    # -- buffer -----------------------------------------------------------------------------------------
    def to_buffer(self, unit: int, t: float) -> None:
        p = self.policy
        assert isinstance(p, BufferRestore)
        if self.pending_direct:  # a replica waiting on a slow order takes this GPU now
            r = self.pending_direct.popleft()
            self.r_unit[r] = unit
            self.log(t, unit, ASSIGNED)
            self.push(t + p.restore_s, _READY, r)
            return
        self.log(t, unit, IDLE)
        self.idle_since[unit] = t
        self.buffer.append(unit)

    def unit_arrives(self, unit: int, r: int, t: float) -> None:
        p = self.policy
        assert isinstance(p, BufferRestore)
        if r < 0:
            self.ordered_for_buffer -= 1
        if self.boot_fails():
            self.log(t, unit, FAILED)
            self.log(t, unit, RELEASED)
            if r >= 0 and self.r_unit[r] == unit:  # reorder for that replica
                self.r_unit[r] = self.new_unit(t)
                self.push(t + p.lead_time_s, _UNIT_ARRIVES, self.r_unit[r], float(r))
            return
        if r >= 0 and self.r_unit[r] == unit:
            self.pending_direct.remove(r)
            self.log(t, unit, ASSIGNED)
            self.push(t + p.restore_s, _READY, r)
        else:  # ordered for the buffer, or its replica already got a returned GPU
            self.to_buffer(unit, t)

    def tick(self, t: float) -> None:
        p = self.policy
        assert isinstance(p, BufferRestore)
        alive = self.alive
        self.history.append(alive)
        every = max(1, int(p.sizing_every_s / p.tick_s))
        if (len(self.history) - 1) % every == 0:
            self.target = p.buffer if p.buffer is not None else self.lp_target(alive)
            self.targets.append((t, self.target))
        want = self.target - len(self.buffer) - self.ordered_for_buffer
        for _ in range(want):
            self.ordered_for_buffer += 1
            self.push(t + p.lead_time_s, _UNIT_ARRIVES, self.new_unit(t), -1.0)
        # Ski rental: a unit above the target goes back only once it has idled as long as buying it again
        # would take (the lead time, all paid), so a dip in demand does not churn the buffer.
        keep = p.lead_time_s if p.release_after_s is None else p.release_after_s
        while len(self.buffer) > self.target and self.idle_since[self.buffer[0]] <= t - keep:
            self.log(t, self.buffer.pop(0), RELEASED)  # the longest idle goes back first

    def lp_target(self, alive: int) -> int:
        p = self.policy
        assert isinstance(p, BufferRestore)
        lag = max(1, int(p.lead_time_s / p.tick_s))
        window = self.history[-int(p.history_s / p.tick_s) :]
        if len(window) > lag + 10:
            # Robust statistics (median, MAD): a spike in the window would otherwise inflate the buffer for
            # hours after it; spikes are the part the buffer does not try to predict.
            d = np.asarray(window, dtype=float)
            inc = d[lag:] - d[:-lag]
            median = float(np.median(inc))
            mean, std = max(0.0, median), 1.4826 * float(np.median(np.abs(inc - median)))
        else:  # no history yet: Poisson-like fluctuation of the current load
            mean, std = 0.0, math.sqrt(2.0 * max(alive, 1))
        itype = InstanceType(
            "sim", self.svc.price_per_hour, p.lead_time_s, failure_rate=self.svc.failure_rate
        )
        plan = size_buffer(
            SizingInput(Forecast(mean, std, p.lead_time_s), [itype], p.confidence, self.svc.slo_s),
            explain=False,
        )
        return plan.hold_total

    # -- main loop --------------------------------------------------------------------------------------
    def run(self) -> None:
        arrivals, n = self.trace.arrivals, len(self.trace)
        p = self.policy
        # Start in steady state: the scaling policies begin with the replicas the load at t=0 needs.
        if isinstance(p, FixedPeak):
            gpus = p.gpus if p.gpus is not None else max(1, math.ceil(self.trace.peak_occupancy() / self.c))
        else:
            gpus = math.ceil(self.initial_load() / self.c)
        for _ in range(gpus):
            r = self.new_replica(self.new_unit(0.0))
            self.log(0.0, self.r_unit[r], READY)
            self.buckets[0][r] = None
        if isinstance(p, BufferRestore):
            self.push(0.0, _TICK, 0)
        heap, i = self.heap, 0
        inf = math.inf
        while True:
            t_arr = arrivals[i] if i < n else inf
            t_ev = heap[0][0] if heap else inf
            if t_arr == inf and t_ev == inf:
                break
            if t_arr <= t_ev:
                self.now = t_arr
                i += 1
                self.next_arrival = i
                self.arrive(i - 1, t_arr)
                continue
            t, _, kind, a, b = heapq.heappop(heap)
            self.now = t
            if kind == _COMPLETE:
                self.complete(a, t)
            elif kind == _READY:
                self.ready(a, t)
            elif kind == _IDLE_CHECK:
                self.idle_check(a, b, t)
            elif kind == _UNIT_ARRIVES:
                self.unit_arrives(a, int(b), t)
            elif kind == _TICK:
                busy = i < n or self.queue or self.starting or any(self.r_active)
                if busy:
                    self.tick(t)
                    self.push(t + p.tick_s, _TICK, 0)  # type: ignore[union-attr]
        self.finish()

    def finish(self) -> None:
        end = max(self.trace.duration_s, self.now)
        self.end = end
        for r, alive in enumerate(self.r_alive):
            if alive:
                self.log(end, self.r_unit[r], RELEASED)
        for unit in self.buffer:
            self.log(end, unit, RELEASED)

    def event_log(self) -> EventLog:
        return EventLog(
            np.asarray(self.log_t, dtype=float), np.asarray(self.log_u, dtype=np.int64),
            np.asarray(self.log_c, dtype=np.int8), self.end,
        )  # fmt: skip
