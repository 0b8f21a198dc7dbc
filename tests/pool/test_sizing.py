"""LP decisions on cases small enough to check by hand."""

from __future__ import annotations

import math

import pytest

from coldstart.pool.catalog import InstanceType, load_types, random_types
from coldstart.pool.errors import ConfigError, InfeasibleSizingError
from coldstart.pool.sizing import Forecast, SizingInput, size_buffer

# Horizon 1800 s; demand grows by 10 replicas, no uncertainty: q(t) = 10 t / 1800.
SPIKE = Forecast(mean=10.0, std=0.0, horizon_s=1800.0)
# Held for the horizon a slow unit costs $1.00; a fast one ordered now (lead 60 s): 6 * 1740/3600 = $2.90.
SLOW = InstanceType("slow-cheap", price_per_hour=2.0, lead_time_s=3000.0, supply_cap=100)
FAST = InstanceType("fast-dear", price_per_hour=6.0, lead_time_s=60.0, supply_cap=100)


def test_cheaper_slow_provider_is_held_when_it_beats_dear_fast_orders() -> None:
    plan = size_buffer(SizingInput(SPIKE, [SLOW, FAST]))
    assert (plan.hold_of("slow-cheap"), plan.order_of("fast-dear")) == (10, 0)
    assert plan.cost == pytest.approx(10.0)


def test_dear_fast_provider_is_ordered_when_holding_costs_more() -> None:
    pricey_slow = InstanceType("slow-cheap", 7.0, 3000.0, supply_cap=100)  # held: $3.50 > $2.90 ordered
    plan = size_buffer(SizingInput(SPIKE, [pricey_slow, FAST]))
    # Until the fast order lands (55 s = lead 60 - wait budget 5) the buffer must hold q(55) = 0.31 units;
    # the cheapest unit to hold is now a fast one ($3.00 < $3.50), so: hold 0.31 fast, order 9.69 fast,
    # rounded to hold 1 + order 9 (fractional values first) -- no slow unit at all.
    assert plan.hold_of("slow-cheap") == 0
    assert (plan.hold_of("fast-dear"), plan.order_of("fast-dear")) == (1, 9)
    assert plan.binding_cover[0][0] == pytest.approx(55.0)


def test_binding_supply_cap_spills_to_the_next_type_and_is_explained() -> None:
    capped = InstanceType("slow-cheap", 2.0, 3000.0, supply_cap=4)
    plan = size_buffer(SizingInput(SPIKE, [capped, FAST]))
    assert (plan.hold_of("slow-cheap"), plan.order_of("fast-dear")) == (4, 6)
    slow = next(d for d in plan.decisions if d.type_name == "slow-cheap")
    assert slow.cap_binding and slow.cap_shadow == pytest.approx(2.90 - 1.00)
    assert any("supply cap 4 binds" in line for line in plan.lines)
    assert any(line.startswith("binding: cover +10.0 replicas until 1800s") for line in plan.lines)


def test_failure_rate_buys_more_units() -> None:
    flaky = InstanceType("flaky", 2.0, 3000.0, supply_cap=100, failure_rate=0.2)
    plan = size_buffer(SizingInput(SPIKE, [flaky]))
    assert plan.hold_of("flaky") == 13  # 10 / 0.8 = 12.5 -> 13


def test_confidence_adds_z_sigma() -> None:
    plan = size_buffer(SizingInput(Forecast(0.0, 4.0, 1800.0), [SLOW], confidence=0.975))
    assert plan.hold_of("slow-cheap") == 8  # 1.96 * 4 = 7.84 -> 8


def test_infeasible_when_supply_cannot_cover() -> None:
    tiny = InstanceType("tiny", 2.0, 100.0, supply_cap=3)
    with pytest.raises(InfeasibleSizingError, match="at most 3.0 healthy units"):
        size_buffer(SizingInput(SPIKE, [tiny]))


def test_bad_inputs_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        SizingInput(SPIKE, [SLOW], confidence=1.5)
    with pytest.raises(ConfigError):
        InstanceType("x", -1.0, 10.0)


