"""Run several policies on one trace and present them: a side-by-side table and PNG plots (Agg)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from coldstart.pool.simulate import Policy, PolicyResult, ServiceModel, run_policy
from coldstart.pool.trace import Trace


@dataclass(frozen=True)
class Row:
    policy: str
    utilization: float  # GPU allocation utilization: GPU-s running the app (a replica up) / GPU-s paid
    busy_utilization: float  # GPU-s with >= 1 request in service / GPU-s paid
    p50_wait_s: float
    p99_wait_s: float
    over_slo: float
    cost: float
    gpu_hours: float
    burst_gpu_hours: float
    peak_gpus: int


def compare(trace: Trace, policies: list[Policy], svc: ServiceModel, seed: int = 0) -> list[PolicyResult]:
    return [run_policy(trace, p, svc, seed) for p in policies]


def rows(results: list[PolicyResult]) -> list[Row]:
    return [
        Row(r.policy, r.utilization, r.busy_utilization, r.p50_wait_s, r.p99_wait_s, r.over_slo, r.cost,
            r.paid_gpu_s / 3600.0, r.burst_gpu_s / 3600.0, r.peak_gpus)
        for r in results
    ]  # fmt: skip


def format_table(results: list[PolicyResult], slo_s: float) -> str:
    """Markdown table; cost is also shown as a ratio to the first policy (the baseline)."""
    base = results[0].cost if results and results[0].cost > 0 else 1.0
    head = (
        f"| policy | GPU alloc. utilization (replica up / paid) | busy utilization (serving / paid) | "
        f"p50 wait s | p99 wait s | over {slo_s:g}s SLO | GPU-hours | of which burst | peak GPUs | cost $ | "
        f"cost vs {results[0].policy if results else '-'} |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows(results):
        lines.append(
            f"| {r.policy} | {r.utilization:.1%} | {r.busy_utilization:.1%} | {r.p50_wait_s:.1f} | "
            f"{r.p99_wait_s:.1f} | {r.over_slo:.2%} | {r.gpu_hours:,.0f} | {r.burst_gpu_hours:,.0f} | "
            f"{r.peak_gpus} | {r.cost:,.0f} | {r.cost / base:.2f}x |"
        )
    return "\n".join(lines)


def as_json(results: list[PolicyResult]) -> list[dict[str, object]]:
    return [asdict(r) for r in rows(results)]


def plot(trace: Trace, results: list[PolicyResult], out_dir: Path, concurrency: int = 1) -> list[Path]:
    """demand-vs-allocated.png (GPUs over time, one line per policy) and wait-cdf.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    grid = np.arange(0.0, trace.duration_s, 60.0)
    hours = grid / 3600.0
    fig, ax = plt.subplots(figsize=(11, 4.5))
    ax.fill_between(hours, trace.occupancy(grid) / concurrency, color="0.8", label="demand (GPUs busy)")
    for r in results:
        ax.plot(hours, r.log.allocated(grid), lw=1.0, label=f"{r.policy} ({r.utilization:.0%})")
    ax.set_xlabel("hours")
    ax.set_ylabel("GPUs")
    ax.set_title("Demand vs GPUs allocated (GPU allocation utilization in brackets)")
    ax.legend(fontsize=8, loc="upper left")
    paths = [out_dir / "demand-vs-allocated.png"]
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        w = np.sort(np.maximum(r.waits, 1e-3))
        ax.plot(w, np.arange(1, len(w) + 1) / len(w), label=r.policy)
    ax.set_xscale("log")
    ax.set_xlabel("request wait (s, log; 0 shown as 1 ms)")
    ax.set_ylabel("share of requests")
    ax.set_title("Wait CDF")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(out_dir / "wait-cdf.png")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths
