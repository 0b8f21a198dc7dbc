"""The LP in the loop: the live buffer target from ``pool.sizing``, fed by the arrival rates observed per
deployment.

Every ``every_s`` seconds the planner turns what the gateway sees into the sizing LP's forecast and asks it
how many idle units to hold:

    deployments with no replica up, arriving at rate r   -> each needs one unit within the horizon H with
                                                            p = 1 - exp(-r H): mean sum p, variance sum p(1-p)
    requests in flight on the replicas that are up        -> their fluctuation: variance += busy
    the unit's lead time L (CPU slot ~0 s, local GPU ~2 s -> one instance type; its supply cap is the units
      health check, a cluster node: minutes)                not held by replicas; H = 2 max(L, 1 s)

The plan (units to hold and the LP's one-line explanation) is set on the host (``set_buffer``: the pool's
``set_target`` on one host, ``request_resources`` on Ray) and shown in ``/health`` and by
``coldstart_buffer_target``. With the sizing extra (OR-Tools) missing, the target stays where it is and the
explanation says why.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

log = logging.getLogger("coldstart.serve")

HORIZON_S = 60.0
CONFIDENCE = 0.95
WAIT_BUDGET_S = 0.5  # a request at zero may wait this long for a unit on top of its restore


@dataclass(frozen=True)
class Observed:
    """One deployment as the planner sees it."""

    name: str
    rate_per_s: float  # arrivals over the sliding window
    busy: int  # requests in flight
    up: bool  # a replica is starting or serving


@dataclass
class BufferPlan:
    target: int = 0
    explanation: str = "no demand observed yet"
    rates: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, object]:
        return {
            "target": self.target,
            "explanation": self.explanation,
            "rates": {k: round(v, 3) for k, v in self.rates.items()},
        }


def plan_buffer(
    observed: Iterable[Observed], *, free_units: int, lead_time_s: float, kind: str
) -> BufferPlan:
    """Size the buffer of idle units for what was observed (pure apart from the LP solve)."""
    observed = list(observed)
    rates = {o.name: o.rate_per_s for o in observed}
    busy = sum(o.busy for o in observed if o.up)
    at_zero = sum(o.rate_per_s for o in observed if not o.up)
    if free_units <= 0:
        return BufferPlan(0, "no unit free to hold: every unit runs a replica", rates)
    if busy == 0 and at_zero == 0:
        return BufferPlan(0, "no demand in the last minute: hold nothing", rates)
    if lead_time_s <= WAIT_BUDGET_S:  # the LP would tie holding with ordering: nothing to buy
        return BufferPlan(
            0, f"a {kind} unit comes in {lead_time_s:.1f} s, within the wait budget: hold nothing", rates
        )
    try:
        from coldstart.pool.catalog import InstanceType
        from coldstart.pool.sizing import Forecast, SizingInput, explain_plan, size_buffer
    except ImportError as exc:  # the pool extra (OR-Tools) is not installed
        return BufferPlan(0, f"sizing LP unavailable ({exc}); install coldstart[pool]", rates)
    from coldstart.pool.errors import InfeasibleSizingError

    horizon = 2 * max(lead_time_s, 1.0)
    needs = [1 - math.exp(-o.rate_per_s * horizon) for o in observed if not o.up]
    mean = sum(needs)
    std = math.sqrt(busy + sum(p * (1 - p) for p in needs))
    unit = InstanceType(f"{kind}-unit", price_per_hour=1.0, lead_time_s=lead_time_s, supply_cap=free_units)
    forecast = Forecast(mean=mean, std=std, horizon_s=horizon)
    inp = SizingInput(forecast, [unit], confidence=CONFIDENCE, wait_budget_s=WAIT_BUDGET_S)
    try:
        plan = size_buffer(inp, explain=False)  # re-solved every few seconds: the gateway logs changes only
    except InfeasibleSizingError:
        lead = f"unit lead time {lead_time_s:.1f} s"
        why = f"demand may outgrow the {free_units} free unit(s) ({lead}): hold them all"
        return BufferPlan(free_units, why, rates)
    target = min(plan.hold_total, free_units)
    lines = explain_plan(plan, inp)
    why = lines[0] if lines else "the LP holds nothing"
    summary = (
        f"hold {target} idle {kind} unit(s) for {busy} request(s) in flight and {at_zero:.2f}/s arriving "
        f"at zero (unit lead time {lead_time_s:.1f} s): {why}"
    )
    return BufferPlan(target, summary, rates)
