"""Benchmark of coldstart.pool: the policies side by side on a seed-like week, and the LP's solve time.

    .venv/bin/python bench/pool.py [--quick] [--seeds N]

Table 1: every policy on the seed-like week (daily cycle with a night trough, weekend dip, growth, spikes;
see pool/trace.py), an LLM engine serving 8 requests per GPU, keep-warm 60 s. Both utilizations are
computed from each run's event log: GPU allocation utilization (the issue's definition: GPU-s with a
replica up / GPU-s paid) and busy utilization (GPU-s with a request in service / GPU-s paid).
Table 2: the buffer policy (LP buffer, 600 s refill + 90 s burst, 2 s restore) as one setting changes at a
time, each against fixed peak on the same trace.
Table 3: buffer-sizing LP build + GLOP solve time against the number of instance types (goal < 100 ms at
1,000, since it runs in the control loop).
Table 4 (with --seeds N): fixed peak and the headline buffer policy on N draws of the seed-like week.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import numpy as np

from coldstart.pool.catalog import random_types  # noqa: E402
from coldstart.pool.report import compare, format_table  # noqa: E402
from coldstart.pool.simulate import (  # noqa: E402
    BURST,
    REFILL,
    BufferRestore,
    FixedPeak,
    Policy,
    PolicyResult,
    Reactive,
    ServiceModel,
    run_policy,
)
from coldstart.pool.sizing import Forecast, SizingInput, size_buffer  # noqa: E402
from coldstart.pool.trace import DAY_S, DemandShape, Trace, generate_trace  # noqa: E402

SEED_LIKE = DemandShape()
HEADLINE = ServiceModel()  # 8 requests per GPU, keep-warm 60 s, $3/GPU-h, SLO 5 s


def describe(trace: Trace, svc: ServiceModel) -> str:
    grid = np.arange(0.0, trace.duration_s, 60.0)
    mean = float(trace.occupancy(grid).mean()) / svc.concurrency
    peak = trace.peak_occupancy() / svc.concurrency
    return (
        f"{len(trace):,} requests over {trace.duration_s / DAY_S:g} days; demand (GPUs busy if every request "
        f"started on arrival) mean {mean:.1f}, peak {peak:.0f} (peak/mean {peak / mean:.1f}x); "
        f"{svc.concurrency} requests per GPU, keep-warm {svc.keep_warm_s:g}s, ${svc.price_per_hour}/GPU-h"
    )


def policies_table(trace: Trace) -> list[PolicyResult]:
    policies: list[Policy] = [
        FixedPeak(), Reactive(2000.0), Reactive(300.0), Reactive(50.0),
        BufferRestore(restore_s=2.0), BufferRestore(restore_s=5.0),
        BufferRestore(restore_s=2.0, types=(REFILL,)),
    ]  # fmt: skip
    t0 = time.perf_counter()
    results = compare(trace, policies, HEADLINE, seed=0)
    print(f"\n### 1. Seed-like trace, all policies (simulated in {time.perf_counter() - t0:.0f}s)\n")
    print(describe(trace, HEADLINE) + "\n")
    print(format_table(results, HEADLINE.slo_s))
    return results


def sensitivity(days: float, base_trace: Trace, table1: list[PolicyResult]) -> None:
    """One change at a time from the headline; each row's cost is against fixed peak on its own trace."""
    fixed_cost: dict[tuple[object, ...], float] = {(SEED_LIKE, HEADLINE.concurrency): table1[0].cost}
    headline_result = table1[4]

    def row(label: str, shape: DemandShape, svc: ServiceModel, policy: BufferRestore) -> str:
        trace = base_trace if shape == SEED_LIKE else generate_trace(shape, days * DAY_S, seed=0)
        key = (shape, svc.concurrency)
        if key not in fixed_cost:
            fixed_cost[key] = run_policy(trace, FixedPeak(), svc).cost
        same = shape == SEED_LIKE and svc == HEADLINE and policy == BufferRestore(restore_s=2.0)
        r = headline_result if same else run_policy(trace, policy, svc)
        burst = r.burst_gpu_s / max(r.paid_gpu_s, 1e-9)
        return (
            f"| {label} | {r.utilization:.1%} | {r.busy_utilization:.1%} | {r.p99_wait_s:.1f} | "
            f"{r.over_slo:.2%} | {burst:.0%} | {r.cost / fixed_cost[key]:.2f}x |"
        )

    headline = BufferRestore(restore_s=2.0)
    fast = dataclasses.replace(BURST, lead_time_s=30.0)
    slow = dataclasses.replace(BURST, lead_time_s=180.0)
    calm = dataclasses.replace(SEED_LIKE, spikes_per_day=0.0)
    per_gpu_1 = dataclasses.replace(SEED_LIKE, mean_rate_per_min=SEED_LIKE.mean_rate_per_min / 8)
    per_gpu_4 = dataclasses.replace(SEED_LIKE, mean_rate_per_min=SEED_LIKE.mean_rate_per_min / 2)
    cases: list[tuple[str, DemandShape, ServiceModel, BufferRestore]] = [
        ("headline: 8 req/GPU, keep-warm 60s, burst 90s, 99%", SEED_LIKE, HEADLINE, headline),
        ("1 request per GPU (same GPU demand)", per_gpu_1, ServiceModel(concurrency=1), headline),
        ("4 requests per GPU (same GPU demand)", per_gpu_4, ServiceModel(concurrency=4), headline),
        ("keep-warm 300s (the launcher's default)", SEED_LIKE, ServiceModel(keep_warm_s=300.0), headline),
        ("burst lands in 30s", SEED_LIKE, HEADLINE, dataclasses.replace(headline, types=(REFILL, fast))),
        ("burst lands in 180s", SEED_LIKE, HEADLINE, dataclasses.replace(headline, types=(REFILL, slow))),
        ("confidence 99.9%", SEED_LIKE, HEADLINE, dataclasses.replace(headline, confidence=0.999)),
        ("no spikes in the trace (nor in the prior)", calm, HEADLINE,
         dataclasses.replace(headline, spikes_per_day=0.0)),
    ]  # fmt: skip
    t0 = time.perf_counter()
    lines = [row(*case) for case in cases]
    print(
        f"\n### 2. LP buffer + burst, restore 2s: one setting changed at a time "
        f"(simulated in {time.perf_counter() - t0:.0f}s)\n"
    )
    slo = f"over {HEADLINE.slo_s:g}s SLO"
    print(
        f"| setting | GPU alloc. utilization | busy utilization | p99 wait s | {slo} | burst share of GPU-h "
        "| cost vs fixed peak |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(lines))


def seed_spread(days: float, seeds: int) -> None:
    """The headline buffer policy and fixed peak on the seed-like week drawn with other seeds."""
    print(f"\n### 4. Other draws of the seed-like week (seeds 0..{seeds - 1})\n")
    print(
        "| seed | fixed peak alloc. util. | buffer alloc. util. | buffer busy util. | buffer p99 wait s | "
        f"over {HEADLINE.slo_s:g}s SLO | cost vs fixed peak |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for seed in range(seeds):
        trace = generate_trace(SEED_LIKE, days * DAY_S, seed=seed)
        fixed = run_policy(trace, FixedPeak(), HEADLINE, seed=seed)
        r = run_policy(trace, BufferRestore(restore_s=2.0), HEADLINE, seed=seed)
        print(
            f"| {seed} | {fixed.utilization:.1%} | {r.utilization:.1%} | {r.busy_utilization:.1%} | "
            f"{r.p99_wait_s:.1f} | {r.over_slo:.2%} | {r.cost / fixed.cost:.2f}x |"
        )


def lp_times(sizes: list[int], repeats: int) -> None:
    print(f"\n### 3. Buffer-sizing LP (GLOP), median of {repeats} runs\n")
    print("| instance types | build ms | solve ms | build+solve ms | vs 10 types | held | ordered |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    base = None
    for n in sizes:
        types = random_types(n, seed=1)
        inp = SizingInput(Forecast(50.0, 10.0, 1800.0), types, confidence=0.99)
        builds, solves, totals = [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            plan = size_buffer(inp, explain=False)
            totals.append((time.perf_counter() - t0) * 1e3)
            builds.append(plan.build_ms)
            solves.append(plan.solve_ms)
        total = statistics.median(totals)
        base = base or total
        print(
            f"| {n:,} | {statistics.median(builds):.1f} | {statistics.median(solves):.1f} | {total:.1f} | "
            f"{total / base:.1f}x | {plan.hold_total} | {plan.order_total} |"
        )


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one day instead of a week, fewer LP repeats")
    ap.add_argument("--seeds", type=int, default=1, help="also run the headline on this many trace seeds")
    args = ap.parse_args(argv)
    days = 1.0 if args.quick else 7.0
    print("## coldstart pool benchmark (bench/pool.py)")
    print(
        "LP buffer rows: buffer sized each minute by the LP against a forecast of the next 600 s (robust\n"
        "random walk from the last 4 h + a spike prior of 4/day, 1x the hour's median demand) at 99%;\n"
        "refill from a $3.00/h cloud (600 s to a health-checked GPU), burst from a $4.50/h provider (90 s,\n"
        "at most 64 GPUs) when the GPUs on hand cannot cover until a burst order lands or the buffer is dry."
    )
    t0 = time.perf_counter()
    trace = generate_trace(SEED_LIKE, days * DAY_S, seed=0)
    print(f"(trace generated in {time.perf_counter() - t0:.1f}s)")
    sensitivity(days, trace, policies_table(trace))
    lp_times([10, 100, 1000], 3 if args.quick else 7)
    if args.seeds > 1:
        seed_spread(days, args.seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
