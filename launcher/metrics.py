"""Prometheus metrics of the launcher and proxy, served at the proxy's ``/metrics``.

One registry per process (not the global default) so tests can run several launchers side by side.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_PHASE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "coldstart_requests", "Requests answered by the proxy", ["route", "status"], registry=r
        )
        self.cold_boots = Counter("coldstart_cold_boots", "Replicas started by a cold boot", registry=r)
        self.restores = Counter("coldstart_restores", "Replicas restored from a snapshot", registry=r)
        self.restore_failures = Counter(
            "coldstart_restore_failures",
            "Restores that failed and fell back to a cold boot",
            ["reason"],
            registry=r,
        )
        self.replica_failures = Counter(
            "coldstart_replica_failures",
            "Serving replicas taken out of service: engine exited, or unresponsive to its liveness probe",
            ["kind"],
            registry=r,
        )
        self.snapshots_taken = Counter("coldstart_snapshots_taken", "Snapshots written", registry=r)
        self.phase_seconds = Histogram(
            "coldstart_phase_seconds",
            "Duration of lifecycle phases",
            ["phase"],
            buckets=_PHASE_BUCKETS,
            registry=r,
        )
        self.snapshot_bytes = Gauge("coldstart_snapshot_bytes", "Size of the snapshot in use", registry=r)
        self.queue_depth = Gauge("coldstart_queue_depth", "Requests waiting for a ready replica", registry=r)
        self.in_flight = Gauge("coldstart_in_flight", "Requests being served by replicas", registry=r)
        self.replicas = Gauge("coldstart_replicas", "Replicas by state", ["state"], registry=r)
        self.gpu_seconds_held = Counter(
            "coldstart_gpu_seconds_held", "GPU-seconds (or CPU-slot seconds) held from the pool", registry=r
        )
        self.gpu_seconds_running = Counter(
            "coldstart_gpu_seconds_running", "GPU-seconds with a replica up (ready or draining)", registry=r
        )
        self.gpu_seconds_serving = Counter(
            "coldstart_gpu_seconds_serving", "Seconds replicas spent serving at least one request", registry=r
        )
        self.gpu_allocation_utilization = Gauge(
            "coldstart_gpu_allocation_utilization",
            "GPU-seconds running the app (a replica up) / GPU-seconds held, since start",
            registry=r,
        )
        self.gpu_busy_utilization = Gauge(
            "coldstart_gpu_busy_utilization",
            "GPU-seconds with a request in flight / GPU-seconds held, since start",
            registry=r,
        )
