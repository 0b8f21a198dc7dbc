"""``coldstart pool``: inventory, health, LP sizing and the simulator. Thin: parse, build options, call
the library, map the result to an exit code (0 ok, 1 failure, 2 usage)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from coldstart.pool.errors import PoolError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="coldstart pool", description="GPU buffer pool: inventory, LP sizing, simulator"
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    for name, help_ in (("inventory", "list this host's units"), ("status", "same as inventory")):
        s = sub.add_parser(name, help=help_, description=help_)
        s.add_argument("--provider", default="local", choices=["local", "cpu", "simulated"])
        s.add_argument("--cpu-slots", type=int, default=None)

    s = sub.add_parser("health", help="run the boot health check on every local GPU")
    s.add_argument("--deep", action="store_true", help="the slow-cadence deep check (bigger matmul)")
    s.add_argument("--no-matmul", action="store_true", help="NVML checks only")

    s = sub.add_parser("size", help="size the buffer with the LP and explain each decision")
    s.add_argument(
        "--mean", type=float, required=True, help="expected demand increase (replicas) over the horizon"
    )
    s.add_argument("--std", type=float, required=True, help="its standard deviation")
    s.add_argument("--horizon-s", type=float, default=1800.0)
    s.add_argument("--spikes-per-day", type=float, default=0.0, help="spike prior: how often")
    s.add_argument("--spike-size", type=float, default=0.0, help="spike prior: replicas one adds")
    s.add_argument(
        "--types", type=Path, help="instance types, TOML [[type]] or JSON list (default: a sample)"
    )
    s.add_argument("--confidence", type=float, default=0.99)
    s.add_argument("--wait-budget-s", type=float, default=5.0)
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("simulate", help="replay a request trace through the provisioning policies")
    s.add_argument(
        "--trace", type=Path, help="CSV arrival_s[,service_s]; default: a generated seed-like trace"
    )
    s.add_argument("--save-trace", type=Path)
    s.add_argument("--days", type=float, default=7.0, help="generated trace length (starts on a Monday)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--rate-per-min", type=float, default=160.0, help="mean requests per minute at the start")
    s.add_argument("--daily-amplitude", type=float, default=0.7, help="day/night swing, 0..1")
    s.add_argument("--weekend-factor", type=float, default=0.6, help="weekend load as a share of a weekday")
    s.add_argument("--spikes-per-day", type=float, default=4.0)
    s.add_argument("--spike-height", type=float, default=1.0, help="median spike, multiple of the rate")
    s.add_argument("--growth-per-day", type=float, default=0.10)
    s.add_argument("--service-s", type=float, default=45.0, help="mean seconds a request holds a slot")
    s.add_argument("--concurrency", type=int, default=8, help="requests one replica serves at once")
    s.add_argument("--keep-warm-s", type=float, default=60.0, help="idle seconds before a replica stops")
    s.add_argument("--price", type=float, default=3.0, help="dollars per GPU-hour (fixed, reactive, refill)")
    s.add_argument("--slo-s", type=float, default=5.0)
    s.add_argument("--failure-rate", type=float, default=0.0)
    s.add_argument("--cold-starts", default="2000,300,50", help="reactive policies' cold starts, seconds")
    s.add_argument("--restore-s", type=float, default=2.0)
    s.add_argument(
        "--lead-time-s", type=float, default=600.0, help="buffer refill: allocation + boot + health check"
    )
    s.add_argument("--burst-lead-s", type=float, default=90.0, help="burst provider's lead time; 0: none")
    s.add_argument("--burst-price", type=float, default=4.5, help="burst provider, dollars per GPU-hour")
    s.add_argument("--burst-cap", type=int, default=64, help="most GPUs the burst provider gives at once")
    s.add_argument("--buffer-types", type=Path, help="buffer instance types, TOML/JSON; first = refill")
    s.add_argument("--buffer", type=int, default=None, help="fixed buffer size (default: the LP sizes it)")
    s.add_argument("--confidence", type=float, default=0.99)
    s.add_argument("--plots", type=Path, help="write demand-vs-allocated.png and wait-cdf.png here")
    s.add_argument("--json", action="store_true")
    return p


def _inventory(args: argparse.Namespace) -> int:
    from coldstart.pool.providers import make_provider

    options = {"slots": args.cpu_slots} if args.provider == "cpu" else {}
    provider = make_provider(args.provider, **options)
    try:
        print(f"provider {provider.name} ({provider.kind}), capacity {provider.capacity()}")
        for line in provider.describe():
            print(f"  {line}")
    finally:
        provider.close()
    return 0


def _health(args: argparse.Namespace) -> int:
    from coldstart.pool.health import HealthPolicy
    from coldstart.pool.providers.local import LocalProvider

    provider = LocalProvider(policy=HealthPolicy(matmul=not args.no_matmul))
    try:
        reports = [provider.check(d, deep=args.deep) for d in provider.devices]
    finally:
        provider.close()
    for report in reports:
        print(report.summary())
        for check in report.checks:
            print(f"  {'ok  ' if check.ok else 'FAIL'} {check.name}: {check.detail}")
    return 0 if all(r.ok for r in reports) else 1


def _size(args: argparse.Namespace) -> int:
    from coldstart.pool.catalog import default_types, load_types
    from coldstart.pool.sizing import Forecast, SizingInput, size_buffer

    types = load_types(args.types) if args.types else default_types()
    fc = Forecast(args.mean, args.std, args.horizon_s, args.spikes_per_day / 86400.0, args.spike_size)
    inp = SizingInput(fc, types, args.confidence, args.wait_budget_s)
    plan = size_buffer(inp, explain=False)
    from coldstart.pool.sizing import explain_plan

    lines = explain_plan(plan, inp)
    if args.json:
        print(json.dumps({
            "hold": {d.type_name: d.hold for d in plan.decisions if d.hold},
            "order": {d.type_name: d.order for d in plan.decisions if d.order},
            "cost": plan.cost, "cost_lp": plan.cost_lp, "solve_ms": plan.solve_ms, "explain": lines,
        }, indent=2))  # fmt: skip
    else:
        print("\n".join(lines))
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from coldstart.pool.catalog import InstanceType, load_types
    from coldstart.pool.report import as_json, compare, format_table, plot
    from coldstart.pool.simulate import BufferRestore, FixedPeak, Reactive, ServiceModel
    from coldstart.pool.trace import DAY_S, DemandShape, generate_trace, load_trace, save_trace

    if args.trace:
        trace = load_trace(args.trace, args.service_s, seed=args.seed)
    else:
        shape = DemandShape(
            mean_rate_per_min=args.rate_per_min, daily_amplitude=args.daily_amplitude,
            weekend_factor=args.weekend_factor, spikes_per_day=args.spikes_per_day,
            spike_height=args.spike_height, growth_per_day=args.growth_per_day, service_s=args.service_s,
        )  # fmt: skip
        trace = generate_trace(shape, args.days * DAY_S, args.seed)
    if args.save_trace:
        save_trace(trace, args.save_trace)
    try:
        colds = [float(x) for x in args.cold_starts.split(",") if x.strip()]
    except ValueError:
        msg = f"--cold-starts wants numbers like 2000,300,50, got {args.cold_starts!r}"
        print(f"coldstart pool simulate: {msg}", file=sys.stderr)
        return 2
    if args.buffer_types:
        types = tuple(load_types(args.buffer_types))
    else:
        types = (InstanceType("refill", args.price, args.lead_time_s),)
        if args.burst_lead_s > 0:
            types += (InstanceType("burst", args.burst_price, args.burst_lead_s, supply_cap=args.burst_cap),)
    svc = ServiceModel(args.concurrency, args.keep_warm_s, args.price, args.slo_s, args.failure_rate)
    policies: list[FixedPeak | Reactive | BufferRestore] = [FixedPeak(), *(Reactive(c) for c in colds)]
    policies.append(
        BufferRestore(args.restore_s, types, args.buffer, args.confidence, spikes_per_day=args.spikes_per_day,
                      spike_height=args.spike_height)
    )  # fmt: skip
    results = compare(trace, policies, svc, args.seed)
    if args.json:
        print(json.dumps(as_json(results), indent=2))
    else:
        print(f"trace: {len(trace)} requests over {trace.duration_s / 3600:.1f} h, peak demand "
              f"{trace.peak_occupancy() / args.concurrency:.0f} GPUs, seed {args.seed}")  # fmt: skip
        print(format_table(results, args.slo_s))
    if args.plots:
        for path in plot(trace, results, args.plots, args.concurrency):
            print(f"wrote {path}", file=sys.stderr)
    return 0


COMMANDS = {
    "inventory": _inventory,
    "status": _inventory,
    "health": _health,
    "size": _size,
    "simulate": _simulate,
}


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help -> 0, usage errors -> 2
        return int(exc.code or 0)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        return COMMANDS[args.cmd](args)
    except PoolError as exc:
        print(f"coldstart pool {args.cmd}: {exc}", file=sys.stderr)
        return 1
