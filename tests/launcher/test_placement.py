"""The pure parts of the gateway, without processes: the autoscaler, the router's pick, placement's
eviction and fair-share choices, and the LP buffer plan."""

from __future__ import annotations

from coldstart.launcher.autoscaler import (
    Demand,
    IdleReplica,
    ScalingPolicy,
    desired_replicas,
    replicas_to_stop,
)
from coldstart.launcher.buffer_plan import Observed, plan_buffer
from coldstart.launcher.placement import Holder, choose_victim, over_share
from coldstart.launcher.replica import Replica, ReplicaState
from coldstart.launcher.router import pick


def holder(rid: str, model: str, **kw: object) -> Holder:
    base: dict[str, object] = {
        "priority": 0,
        "weight": 1.0,
        "in_flight": 0,
        "ready": True,
        "last_used": 0.0,
        "placed_at": 0.0,
    }
    base.update(kw)
    return Holder(replica_id=rid, deployment=model, **base)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- autoscaler
def test_desired_replicas_follows_demand_within_bounds() -> None:
    policy = ScalingPolicy(min_replicas=0, max_replicas=3, target_concurrency=4)
    assert desired_replicas(Demand(0, 0), policy) == 0
    assert desired_replicas(Demand(0, 1), policy) == 1
    assert desired_replicas(Demand(4, 0), policy) == 1
    assert desired_replicas(Demand(4, 0, arriving=1), policy) == 2
    assert desired_replicas(Demand(100, 50), policy) == 3
    assert desired_replicas(Demand(0, 0), ScalingPolicy(min_replicas=2, max_replicas=3)) == 2


def test_idle_replicas_stop_least_recently_used_first_down_to_min_and_never_while_requests_wait() -> None:
    policy = ScalingPolicy(min_replicas=1, max_replicas=3, idle_timeout=10)
    ready = [IdleReplica("r1", 0, 5.0), IdleReplica("r2", 0, 1.0), IdleReplica("r3", 1, 0.0)]
    assert replicas_to_stop(ready, active=3, waiting=0, policy=policy, now=20.0) == ["r2", "r1"][:2]
    assert replicas_to_stop(ready, active=3, waiting=0, policy=policy, now=12.0) == ["r2"]
    assert replicas_to_stop(ready, active=3, waiting=1, policy=policy, now=100.0) == []
    assert replicas_to_stop(ready, active=1, waiting=0, policy=policy, now=100.0) == []
    never = ScalingPolicy(idle_timeout=0)
    assert replicas_to_stop(ready, active=3, waiting=0, policy=never, now=100.0) == []


# ---------------------------------------------------------------------------- router
def _replica(rid: str, state: ReplicaState, in_flight: int = 0) -> Replica:
    replica = Replica(rid)
    replica.state = state
    replica.in_flight = in_flight
    return replica


def test_pick_takes_the_least_busy_and_waits_for_a_starting_one_at_target() -> None:
    policy = ScalingPolicy(target_concurrency=2)
    busy, free = _replica("r1", ReplicaState.READY, 2), _replica("r2", ReplicaState.READY, 1)
    assert pick([busy, free], policy) is free
    full = [_replica("r1", ReplicaState.READY, 2), _replica("r2", ReplicaState.RESTORING)]
    assert pick(full, policy) is None  # wait for r2 rather than queue in a busy engine
    alone = [_replica("r1", ReplicaState.READY, 5)]
    assert pick(alone, policy) is alone[0]  # nothing coming: the engine queues it
    assert pick(alone, policy, overcommit=False) is None  # shared units: it waits in the router
    assert pick([_replica("r1", ReplicaState.DRAINING)], policy) is None
    a, b = _replica("r1", ReplicaState.READY), _replica("r2", ReplicaState.READY, 1)
    assert pick([a, b], policy, avoid=a) is b


# ---------------------------------------------------------------------------- placement
def test_victim_is_idle_serving_past_residency_lowest_priority_then_lru_never_the_asker() -> None:
    holders = [
        holder("r1", "a", priority=1, last_used=1.0),
        holder("r2", "b", priority=0, last_used=5.0),
        holder("r3", "c", priority=0, last_used=2.0),
        holder("r4", "d", in_flight=1, priority=-5),  # busy: never evicted
        holder("r5", "e", ready=False, priority=-5),  # starting: never evicted
        holder("r6", "f", priority=-9, placed_at=9.5),  # within its residency
    ]
    assert choose_victim(holders, wanted_by="x", now=10.0, min_residency=1.0).replica_id == "r3"  # type: ignore[union-attr]
    assert choose_victim(holders, wanted_by="c", now=10.0, min_residency=1.0).replica_id == "r2"  # type: ignore[union-attr]
    assert choose_victim([holder("r1", "x")], wanted_by="x", now=10.0, min_residency=0) is None
    assert choose_victim(holders[3:5], wanted_by="x", now=10.0, min_residency=0) is None


def test_over_share_on_one_unit_takes_turns_weighted_by_residency() -> None:
    weights = {"a": 2.0, "b": 1.0}
    a_holds = [holder("r1", "a", in_flight=3, placed_at=0.0)]
    # a (weight 2) keeps the unit twice the residency before yielding to b
    assert over_share(a_holds, wanted_by="b", weights=weights, now=1.5, min_residency=1.0) is None
    assert over_share(a_holds, wanted_by="b", weights=weights, now=2.0, min_residency=1.0) is not None
    b_holds = [holder("r2", "b", in_flight=3, placed_at=0.0)]
    assert over_share(b_holds, wanted_by="a", weights=weights, now=0.5, min_residency=1.0) is not None


def test_over_share_settles_at_the_weights_on_several_units() -> None:
    weights = {"a": 1.0, "b": 1.0}
    two_a = [holder("r1", "a", in_flight=1), holder("r2", "a", in_flight=1)]
    assert over_share(two_a, wanted_by="b", weights=weights, now=10, min_residency=0) is not None
    even = [holder("r1", "a", in_flight=1), holder("r2", "b", in_flight=1)]
    assert over_share(even, wanted_by="a", weights=weights, now=10, min_residency=0) is None
    assert over_share(even, wanted_by="b", weights=weights, now=10, min_residency=0) is None


# ---------------------------------------------------------------------------- the LP buffer plan
def test_buffer_plan_holds_nothing_without_demand_and_follows_arrivals_at_zero() -> None:
    quiet = plan_buffer([Observed("a", 0.0, 0, False)], free_units=4, lead_time_s=30.0, kind="gpu")
    assert quiet.target == 0 and "no demand" in quiet.explanation
    seen = [Observed("a", 2.0, 0, False), Observed("b", 1.0, 6, True)]
    busy = plan_buffer(seen, free_units=10, lead_time_s=30.0, kind="gpu")
    assert 1 <= busy.target <= 10, busy
    assert "arriving at zero" in busy.explanation and busy.rates == {"a": 2.0, "b": 1.0}
    more = plan_buffer(
        [Observed("a", 2.0, 0, False), Observed("b", 1.0, 30, True)],
        free_units=10,
        lead_time_s=30.0,
        kind="gpu",
    )
    assert more.target > busy.target  # more in flight: more to cover
    short = plan_buffer(seen, free_units=2, lead_time_s=30.0, kind="gpu")
    assert short.target == 2 and "hold them all" in short.explanation
    instant = plan_buffer([Observed("a", 2.0, 0, False)], free_units=4, lead_time_s=0.0, kind="cpu")
    assert instant.target == 0  # a unit that comes in no time needs no buffer
    full = plan_buffer([Observed("a", 2.0, 4, True)], free_units=0, lead_time_s=30.0, kind="gpu")
    assert full.target == 0 and "no unit free" in full.explanation
