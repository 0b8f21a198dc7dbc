"""Benchmark of coldstart.pool: the policies side by side on seed-like traces, and the LP's solve time.

    .venv/bin/python bench/pool.py [--quick]

Table 1-3: GPU allocation utilization, waits, SLO misses and cost per policy (cost as a ratio to fixed peak)
on a one-day seed-like trace (daily cycle, growth, spikes), for one request per GPU, for an engine that
batches 8 requests per GPU at the same GPU demand, and for 10x the traffic.
Table 4: buffer-sizing LP build + GLOP solve time against the number of instance types (goal < 100 ms at
1,000, since it runs in the control loop).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from coldstart.pool.catalog import random_types
from coldstart.pool.report import compare, format_table
from coldstart.pool.simulate import BufferRestore, FixedPeak, Policy, Reactive, ServiceModel
from coldstart.pool.sizing import Forecast, SizingInput, size_buffer
from coldstart.pool.trace import DAY_S, DemandShape, generate_trace


def simulate(title: str, shape: DemandShape, svc: ServiceModel, policies: list[Policy], days: float) -> None:
    trace = generate_trace(shape, days * DAY_S, seed=0)
    t0 = time.perf_counter()
    results = compare(trace, policies, svc, seed=0)
    took = time.perf_counter() - t0
    print(f"\n### {title}")
    peak = trace.peak_occupancy() / svc.concurrency
    print(
        f"{len(trace):,} requests over {days * 24:.0f} h, peak demand {peak:.0f} GPUs, {svc.concurrency} "
        f"request(s) per GPU, keep-warm {svc.keep_warm_s:g}s, ${svc.price_per_hour}/GPU-h; "
        f"simulated {len(policies)} policies in {took:.1f}s\n"
    )
    print(format_table(results, svc.slo_s))


def lp_times(sizes: list[int], repeats: int) -> None:
    print("\n### Buffer-sizing LP (GLOP), median of", repeats, "runs\n")
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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a quarter of a day, fewer LP repeats")
    args = ap.parse_args(argv)
    days = 0.25 if args.quick else 1.0
    seed_like = DemandShape()
    standard = [FixedPeak(), Reactive(2000.0), Reactive(300.0), Reactive(50.0)]
    buffers = [
        BufferRestore(restore_s=2.0, lead_time_s=600.0),
        BufferRestore(restore_s=2.0, lead_time_s=120.0),
        BufferRestore(restore_s=5.0, lead_time_s=120.0),
    ]
    print("## coldstart pool benchmark (bench/pool.py)")
    print(
        "Buffer rows: 'LP buffer' = sized each minute by the LP from the demand seen so far; lead time of a"
    )
    print(
        "buffer GPU (allocation + boot + health check) is 600 s in the first buffer row, 120 s in the others."
    )
    simulate("Seed-like trace, 1 request per GPU", seed_like, ServiceModel(), standard + buffers, days)
    batched = DemandShape(mean_rate_per_min=8 * seed_like.mean_rate_per_min)
    simulate("Same GPU demand, engine batches 8 requests per GPU", batched, ServiceModel(concurrency=8),
             standard + buffers, days)  # fmt: skip
    big = DemandShape(mean_rate_per_min=10 * seed_like.mean_rate_per_min)
    big_policies: list[Policy] = [FixedPeak(), Reactive(50.0), *buffers]
    simulate("10x the traffic, 1 request per GPU", big, ServiceModel(), big_policies, days)
    lp_times([10, 100, 1000], 3 if args.quick else 7)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
