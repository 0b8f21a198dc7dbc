"""Prometheus metrics of the gateway, served at the proxy's ``/metrics``.

One registry per process (not the global default) so tests can run several launchers side by side.
Every metric about replicas, requests, queues, swaps and GPU-seconds carries a ``model`` label (the
deployment's public name). Code that works for one deployment (the snapshot manager, a replica's
lifecycle) gets ``metrics.for_model(name)``: the same attribute names with ``model`` already bound, so
``m.restores.inc()`` and ``m.phase_seconds.labels("restore").observe(s)`` read as before.

``coldstart_phase_seconds`` is the end-to-end clock of a request that arrives at zero replicas, one label
per phase: ``image_mount`` (the deployment's imagefs mount, once per launcher; the chunks themselves are
fetched on demand inside the boot or restore that reads them: their bytes are
``coldstart_image_fetched_bytes``), ``pull`` (another host's snapshot through the tiers), ``verify``,
``checkpointer_restore``, ``wake``, ``canary`` (``snapshots/manager.py``), and ``first_token``: from the
request's arrival at the proxy, with no replica ready, to the first token of its streamed answer
(``proxy.py``). The others (``boot``, ``restore``, ``snapshot_*``) are the lifecycle's own steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_PHASE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
_WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 600)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        m = ["model"]
        self.requests = Counter(
            "coldstart_requests", "Requests answered by the proxy", ["model", "route", "status"], registry=r
        )
        self.cold_boots = Counter("coldstart_cold_boots", "Replicas started by a cold boot", m, registry=r)
        self.restores = Counter("coldstart_restores", "Replicas restored from a snapshot", m, registry=r)
        self.restore_failures = Counter(
            "coldstart_restore_failures",
            "Restores that failed and fell back to a cold boot",
            ["model", "reason"],
            registry=r,
        )
        self.replica_failures = Counter(
            "coldstart_replica_failures",
            "Replicas taken out of service: engine exited, unresponsive, failed boot, failed unit",
            ["model", "kind"],
            registry=r,
        )
        self.swaps = Counter(
            "coldstart_swaps",
            "Replicas placed on a unit freed by evicting another model's replica (label: the placed one)",
            m,
            registry=r,
        )
        self.evictions = Counter(
            "coldstart_evictions",
            "Replicas stopped to free their unit for another deployment (label: the evicted one)",
            m,
            registry=r,
        )
        self.swap_seconds = Histogram(
            "coldstart_swap_seconds",
            "From the eviction's start to the placed replica being ready",
            m,
            buckets=_PHASE_BUCKETS,
            registry=r,
        )
        self.snapshots_taken = Counter("coldstart_snapshots_taken", "Snapshots written", m, registry=r)
        self.phase_seconds = Histogram(
            "coldstart_phase_seconds",
            "Duration of lifecycle phases",
            ["model", "phase"],
            buckets=_PHASE_BUCKETS,
            registry=r,
        )
        self.snapshot_bytes = Gauge("coldstart_snapshot_bytes", "Size of the snapshot in use", m, registry=r)
        self.image_fetched_bytes = Gauge(
            "coldstart_image_fetched_bytes",
            "Bytes the deployment's image mount fetched from beyond its local chunk cache until the first "
            "replica was ready",
            m,
            registry=r,
        )
        self.queue_depth = Gauge(
            "coldstart_queue_depth", "Requests waiting for a ready replica", m, registry=r
        )
        self.queue_wait_seconds = Histogram(
            "coldstart_queue_wait_seconds",
            "Time a request waited for a replica with room",
            m,
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("coldstart_in_flight", "Requests being served by replicas", m, registry=r)
        self.replicas = Gauge("coldstart_replicas", "Replicas by state", ["model", "state"], registry=r)
        self.gpu_seconds_held = Counter(
            "coldstart_gpu_seconds_held", "GPU-seconds (or CPU-slot seconds) held by replicas", m, registry=r
        )
        self.gpu_seconds_running = Counter(
            "coldstart_gpu_seconds_running",
            "GPU-seconds with a replica up (ready or draining)",
            m,
            registry=r,
        )
        self.gpu_seconds_serving = Counter(
            "coldstart_gpu_seconds_serving",
            "Seconds replicas spent serving at least one request",
            m,
            registry=r,
        )
        self.gpu_allocation_utilization = Gauge(
            "coldstart_gpu_allocation_utilization",
            "GPU-seconds running the app (a replica up) / GPU-seconds held, since start",
            m,
            registry=r,
        )
        self.gpu_busy_utilization = Gauge(
            "coldstart_gpu_busy_utilization",
            "GPU-seconds with a request in flight / GPU-seconds held, since start",
            m,
            registry=r,
        )
        # Host-wide: the buffer the LP asks the pool to hold.
        self.buffer_target = Gauge(
            "coldstart_buffer_target", "Idle units the LP plan holds (pool.sizing)", registry=r
        )

    def for_model(self, model: str) -> ModelMetrics:
        return ModelMetrics(self, model)


class _Bound:
    """A metric with its ``model`` label bound: ``labels(*rest)`` adds the others; without further labels
    it is the child itself (``inc``, ``dec``, ``set``, ``observe``)."""

    def __init__(self, metric: Any, model: str) -> None:
        self._metric = metric
        self._model = model

    def labels(self, *rest: str) -> Any:
        return self._metric.labels(self._model, *rest)

    def inc(self, amount: float = 1.0) -> None:
        self._metric.labels(self._model).inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self._metric.labels(self._model).dec(amount)

    def set(self, value: float) -> None:
        self._metric.labels(self._model).set(value)

    def observe(self, value: float) -> None:
        self._metric.labels(self._model).observe(value)


class ModelMetrics:
    """``Metrics`` seen from one deployment (``model`` bound)."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self.root = metrics
        self.model = model
        self.registry = metrics.registry
        for name, value in vars(metrics).items():
            if name != "registry" and "model" in getattr(value, "_labelnames", ()):
                setattr(self, name, _Bound(value, model))

    # Declared for type checkers; set in __init__.
    requests: _Bound
    cold_boots: _Bound
    restores: _Bound
    restore_failures: _Bound
    replica_failures: _Bound
    swaps: _Bound
    evictions: _Bound
    swap_seconds: _Bound
    snapshots_taken: _Bound
    phase_seconds: _Bound
    snapshot_bytes: _Bound
    image_fetched_bytes: _Bound
    queue_depth: _Bound
    queue_wait_seconds: _Bound
    in_flight: _Bound
    replicas: _Bound
    gpu_seconds_held: _Bound
    gpu_seconds_running: _Bound
    gpu_seconds_serving: _Bound
    gpu_allocation_utilization: _Bound
    gpu_busy_utilization: _Bound
