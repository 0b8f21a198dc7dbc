"""``coldstart.pool``: a buffer of idle, health-checked GPUs, sized by a linear program, and a simulator.

Standalone: imports nothing else of coldstart. CLI: ``coldstart pool inventory|status|health|size|simulate``.

Scheduler API (what the launcher uses)::

    from coldstart.pool import Pool, make_provider, pool_for_host

    async with pool_for_host(cpu_slots=2, target_idle=1) as pool:   # local GPUs, or CPU slots if none
        unit = await pool.acquire(timeout=30)      # fastest: an idle healthy unit from the buffer
        unit.device.index / unit.device.uuid       # the GPU to pin (CUDA_VISIBLE_DEVICES); None for CPU
        unit_env(unit)                             # {"CUDA_VISIBLE_DEVICES": uuid} for GPUs, {} for CPU
        pool.kind                                  # "gpu" or "cpu": what the replica runs on
        pool.on_failure.append(cb)                 # cb(unit, reason): a critical XID hit an assigned GPU
        ...
        await pool.release(unit)                   # replica stopped: re-check, back to the buffer or out
        await pool.release(unit, failed="CUDA error 999")   # the replica saw the GPU break
        pool.set_target(n)                         # buffer size, e.g. SizingPlan.hold_total from the LP

- ``acquire`` raises ``AcquireTimeoutError`` (one line: assigned / coming up / failed / capacity) and
  ``PoolClosedError``; a unit that failed its health check is never handed out (``local`` quarantines it).
- Providers (``make_provider(name, **options)``): ``local`` (this host's GPUs via NVML; ``NoDriverError``
  "no NVIDIA driver on this host" when there are none), ``cpu`` (``slots`` CPU replicas, zero allowed),
  ``simulated`` (instance types with price, lead time, supply cap, failure rate).
- Unit lifecycle: ``states.UnitState`` (requested, booting, health-checking, idle, assigned, draining,
  failed, released); ``Pool.inventory`` holds every unit, its time in each state and the transition log.
- Sizing: ``sizing.size_buffer(SizingInput(Forecast(mean, std, horizon_s, spike_rate_per_s, spike_size),
  types, confidence, wait_budget_s))`` -> ``SizingPlan`` (units to hold per type, contingent orders, one
  explanation line per decision naming the binding constraints); ``can_hold=False`` with
  ``Forecast(now=n)``: the buffer is dry, which types to order ``n`` GPUs from (soonest to land, cheapest).
- Simulator: ``simulate.run_policy(trace, FixedPeak() | Reactive(cold_start_s) | BufferRestore(restore_s,
  types), ServiceModel(concurrency, keep_warm_s, ...))`` -> ``PolicyResult`` with its ``EventLog``: GPU
  allocation utilization (replica up / paid) and busy utilization (serving / paid), both from the log;
  ``report.compare/format_table/plot``.
"""

from __future__ import annotations

import logging
from typing import Any

from coldstart.pool.errors import NoDriverError, PoolError
from coldstart.pool.inventory import Unit
from coldstart.pool.providers import make_provider
from coldstart.pool.scheduler import Pool
from coldstart.pool.states import UnitState

log = logging.getLogger("coldstart.pool")


def pool_for_host(cpu_slots: int | None = None, **pool_options: Any) -> Pool:
    """A pool over this host's GPUs; on a host without an NVIDIA driver, over ``cpu_slots`` CPU slots
    (one log line says so). The caller still enters it (``async with``) to start it."""
    try:
        provider = make_provider("local")
    except NoDriverError as exc:
        log.info("%s; pool uses CPU slots", exc)
        provider = make_provider("cpu", slots=cpu_slots)
    return Pool(provider, **pool_options)


def unit_env(unit: Unit) -> dict[str, str]:
    """Environment that pins a replica to its unit's GPU (empty for CPU slots)."""
    device = unit.device
    if device is None or device.index is None:
        return {}
    return {"CUDA_VISIBLE_DEVICES": device.uuid or str(device.index)}


__all__ = ["Pool", "PoolError", "Unit", "UnitState", "make_provider", "pool_for_host", "unit_env"]