def test_thousand_types_give_an_integral_plan_that_covers_every_interval() -> None:
    types = random_types(1000, seed=1)
    inp = SizingInput(Forecast(50.0, 10.0, 1800.0), types)
    plan = size_buffer(inp, explain=False)
    by_name = {t.name: t for t in types}
    held = sum(d.hold * (1 - by_name[d.type_name].failure_rate) for d in plan.decisions)
    for end, need in plan.needs:
        arrived = sum(
            d.order * (1 - by_name[d.type_name].failure_rate)
            for d in plan.decisions
            if by_name[d.type_name].lead_time_s - inp.wait_budget_s < end
        )
        assert held + arrived >= need - 1e-6
    for d in plan.decisions:
        assert d.hold + d.order <= by_name[d.type_name].supply_cap
    assert plan.cost >= plan.cost_lp - 1e-6


def test_instance_types_from_toml(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "types.toml"
    path.write_text('[[type]]\nname = "a"\nprice_per_hour = 2.0\nlead_time_s = 60\nsupply_cap = 3\n')
    assert load_types(path) == [InstanceType("a", 2.0, 60.0, supply_cap=3)]
    path.write_text('[[type]]\nname = "a"\nprice = 2.0\n')
    with pytest.raises(ConfigError, match="bad instance type"):
        load_types(path)


def test_a_spike_enters_the_quantile_only_where_one_is_likely_enough() -> None:
    # spikes of 10 replicas at 5% per 600 s: within 60 s the chance (0.5%) is under 1 - 99%, within 600 s not
    fc = Forecast(0.0, 0.0, 600.0, spike_rate_per_s=0.05 / 600.0, spike_size=10.0)
    assert fc.quantile(60.0, 0.99) == pytest.approx(0.0, abs=1e-6)
    assert fc.quantile(600.0, 0.99) == pytest.approx(10.0, abs=1e-6)
    assert fc.exceed_prob(600.0, 5.0) == pytest.approx(1.0 - math.exp(-0.05))
    # without spikes the quantile is the normal one: mean + z * std
    assert Forecast(2.0, 1.0, 600.0).quantile(600.0, 0.975) == pytest.approx(2.0 + 1.96, abs=1e-3)


def test_buffer_holds_until_a_fast_order_lands_and_orders_for_the_spike() -> None:
    # The spike (10 replicas, 5% over the horizon) is unlikely before the fast order lands (55 s): hold
    # nothing for it; covering it after 55 s with fast orders costs $6 * 1740/3600 * 5% = $0.15 per replica
    # in expectation, holding a slow unit $1.00: the LP orders fast, contingently.
    fc = Forecast(0.0, 0.0, 1800.0, spike_rate_per_s=0.05 / 1800.0, spike_size=10.0)
    plan = size_buffer(SizingInput(fc, [SLOW, FAST]))
    assert plan.hold_total == 0 and plan.order_of("fast-dear") == 10
    assert plan.order_prob["fast-dear"] == pytest.approx(1.0 - math.exp(-0.05))
    assert any("if demand outgrows the buffer, p=4.9%" in line for line in plan.lines)


def test_dry_buffer_orders_the_fast_type_then_spills_past_its_cap() -> None:
    # 10 replicas missing now: only orders can help; the fast type lands first (55 s), so the LP takes it,
    # and what its cap of 6 cannot give comes from the slow one.
    now = Forecast(0.0, 0.0, 6000.0, now=10.0)
    plan = size_buffer(SizingInput(now, [SLOW, FAST], can_hold=False))
    assert (plan.order_of("fast-dear"), plan.order_of("slow-cheap"), plan.hold_total) == (10, 0, 0)
    capped = InstanceType("fast-dear", 6.0, 60.0, supply_cap=6)
    plan = size_buffer(SizingInput(now, [SLOW, capped], can_hold=False))
    assert (plan.order_of("fast-dear"), plan.order_of("slow-cheap")) == (6, 4)
    assert plan.lines[0].startswith("buffer dry, 10 replicas missing: order 10 now")
    gone = InstanceType("fast-dear", 6.0, 60.0, supply_cap=0)
    with pytest.raises(InfeasibleSizingError, match="buffer is dry"):
        size_buffer(SizingInput(now, [gone], can_hold=False))
