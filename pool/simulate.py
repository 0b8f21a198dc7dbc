"""Trace-driven, event-driven simulator of three ways to hold GPUs for an inference service.

Every policy runs the same replica autoscaler on the same trace: a request that finds no free slot queues
and asks for replicas (enough for the last minute's arrival rate plus the queue); a replica serves
``concurrency`` requests at once; requests are packed onto the busiest replica with a free slot so that
the others go idle, and a replica idle for ``keep_warm_s`` stops (as the launcher's idle timeout). The
policies differ in where a new replica's GPU comes from and what is paid for:

- ``FixedPeak``: ``gpus`` GPUs paid all the time (default: the trace's peak demand, in hindsight, the best
  case for it); a replica starts on a free owned GPU in ``start_s`` (default 0: its waits are the floor).
- ``Reactive``: no buffer; each new replica orders a GPU and serves after ``cold_start_s`` (allocation +
  boot + load: 2000 s naive, 300 s, 50 s with snapshots); its GPU is released when the replica stops.
- ``BufferRestore``: a buffer of idle healthy GPUs sized by the LP (``sizing.py``) from a forecast of the
  demand increase over the refill lead time (random walk fitted on recent history, plus a spike prior);
  a new replica takes a buffered GPU and restores a snapshot in ``restore_s``. When the buffer is dry the
  missing GPUs are ordered through the LP in dry mode, which picks among ``types`` (a dear fast burst
  provider when the cheap one is slow), after first claiming refill orders that land sooner; burst orders
  also bridge the buffer when it cannot cover until one would land, while the cheap refill replaces every
  GPU drawn (``_Sim.tick``). Requests go to replicas on refill GPUs first, so burst replicas drain first. A
  stopped replica's GPU goes back to the buffer; surplus refill orders are cancelled (paid until cancelled)
  and idle GPUs above the target go back to the cloud, dearest first, once idle as long as re-buying them
  would take (their lead time: ski rental).

Every unit's life is written to an ``EventLog``: paid from REQUESTED to RELEASED; running the application
between REPLICA_UP and REPLICA_DOWN (a replica is up on it, from ready to stopped); busy between SERVE_START
and SERVE_END (at least one request in service). Both utilizations and the cost are computed from that log
(``EventLog.utilization``), not estimated from the policy's parameters:

- GPU allocation utilization (the issue's and Modal's definition) = GPU-s running the application / GPU-s
  paid; idle buffer GPUs, GPUs still booting or restoring are paid but not running it.
- busy utilization (stricter) = GPU-s with >= 1 request in service / GPU-s paid; keep-warm time is not busy.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from coldstart.pool.catalog import InstanceType
from coldstart.pool.errors import ConfigError, InfeasibleSizingError
from coldstart.pool.sizing import Forecast, SizingInput, size_buffer
from coldstart.pool.states import UnitState
from coldstart.pool.trace import DAY_S, Trace

# Event-log codes: unit lifecycle states, plus replica and serving edges.
REQUESTED, IDLE, ASSIGNED, FAILED, RELEASED = 0, 1, 2, 3, 4
SERVE_START, SERVE_END, REPLICA_UP, REPLICA_DOWN = 5, 6, 7, 8
CODE_NAMES = {
    REQUESTED: UnitState.REQUESTED.value, IDLE: UnitState.IDLE.value, ASSIGNED: UnitState.ASSIGNED.value,
    FAILED: UnitState.FAILED.value, RELEASED: UnitState.RELEASED.value,
    SERVE_START: "serve-start", SERVE_END: "serve-end",
    REPLICA_UP: "replica-up", REPLICA_DOWN: "replica-down",
}  # fmt: skip

# Heap event kinds
_COMPLETE, _READY, _UNIT_ARRIVES, _IDLE_CHECK, _TICK = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class ServiceModel:
    # An LLM engine batching requests: 8 in flight per GPU keeps per-token latency near the single-request
    # one for chat-sized models (an autoscaler target, as Modal's target_inputs; the engine could take more).
    concurrency: int = 8
    keep_warm_s: float = 60.0  # an idle replica stops after this long (the launcher's idle timeout)
    price_per_hour: float = 3.0  # per GPU, fixed peak and reactive
    slo_s: float = 5.0  # a request waiting longer than this misses the SLO
    failure_rate: float = 0.0  # share of newly booted GPUs that fail their health check (reactive)

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.keep_warm_s < 0 or not 0 <= self.failure_rate < 1:
            raise ConfigError("service model: concurrency >= 1, keep_warm_s >= 0, failure_rate in [0, 1)")


@dataclass(frozen=True)
class FixedPeak:
    gpus: int | None = None  # None: the trace's peak demand
    start_s: float = 0.0  # a replica starting on an owned GPU

    @property
    def name(self) -> str:
        return "fixed peak" + (f" ({self.gpus})" if self.gpus else "")


@dataclass(frozen=True)
class Reactive:
    cold_start_s: float = 300.0

    @property
    def name(self) -> str:
        return f"reactive, cold start {self.cold_start_s:g}s"


# The buffer's refill: a cloud's on-demand H100 (allocation + boot + health check take minutes: 600 s,
# lognormal, cv 0.3); the burst provider: pre-booted hosts of a dearer provider, 1.5x the price, 90 s to a
# health-checked GPU, at most 64 at once.
REFILL = InstanceType("cloud-h100", 3.0, 600.0)
BURST = InstanceType("burst-h100", 4.5, 90.0, supply_cap=64)


@dataclass(frozen=True)
class BufferRestore:
    restore_s: float = 2.0
    types: tuple[InstanceType, ...] = (REFILL, BURST)
    buffer: int | None = None  # fixed buffer size; None: the LP sizes it
    confidence: float = 0.99
    # Spike prior of the forecast (in production fitted on past weeks): how often, and how big relative to
    # the current demand. The LP counts a spike only over horizons where one is likely enough.
    spikes_per_day: float = 4.0
    spike_height: float = 1.0
    sizing_every_s: float = 60.0
    history_s: float = 4 * 3600.0
    tick_s: float = 5.0
    release_after_s: float | None = None  # None: each unit's own lead time (ski rental)

    def __post_init__(self) -> None:
        if not self.types:
            raise ConfigError("buffer policy needs at least one instance type")

    @property
    def name(self) -> str:
        size = f"buffer {self.buffer}" if self.buffer is not None else "LP buffer"
        leads = [f"refill {self.types[0].lead_time_s:g}s"]
        leads += [f"burst {t.lead_time_s:g}s" for t in self.types[1:]]
        return f"{size}, {' + '.join(leads)}, restore {self.restore_s:g}s"


Policy = FixedPeak | Reactive | BufferRestore


@dataclass(frozen=True)
class Utilization:
    running_gpu_s: float  # a replica up on the GPU
    busy_gpu_s: float  # >= 1 request in service
    paid_gpu_s: float

    @property
    def allocation(self) -> float:
        return self.running_gpu_s / self.paid_gpu_s if self.paid_gpu_s > 0 else 0.0

    @property
    def busy(self) -> float:
        return self.busy_gpu_s / self.paid_gpu_s if self.paid_gpu_s > 0 else 0.0


@dataclass
class EventLog:
    t: np.ndarray
    unit: np.ndarray
    code: np.ndarray
    end_s: float
    unit_price: np.ndarray  # dollars per hour, indexed by unit id
    unit_type: np.ndarray  # index into the policy's types, -1 for fixed peak and reactive GPUs

    def _span(self, start: int, stop: int) -> float:
        return float(self.t[self.code == stop].sum() - self.t[self.code == start].sum())

    def utilization(self) -> Utilization:
        """From the log alone: every span is (sum of its end times) - (sum of its start times)."""
        return Utilization(
            self._span(REPLICA_UP, REPLICA_DOWN), self._span(SERVE_START, SERVE_END),
            self._span(REQUESTED, RELEASED),
        )  # fmt: skip

    def paid_by_unit(self) -> np.ndarray:
        paid = np.zeros(len(self.unit_price))
        np.add.at(paid, self.unit[self.code == RELEASED], self.t[self.code == RELEASED])
        np.subtract.at(paid, self.unit[self.code == REQUESTED], self.t[self.code == REQUESTED])
        return paid

    def cost(self) -> float:
        return float((self.paid_by_unit() * self.unit_price).sum() / 3600.0)

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
    running_gpu_s: float
    busy_gpu_s: float
    paid_gpu_s: float
    utilization: float  # GPU allocation utilization (the definition)
    busy_utilization: float
    p50_wait_s: float
    p99_wait_s: float
    over_slo: float
    peak_gpus: int
    burst_gpu_s: float = 0.0  # paid GPU-s of types other than the first (the burst provider)
    buffer_targets: list[tuple[float, int]] = field(default_factory=list)


def run_policy(
    trace: Trace, policy: Policy, svc: ServiceModel = ServiceModel(), seed: int = 0
) -> PolicyResult:
    sim = _Sim(trace, policy, svc, seed)
    sim.run()
    log = sim.event_log()
    u = log.utilization()
    waits = sim.waits
    paid = log.paid_by_unit()
    burst = float(paid[log.unit_type > 0].sum())
    return PolicyResult(
        policy.name, log, waits, log.cost(), u.running_gpu_s, u.busy_gpu_s, u.paid_gpu_s, u.allocation,
        u.busy,
        float(np.percentile(waits, 50)) if len(waits) else 0.0,
        float(np.percentile(waits, 99)) if len(waits) else 0.0,
        float((waits > svc.slo_s).mean()) if len(waits) else 0.0,
        int(log.allocated(np.unique(log.t)).max(initial=0)), burst, sim.targets,
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
        self.u_price: list[float] = [0.0]  # unit ids start at 1
        self.u_type: list[int] = [-1]
        # replicas
        self.r_unit: list[int] = []
        self.r_active: list[int] = []
        self.r_idle_since: list[float] = []
        self.r_alive: list[bool] = []
        self.r_up: list[bool] = []
        # Ready replicas by tier (0: the first type's GPUs, 1: burst GPUs) and requests held. Requests go to
        # tier 0 first (cost-aware routing), so replicas on dear burst GPUs drain and stop first.
        self.tiers: list[list[dict[int, None]]] = [[{} for _ in range(self.c)] for _ in range(2)]
        self.r_tier: list[int] = []
        self.queue: deque[int] = deque()
        self.starting = 0  # replicas not yet up
        self.alive = 0  # replicas not stopped (starting or up)
        self.in_service = 0
        # fixed peak: owned GPUs no replica runs on
        self.owned_free: list[int] = []
        # buffer policy
        self.types: list[InstanceType] = list(policy.types) if isinstance(policy, BufferRestore) else []
        self.type_index = {t.name: i for i, t in enumerate(self.types)}
        self.held_of_type = [0] * len(self.types)  # units not released, per type (supply caps)
        self.buffer: list[int] = []  # idle units; scale-up takes the newest
        self.idle_since: dict[int, float] = {}
        self.inflight: dict[int, float] = {}  # ordered unit -> when it lands
        self.for_replica: dict[int, int] = {}  # ordered unit -> the replica waiting for it
        self.pending: deque[int] = deque()  # replicas waiting for an ordered GPU, oldest first
        self.target = 0  # the LP's hold: GPUs to keep idle
        self.hold_type = 0  # refill orders go to this type (the LP's hold)
        self.fast_cover = 0  # GPUs on hand or landing before a fast order could, at the confidence
        self.targets: list[tuple[float, int]] = []
        self.history: list[int] = []
        self.sizing_cache: dict[tuple[float, ...], tuple[int, int, int]] = {}
        self.now = 0.0
        self.end = 0.0
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

    def new_unit(self, t: float, price: float, itype: int = -1) -> int:
        unit = len(self.u_price)
        self.u_price.append(price)
        self.u_type.append(itype)
        if itype >= 0:
            self.held_of_type[itype] += 1
        self.log(t, unit, REQUESTED)
        return unit

    def release(self, t: float, unit: int) -> None:
        self.log(t, unit, RELEASED)
        if self.u_type[unit] >= 0:
            self.held_of_type[self.u_type[unit]] -= 1

    def new_replica(self, unit: int) -> int:
        self.r_unit.append(unit)
        self.r_active.append(0)
        self.r_idle_since.append(-1.0)
        self.r_alive.append(True)
        self.r_up.append(False)
        self.r_tier.append(0)
        self.alive += 1
        self.starting += 1
        return len(self.r_unit) - 1

    def boot_fails(self, rate: float) -> bool:
        return rate > 0 and bool(self.rng.random() < rate)

    # -- requests ---------------------------------------------------------------------------------------
    def start(self, i: int, r: int, t: float) -> None:
        self.waits[i] = t - self.trace.arrivals[i]
        self.in_service += 1
        a = self.r_active[r]
        buckets = self.tiers[self.r_tier[r]]
        del buckets[a][r]
        a += 1
        self.r_active[r] = a
        if a == 1:
            self.log(t, self.r_unit[r], SERVE_START)
        if a < self.c:
            buckets[a][r] = None
        self.push(t + self.trace.services[i], _COMPLETE, r)

    def arrive(self, i: int, t: float) -> None:
        for buckets in self.tiers:
            for k in range(self.c - 1, -1, -1):  # the busiest replica with a free slot
                if buckets[k]:
                    r = next(reversed(buckets[k]))  # most recently used: lets the others go idle
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
        self.in_service -= 1
        a = self.r_active[r]
        buckets = self.tiers[self.r_tier[r]]
        if a < self.c:
            del buckets[a][r]
        a -= 1
        self.r_active[r] = a
        buckets[a][r] = None
        if a == 0:
            self.log(t, self.r_unit[r], SERVE_END)
            self.went_idle(r, t)

    def went_idle(self, r: int, t: float) -> None:
        self.r_idle_since[r] = t
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
        # while requests queue, at least one replica more than those in service fill (the rate lags)
        return max(math.ceil(rate * self.mean_service / self.c + drain),
                   math.ceil(self.in_service / self.c) + (1 if self.queue else 0))  # fmt: skip

    def scale_up(self, t: float) -> None:
        p = self.policy
        if isinstance(p, FixedPeak):
            want = self.desired(t, p.start_s) - self.alive
            while want > 0 and self.owned_free:
                self.assign(self.new_replica(self.owned_free.pop()), t, p.start_s)
                want -= 1
        elif isinstance(p, Reactive):
            for _ in range(self.desired(t, p.cold_start_s) - self.alive):
                self.assign(self.new_replica(self.new_unit(t, self.svc.price_per_hour)), t, p.cold_start_s)
        else:
            want = self.desired(t, p.restore_s) - self.alive
            while want > 0 and self.buffer:
                # the cheapest unit, the newest of those: dear (burst) ones stay idle and go back first,
                # and the longest idle are the ones released when the buffer is above its target
                unit = min(reversed(self.buffer), key=self.u_price.__getitem__)
                self.buffer.remove(unit)
                del self.idle_since[unit]
                self.assign(self.new_replica(unit), t, p.restore_s)
                want -= 1
            if want > 0:  # the buffer is dry: GPUs for what the next fast order's lead time needs
                fastest = min(typ.lead_time_s for typ in self.types)
                short = self.desired(t, fastest + p.restore_s) - self.alive
                if short > 0:
                    self.order_for_replicas(short, t)

    def assign(self, r: int, t: float, delay: float) -> None:
        self.log(t, self.r_unit[r], ASSIGNED)
        self.push(t + delay, _READY, r)

    def ready(self, r: int, t: float) -> None:
        p = self.policy
        if isinstance(p, Reactive) and self.boot_fails(self.svc.failure_rate):
            self.log(t, self.r_unit[r], FAILED)  # health check failed: order another, start over
            self.release(t, self.r_unit[r])
            self.r_unit[r] = self.new_unit(t, self.svc.price_per_hour)
            self.assign(r, t, p.cold_start_s)
            return
        self.up(r, t)

    def up(self, r: int, t: float) -> None:
        self.starting -= 1
        self.r_up[r] = True
        unit = self.r_unit[r]
        self.r_tier[r] = 1 if self.u_type[unit] > 0 else 0
        self.log(t, unit, REPLICA_UP)
        self.tiers[self.r_tier[r]][0][r] = None
        while self.queue and self.r_active[r] < self.c:
            self.start(self.queue.popleft(), r, t)
        if self.r_active[r] == 0:
            self.went_idle(r, t)

    def idle_check(self, r: int, since: float, t: float) -> None:
        if not self.r_alive[r] or self.r_active[r] or self.r_idle_since[r] != since:
            return
        self.r_alive[r] = False
        self.r_up[r] = False
        self.alive -= 1
        del self.tiers[self.r_tier[r]][0][r]
        unit = self.r_unit[r]
        self.log(t, unit, REPLICA_DOWN)
        if isinstance(self.policy, FixedPeak):
            self.log(t, unit, IDLE)
            self.owned_free.append(unit)
        elif isinstance(self.policy, Reactive):
            self.release(t, unit)
        else:
            self.to_buffer(unit, t)

    # -- buffer -----------------------------------------------------------------------------------------
    def order(self, t: float, itype: int, replica: int = -1) -> int:
        typ = self.types[itype]
        unit = self.new_unit(t, typ.price_per_hour, itype)
        land = t + typ.sample_lead_time(self.rng)
        self.inflight[unit] = land
        if replica >= 0:
            self.for_replica[unit] = replica
        self.push(land, _UNIT_ARRIVES, unit)
        return unit

    def remaining_types(self, busy_only: bool) -> list[InstanceType]:
        """The types with their supply caps less what we hold (or, ``busy_only``, less what replicas use:
        idle and incoming refill units are what the sizing LP decides about)."""
        used = list(self.held_of_type)
        if busy_only:
            for unit in self.buffer:
                used[self.u_type[unit]] -= 1
            for unit in self.inflight:
                if unit not in self.for_replica:
                    used[self.u_type[unit]] -= 1
        return [
            typ if typ.supply_cap >= 1_000_000 else _with_cap(typ, max(0, typ.supply_cap - used[i]))
            for i, typ in enumerate(self.types)
        ]

    def order_for_replicas(self, short: int, t: float) -> None:
        p = self.policy
        assert isinstance(p, BufferRestore)
        # Refill orders that land before a fresh order of the fastest type would are claimed first.
        soonest = t + min(typ.lead_time_s for typ in self.types)
        for unit, land in sorted(self.inflight.items(), key=lambda kv: kv[1]):
            if short <= 0 or land > soonest:
                break
            if unit not in self.for_replica:
                r = self.new_replica(unit)
                self.for_replica[unit] = r
                self.pending.append(r)
                short -= 1
        for itype in self.choose_orders(short):
            r = self.new_replica(0)
            self.r_unit[r] = self.order(t, itype, r)
            self.pending.append(r)

    def choose_orders(self, n: int) -> list[int]:
        """Types to order ``n`` units from right now: the LP in dry mode (cheapest of the soonest to land,
        within what supply is left). Empty when no type has supply left."""
        if n <= 0:
            return []
        p = self.policy
        assert isinstance(p, BufferRestore)
        horizon = 2.0 * max(typ.lead_time_s for typ in self.types)
        try:
            plan = size_buffer(
                SizingInput(Forecast(0.0, 0.0, horizon, now=float(n)), self.remaining_types(False),
                            p.confidence, self.svc.slo_s, can_hold=False),
                explain=False,
            )  # fmt: skip
        except InfeasibleSizingError:
            return []  # no supply left anywhere: the queue waits for GPUs that replicas hand back
        return [self.type_index[d.type_name] for d in plan.decisions for _ in range(d.order)]

    def to_buffer(self, unit: int, t: float) -> None:
        p = self.policy
        assert isinstance(p, BufferRestore)
        if self.pending:  # a replica waiting on an order takes this GPU now; its order becomes a refill
            r = self.pending.popleft()
            self.for_replica.pop(self.r_unit[r], None)
            self.r_unit[r] = unit
            self.assign(r, t, p.restore_s)
            return
        self.log(t, unit, IDLE)
        self.idle_since[unit] = t
        self.buffer.append(unit)

    def unit_arrives(self, unit: int, t: float) -> None:
        p = self.policy
        assert isinstance(p, BufferRestore)
        if self.inflight.pop(unit, None) is None:
            return  # cancelled
        r = self.for_replica.pop(unit, -1)
        itype = self.u_type[unit]
        if self.boot_fails(self.types[itype].failure_rate):
            self.log(t, unit, FAILED)
            self.release(t, unit)
            if r >= 0:  # reorder the same type for that replica
                self.r_unit[r] = self.order(t, itype, r)
            return
        if r >= 0:
            self.pending.remove(r)
            self.assign(r, t, p.restore_s)
        else:  # a refill order, or its replica already got a returned GPU
            self.to_buffer(unit, t)

    def tick(self, t: float) -> None:
        """Dual-index replenishment that executes the LP's plan. The LP's hold is the buffer's target, of
        its hold type (the cheap refill). Its contingent fast orders are placed when the GPUs on hand plus
        those landing before a fresh fast order could fall below the first cover row (demand until a fast
        order lands, at the confidence): they are bridges. Refill orders keep the hold type's GPUs on hand
        and on order at the target, so every GPU drawn is replaced by a cheap one even when a bridge
        covered it. Above the target the refill orders landing last are cancelled (paid while booting),
        then idle GPUs go back, dearest first, once idle for their lead time (ski rental), but never below
        the fast cover on hand.

        Rejected (measured on the seed-like week): counting bridges toward the refill target (the buffer
        turned into burst GPUs: 58% of GPU-hours on burst, cost +21%); a refill that also covers the
        spike-free forecast over its own 600 s lead (util 76.5%, dearer: idle cheap GPUs cost more than
        bridging)."""
        p = self.policy
        assert isinstance(p, BufferRestore)
        self.history.append(self.alive)
        every = max(1, int(p.sizing_every_s / p.tick_s))
        if (len(self.history) - 1) % every == 0:
            self.target, self.hold_type, self.fast_cover = self.sizing()
            self.targets.append((t, self.target))
        soon = t + min(typ.lead_time_s for typ in self.types)
        landing_soon = sum(
            1 for unit, land in self.inflight.items() if land <= soon and unit not in self.for_replica
        )
        for itype in self.choose_orders(self.fast_cover - len(self.buffer) - landing_soon):
            self.order(t, itype)
        refill = sorted((land, unit) for unit, land in self.inflight.items() if unit not in self.for_replica)
        # Burst orders are bridges: the refill still replaces every GPU drawn, and the surplus that follows
        # goes back dearest first (burst GPUs idle first: routing drains their replicas first).
        hold = self.hold_type
        coming = sum(1 for _, unit in refill if self.u_type[unit] == hold)
        want = self.target - sum(1 for unit in self.buffer if self.u_type[unit] == hold) - coming
        for _ in range(want):
            self.order(t, self.hold_type)
        cancel = min(-want, len(refill)) if want < 0 else 0
        for _, unit in refill[len(refill) - cancel :]:  # demand fell: cancel the orders landing last
            del self.inflight[unit]
            self.release(t, unit)  # paid while it was booting
        # above the target counting orders, and above the fast cover on hand (bridges stay until refills land)
        on_hand = len(self.buffer)
        surplus = min(on_hand + len(refill) - cancel - self.target, on_hand - self.fast_cover)
        if surplus > 0:
            # Idle units above the target go back once idle as long as buying one again would take (ski
            # rental: a dip in demand does not churn the buffer), dearest first, then the longest idle.
            due = [u for u in self.buffer if self.idle_since[u] <= t - self.release_after(u)]
            for unit in return_order(due, self.idle_since, self.u_price)[:surplus]:
                self.buffer.remove(unit)
                del self.idle_since[unit]
                self.release(t, unit)

    def release_after(self, unit: int) -> float:
        p = self.policy
        assert isinstance(p, BufferRestore)
        return self.types[self.u_type[unit]].lead_time_s if p.release_after_s is None else p.release_after_s

    def sizing(self) -> tuple[int, int, int]:
        """(buffer target, type to refill with, fast cover) from the LP against the forecast over the
        refill lead time. Fast cover: the LP's first cover row (demand until the soonest order lands)."""
        p = self.policy
        assert isinstance(p, BufferRestore)
        cheapest = min(range(len(self.types)), key=lambda i: self.types[i].price_per_hour)
        if p.buffer is not None:
            return p.buffer, cheapest, p.buffer
        horizon = max(typ.lead_time_s for typ in self.types)
        alive = self.history[-1] if self.history else self.alive
        # Poisson floor: requests in service fluctuate by ~sqrt(2 * load) over a horizon longer than a
        # request, i.e. sqrt(2 * alive / c) replicas; a quiet history must not size the buffer to zero.
        floor = math.sqrt(2.0 * max(alive, 1) / self.c)
        lag = max(1, int(horizon / p.tick_s))
        window = self.history[-int(p.history_s / p.tick_s) :]
        mean, std = 0.0, floor
        if len(window) > lag + 10:
            # Robust statistics (median, MAD) for the ordinary fluctuation: spikes enter through the
            # spike prior below, where the LP weighs them by their probability, not through the std.
            d = np.asarray(window, dtype=float)
            inc = d[lag:] - d[:-lag]
            median = float(np.median(inc))
            mean, std = max(0.0, median), max(floor, 1.4826 * float(np.median(np.abs(inc - median))))
        # A spike scales with the baseline (the median of the last hour), not with a spike under way.
        level = int(np.median(self.history[-int(3600.0 / p.tick_s) :])) if self.history else alive
        types = self.remaining_types(True)
        key = (round(mean, 1), round(std, 1), level, *(typ.supply_cap for typ in types))
        if key not in self.sizing_cache:
            fc = Forecast(mean, std, horizon, p.spikes_per_day / DAY_S, p.spike_height * max(level, 1))
            try:
                plan = size_buffer(SizingInput(fc, types, p.confidence, self.svc.slo_s), explain=False)
            except InfeasibleSizingError:
                return self.target, self.hold_type, self.fast_cover
            held = [plan.hold_of(typ.name) for typ in self.types]
            hold_type = max(range(len(held)), key=lambda i: (held[i], -i)) if plan.hold_total else cheapest
            fast_cover = math.ceil(plan.needs[0][1] - 1e-6)
            self.sizing_cache[key] = (plan.hold_total, hold_type, fast_cover)
        return self.sizing_cache[key]

    # -- main loop --------------------------------------------------------------------------------------
    def run(self) -> None:
        arrivals, n = self.trace.arrivals, len(self.trace)
        p = self.policy
        # Start in steady state: the replicas the load at t=0 needs are up (and, for the buffer, its target).
        needed = math.ceil(self.initial_load() / self.c)
        if isinstance(p, FixedPeak):
            fleet = p.gpus if p.gpus is not None else max(1, math.ceil(self.trace.peak_occupancy() / self.c))
            owned = [self.new_unit(0.0, self.svc.price_per_hour) for _ in range(fleet)]
            for unit in owned[min(needed, fleet) :]:
                self.log(0.0, unit, IDLE)
            self.owned_free = owned[min(needed, fleet) :][::-1]
            starters = owned[: min(needed, fleet)]
        elif isinstance(p, Reactive):
            starters = [self.new_unit(0.0, self.svc.price_per_hour) for _ in range(needed)]
        else:
            first = self.types[0]
            starters = [self.new_unit(0.0, first.price_per_hour, 0) for _ in range(needed)]
        for unit in starters:
            r = self.new_replica(unit)
            self.log(0.0, unit, ASSIGNED)
            self.up(r, 0.0)
        if isinstance(p, BufferRestore):
            self.target, self.hold_type, self.fast_cover = self.sizing()
            for _ in range(self.target):
                unit = self.new_unit(0.0, self.types[self.hold_type].price_per_hour, self.hold_type)
                self.to_buffer(unit, 0.0)
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
                self.unit_arrives(a, t)
            elif kind == _TICK and (i < n or self.queue or self.starting or self.in_service):
                self.tick(t)
                self.push(t + p.tick_s, _TICK, 0)  # type: ignore[union-attr]
        self.finish()

    def finish(self) -> None:
        end = max(self.trace.duration_s, self.now)
        self.end = end
        for r, alive in enumerate(self.r_alive):
            if alive:
                if self.r_up[r]:
                    self.log(end, self.r_unit[r], REPLICA_DOWN)
                self.release(end, self.r_unit[r])
        for unit in self.owned_free + self.buffer + list(self.inflight):
            self.release(end, unit)

    def event_log(self) -> EventLog:
        return EventLog(
            np.asarray(self.log_t, dtype=float), np.asarray(self.log_u, dtype=np.int64),
            np.asarray(self.log_c, dtype=np.int8), self.end, np.asarray(self.u_price, dtype=float),
            np.asarray(self.u_type, dtype=np.int64),
        )  # fmt: skip


def _with_cap(typ: InstanceType, cap: int) -> InstanceType:
    return dataclasses.replace(typ, supply_cap=cap)


def return_order(idle: list[int], idle_since: dict[int, float], price: list[float]) -> list[int]:
    """The order in which idle units go back to the cloud: dearest first, then the longest idle."""
    return sorted(idle, key=lambda u: (-price[u], idle_since[u], u))
