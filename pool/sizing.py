"""Buffer sizing as a linear program solved with OR-Tools GLOP.

Question: how many idle units to hold, and of which instance types, and what to order as a spike unfolds,
so that the forecast demand increase over the horizon is covered at the configured confidence, at the
least expected cost.

Model (all quantities in units = replicas):

- forecast: the demand increase over the next ``H`` seconds is a random walk with drift (mean ``m``,
  std ``s`` over ``H``) plus spikes: jumps of ``J`` replicas arriving as a Poisson process of rate
  ``lam`` (and ``now`` replicas already missing at t=0, when the buffer has run dry). ``q(t)`` is the
  ``confidence`` quantile of ``now + m*t/H + s*sqrt(t/H)*Z + J*Poisson(lam*t)``; without spikes it is
  ``now + m*t/H + z*s*sqrt(t/H)`` (``z`` = normal quantile of the confidence). Spikes therefore enter the
  buffer only over horizons where one is likely enough (``lam*t`` above ``1 - confidence``): a buffer
  backed by a fast provider holds for the short wait until a fast order lands, not for a whole spike.
- each type ``i``: price ``p_i`` per hour, lead time ``L_i``, supply cap ``cap_i``, boot failure rate
  ``f_i`` (a unit is healthy with probability ``h_i = 1 - f_i``).
- ``x_i`` = units of type ``i`` held idle in the buffer now (paid for the whole horizon);
  ``y_i`` = units of type ``i`` ordered now, which arrive at ``L_i`` (paid from arrival to ``H``).
- a request may wait ``W`` seconds (the wait budget), so an order of type ``i`` covers demand from
  ``a_i = max(0, L_i - W)``. Cut the horizon at every distinct ``a_i``: on ``[a_k, a_{k+1})`` the held
  units plus the orders already arrived must cover the demand reached by the end of that interval:

      sum_i h_i x_i + sum_{i: a_i <= a_k} h_i y_i >= q(a_{k+1})        (cover_k; dual = $ per replica)
      x_i + y_i <= cap_i                                              (cap_i)
      minimize  sum_i p_i (H x_i + pi_i (H - L_i) y_i) / 3600

  ``y_i`` are contingent: placed only if demand outgrows what was covered before they could arrive, so
  their expected cost carries ``pi_i = P(increase by H > q(a_i))`` (1 for a deterministic forecast).
- buffer dry (``can_hold=False``): nothing can be held, ``now`` replicas are already missing and every
  order is certain (``pi_i = 1``). Rows before the first order can land are dropped, and each row asks
  only for what the supply arrived by then can give, so the LP picks the cheapest of the types that land
  soonest (a dear fast provider when the cheap one is slow), spilling to slower ones past supply caps.

  Written naively the cover rows have O(n*K) non-zeros; with the running sums ``X = sum h x`` and
  ``C_k = C_{k-1} + sum_{bucket k} h y`` they have O(n + K), which keeps 1,000 types in the control loop.

The LP answer is fractional; ``_round_up`` makes it integral (floor, then add the cheapest units per healthy
unit, fractional ones first, until every cover row holds). Each decision is explained in one log line
that names the binding constraints (a cover row with a positive dual, a supply cap with a negative one).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

from coldstart.pool.catalog import InstanceType
from coldstart.pool.errors import ConfigError, InfeasibleSizingError, SolverError

log = logging.getLogger("coldstart.pool.sizing")

_EPS = 1e-7


@dataclass(frozen=True)
class Forecast:
    mean: float  # expected increase of replicas needed over the horizon (spikes aside)
    std: float  # its standard deviation (spikes aside)
    horizon_s: float
    spike_rate_per_s: float = 0.0  # spikes: Poisson rate ...
    spike_size: float = 0.0  # ... and replicas each one adds
    now: float = 0.0  # replicas already missing at t=0 (the buffer ran dry)

    def _parts(self, t: float) -> tuple[float, float, float]:
        frac = min(max(t / self.horizon_s, 0.0), 1.0) if self.horizon_s > 0 else 1.0
        return self.now + self.mean * frac, self.std * math.sqrt(frac), self.spike_rate_per_s * t

    def _jumps(self, lam_t: float) -> list[tuple[int, float]]:
        """(k, P(k spikes)) up to a tail below 1e-9."""
        if self.spike_size <= 0 or lam_t <= 0:
            return [(0, 1.0)]
        out, k, p = [], 0, math.exp(-lam_t)
        while True:
            out.append((k, p))
            if k > lam_t and p < 1e-9:
                return out
            k += 1
            p *= lam_t / k

    def cdf(self, t: float, x: float) -> float:
        """P(increase by ``t`` <= x)."""
        mu, sd, lam_t = self._parts(t)
        total = 0.0
        for k, pk in self._jumps(lam_t):
            d = x - mu - k * self.spike_size
            total += pk * (_PHI(d / sd) if sd > 0 else float(d >= 0))
        return total

    def quantile(self, t: float, confidence: float) -> float:
        mu, sd, lam_t = self._parts(t)
        base = mu + NormalDist().inv_cdf(confidence) * sd
        jumps = self._jumps(lam_t)
        if len(jumps) == 1:
            return max(0.0, base)
        lo, hi = base, base + self.spike_size * jumps[-1][0]
        for _ in range(60):  # bisection on the mixture's CDF; 60 halvings reach float precision
            mid = (lo + hi) / 2
            if self.cdf(t, mid) >= confidence:
                hi = mid
            else:
                lo = mid
        return max(0.0, hi)

    def exceed_prob(self, t: float, x: float) -> float:
        return 1.0 - self.cdf(t, x)


_PHI = NormalDist().cdf


@dataclass(frozen=True)
class SizingInput:
    forecast: Forecast
    types: list[InstanceType]
    confidence: float = 0.99
    wait_budget_s: float = 5.0
    can_hold: bool = True  # False: the buffer is dry, only orders can cover (see the module docstring)

    def __post_init__(self) -> None:
        if not 0.5 <= self.confidence < 1.0:
            raise ConfigError(f"confidence must be in [0.5, 1), got {self.confidence}")
        if self.forecast.horizon_s <= 0 or self.forecast.std < 0:
            raise ConfigError("forecast horizon must be > 0 and its std >= 0")
        if not self.types:
            raise ConfigError("sizing needs at least one instance type")


@dataclass(frozen=True)
class Decision:
    type_name: str
    hold: int
    order: int
    hold_lp: float
    order_lp: float
    cap_binding: bool
    cap_shadow: float  # dollars saved over the horizon per extra unit of supply cap


@dataclass
class SizingPlan:
    decisions: list[Decision]
    needs: list[tuple[float, float]]  # (interval end s, replicas to cover by then)
    binding_cover: list[tuple[float, float, float]]  # (t, need, dual $/replica)
    cost: float  # expected dollars over the horizon, integral plan (contingent orders times their pi)
    cost_lp: float
    z: float
    build_ms: float
    solve_ms: float
    lines: list[str] = field(default_factory=list)
    order_prob: dict[str, float] = field(default_factory=dict)  # pi of each type's contingent orders

    @property
    def hold_total(self) -> int:
        return sum(d.hold for d in self.decisions)

    @property
    def order_total(self) -> int:
        return sum(d.order for d in self.decisions)

    def hold_of(self, type_name: str) -> int:
        return sum(d.hold for d in self.decisions if d.type_name == type_name)

    def order_of(self, type_name: str) -> int:
        return sum(d.order for d in self.decisions if d.type_name == type_name)


def _solver() -> Any:
    from ortools.linear_solver import pywraplp

    solver = pywraplp.Solver.CreateSolver("GLOP")
    if solver is None:
        raise SolverError("OR-Tools has no GLOP solver in this build; reinstall ortools")
    return pywraplp, solver


def size_buffer(inp: SizingInput, *, explain: bool = True) -> SizingPlan:
    t0 = time.perf_counter()
    fc, types, W = inp.forecast, inp.types, inp.wait_budget_s
    H = fc.horizon_s
    z = NormalDist().inv_cdf(inp.confidence)
    health = [1.0 - t.failure_rate for t in types]

    # Interval starts: 0 and every arrival a_i inside the horizon. need_k = q(end of interval k).
    arrival = [max(0.0, t.lead_time_s - W) for t in types]
    conf = inp.confidence
    if inp.can_hold:
        starts = sorted({0.0} | {a for a in arrival if a < H})
        ends = starts[1:] + [H]
        needs = [fc.quantile(e, conf) for e in ends]
        # a contingent order is placed only if demand passes what was covered before it could land
        prob = [fc.exceed_prob(H, fc.quantile(a, conf)) if a < H else 0.0 for a in arrival]
    else:
        # Dry: nothing before the first landing can be covered; each row asks what the supply landed by
        # then can give (a capped fast type covers what it can, slower ones the rest).
        landing = sorted({a for i, a in enumerate(arrival) if a < H and types[i].supply_cap > 0})
        if not landing:
            raise InfeasibleSizingError(
                f"the buffer is dry and none of the {len(types)} instance types can deliver within "
                f"{H:.0f}s; add supply"
            )
        starts = landing
        ends = starts[1:] + [H]
        needs = []
        for a, e in zip(starts, ends, strict=True):
            landed = sum(health[i] * t.supply_cap for i, t in enumerate(types) if arrival[i] <= a)
            needs.append(min(fc.quantile(e, conf), landed))
        prob = [1.0] * len(types)
    bucket_of = {a: k for k, a in enumerate(starts)}

    supply = sum(h * t.supply_cap for h, t in zip(health, types, strict=True))
    if supply + _EPS < needs[-1]:
        raise InfeasibleSizingError(
            f"the {len(types)} instance types can supply at most {supply:.1f} healthy units but covering the "
            f"forecast at {inp.confidence:.1%} needs {needs[-1]:.1f}; add supply or lower the confidence"
        )

    pywraplp, solver = _solver()
    inf = solver.infinity()
    objective = solver.Objective()
    X = solver.NumVar(0.0, inf, "X")
    x_sum = solver.Constraint(0.0, 0.0, "X")
    x_sum.SetCoefficient(X, 1.0)
    C = [solver.NumVar(0.0, inf, f"C{k}") for k in range(len(starts))]
    c_rows = [solver.Constraint(0.0, 0.0, f"C{k}") for k in range(len(starts))]
    for k, row in enumerate(c_rows):
        row.SetCoefficient(C[k], 1.0)
        if k:
            row.SetCoefficient(C[k - 1], -1.0)
    covers = []
    for k, need in enumerate(needs):
        row = solver.Constraint(need, inf, f"cover{k}")
        row.SetCoefficient(X, 1.0)
        row.SetCoefficient(C[k], 1.0)
        covers.append(row)

    xs, ys, caps = [], [], []
    for i, (t, h) in enumerate(zip(types, health, strict=True)):
        x = solver.NumVar(0.0, inf if inp.can_hold else 0.0, "")  # the cap row bounds it (and its dual)
        x_sum.SetCoefficient(x, -h)
        objective.SetCoefficient(x, t.price_per_hour * H / 3600.0)
        cap = solver.Constraint(-inf, float(t.supply_cap), "")
        cap.SetCoefficient(x, 1.0)
        y = None
        if arrival[i] < H and arrival[i] in bucket_of:
            y = solver.NumVar(0.0, inf, "")
            c_rows[bucket_of[arrival[i]]].SetCoefficient(y, -h)
            objective.SetCoefficient(y, prob[i] * t.price_per_hour * max(H - t.lead_time_s, 0.0) / 3600.0)
            cap.SetCoefficient(y, 1.0)
        xs.append(x)
        ys.append(y)
        caps.append(cap)
    objective.SetMinimization()
    t1 = time.perf_counter()
    status = solver.Solve()
    t2 = time.perf_counter()
    if status != pywraplp.Solver.OPTIMAL:
        raise SolverError(f"GLOP returned status {status} (not optimal) for {len(types)} types; check inputs")

    hold_lp = [x.solution_value() for x in xs]
    order_lp = [y.solution_value() if y is not None else 0.0 for y in ys]
    cap_dual = [c.dual_value() for c in caps]
    binding_cover = [
        (ends[k], needs[k], row.dual_value()) for k, row in enumerate(covers) if row.dual_value() > _EPS
    ]
    hold, order = _round_up(types, health, arrival, starts, needs, hold_lp, order_lp, inp.can_hold)

    decisions = [
        Decision(t.name, hold[i], order[i], hold_lp[i], order_lp[i], cap_dual[i] < -_EPS, -cap_dual[i])
        for i, t in enumerate(types)
        if hold[i] or order[i]
    ]
    cost = sum(
        t.price_per_hour * (H * hold[i] + prob[i] * max(H - t.lead_time_s, 0.0) * order[i]) / 3600.0
        for i, t in enumerate(types)
    )
    plan = SizingPlan(
        decisions,
        list(zip(ends, needs, strict=True)),
        binding_cover,
        cost,
        solver.Objective().Value(),
        z,
        (t1 - t0) * 1e3,
        (t2 - t1) * 1e3,
        order_prob={t.name: prob[i] for i, t in enumerate(types) if order[i]},
    )
    if explain:
        plan.lines = explain_plan(plan, inp)
        for line in plan.lines:
            log.info("%s", line)
    return plan


def _round_up(
    types: list[InstanceType],
    health: list[float],
    arrival: list[float],
    starts: list[float],
    needs: list[float],
    hold_lp: list[float],
    order_lp: list[float],
    can_hold: bool = True,
) -> tuple[list[int], list[int]]:
    """Integral plan: floor the LP, then add units (fractional ones first, cheapest per healthy unit next)
    until every cover row holds again. Linear in the number of types (it runs in the control loop)."""
    n = len(types)
    hold = [math.floor(v + 1e-6) for v in hold_lp]
    order = [math.floor(v + 1e-6) for v in order_lp]
    bucket = {a: k for k, a in enumerate(starts)}
    held = sum(h * x for h, x in zip(health, hold, strict=True))
    ordered_in = [0.0] * len(starts)
    for i in range(n):
        if order[i]:
            ordered_in[bucket[arrival[i]]] += health[i] * order[i]

    # (not fractional, cost per healthy unit, kind, i): fractional LP values first, then the cheapest;
    # an order is preferred to a hold of the same type because it is paid for a shorter time.
    cands = []
    for i, t in enumerate(types):
        price = t.price_per_hour / health[i]
        if can_hold:
            cands.append((hold_lp[i] - math.floor(hold_lp[i] + 1e-6) <= 1e-6, price, 1, i))
        if order_lp[i] > 1e-6 or (not can_hold and arrival[i] in bucket):
            cands.append((order_lp[i] - math.floor(order_lp[i] + 1e-6) <= 1e-6, price, 0, i))
    cands.sort()
    cum = 0.0
    for k, need in enumerate(needs):
        cum += ordered_in[k]
        while held + cum + 1e-6 < need:
            for _, _, is_hold, i in cands:
                if hold[i] + order[i] >= types[i].supply_cap:
                    continue
                if is_hold:
                    hold[i] += 1
                    held += health[i]
                    break
                if arrival[i] in bucket and bucket[arrival[i]] <= k:
                    order[i] += 1
                    cum += health[i]
                    break
            else:  # cannot happen: feasibility was checked, and holding covers every row
                raise SolverError("rounding the LP plan to whole units failed; report this as a bug")
    return hold, order


def explain_plan(plan: SizingPlan, inp: SizingInput) -> list[str]:
    """One line per decision, naming the binding constraints, and one summary line."""
    by_name = {t.name: t for t in inp.types}
    H = inp.forecast.horizon_s
    head = (
        f"buffer: hold {plan.hold_total} idle, order {plan.order_total} as the spike unfolds"
        if inp.can_hold
        else f"buffer dry, {inp.forecast.now:g} replicas missing: order {plan.order_total} now"
    )
    lines = [
        f"{head}; covers +{plan.needs[-1][1]:.1f} replicas by {H:.0f}s at {inp.confidence:.1%} "
        f"(z={plan.z:.2f}); expected ${plan.cost:.2f} over the horizon (LP ${plan.cost_lp:.2f}); "
        f"solved in {plan.solve_ms:.1f} ms"
    ]
    for d in plan.decisions:
        t = by_name[d.type_name]
        per_unit = t.price_per_hour * H / 3600.0 / (1.0 - t.failure_rate)
        what = []
        if d.hold:
            what.append(f"hold {d.hold} (LP {d.hold_lp:.2f})")
        if d.order:
            prob = plan.order_prob.get(d.type_name, 1.0)
            when = "now" if not inp.can_hold else f"if demand outgrows the buffer, p={prob:.1%}"
            what.append(f"order {d.order} (LP {d.order_lp:.2f}, arrives {t.lead_time_s:.0f}s, {when})")
        cap = (
            f"supply cap {t.supply_cap} binds (one more unit saves ${d.cap_shadow:.2f})"
            if d.cap_binding
            else "supply cap not binding"
        )
        lines.append(
            f"{t.name}: {', '.join(what)}; ${t.price_per_hour:.2f}/h, lead {t.lead_time_s:.0f}s, "
            f"fail {t.failure_rate:.1%} -> ${per_unit:.2f} per healthy unit held; {cap}"
        )
    for end, need, dual in plan.binding_cover:
        lines.append(f"binding: cover +{need:.1f} replicas until {end:.0f}s; one more costs ${dual:.2f}")
    return lines
