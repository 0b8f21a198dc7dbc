"""GPU health checks over NVML, in three depths (as in Modal's GPU health-checking write-up):

- ``active_check`` on boot, before a unit enters the buffer: the device answers, no uncorrected ECC
  errors, no retired pages pending, no critical XID queued, temperature below the slowdown threshold,
  SM clocks readable and non-zero, and a small CUDA matmul compared with the CPU when torch has CUDA.
- ``XidWatch`` (``nvml.py``) while a unit is assigned: critical XID events fail the unit.
- ``deep_check`` on a slow cadence (``HealthPolicy.deep_every_s``) for idle units: the active check plus a
  larger matmul burn. (Real fleets run ``dcgmi diag`` weekly; DCGM is not a dependency here.)

A unit that fails any check leaves the buffer (``Pool`` moves it to FAILED, then RELEASED).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from coldstart.pool.errors import NvmlError
from coldstart.pool.nvml import DeviceReading, Nvml

# XIDs that mean the GPU (not the application) is broken: ECC double-bit / contained / uncontained
# errors, row-remapping failures, NVLink, fell off the bus, GSP errors.
CRITICAL_XIDS = frozenset({48, 61, 62, 63, 64, 74, 79, 92, 94, 95, 119, 120, 140})


@dataclass(frozen=True)
class HealthPolicy:
    temp_margin_c: int = 5  # fail if within this many degrees of the slowdown threshold
    max_temp_c: int = 87  # used when the GPU reports no slowdown threshold
    max_ecc_uncorrected: int = 0
    matmul: bool = True  # run a small CUDA matmul when torch with CUDA is importable
    matmul_size: int = 1024
    deep_matmul_size: int = 8192
    deep_every_s: float = 7 * 24 * 3600.0
    critical_xids: frozenset[int] = CRITICAL_XIDS


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class HealthReport:
    device: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(name, ok, detail))

    def summary(self) -> str:
        failed = [f"{c.name}: {c.detail}" for c in self.checks if not c.ok]
        if failed:
            return f"{self.device} unhealthy: " + "; ".join(failed)
        return f"{self.device} healthy ({len(self.checks)} checks)"


def _reading_checks(report: HealthReport, r: DeviceReading, policy: HealthPolicy) -> None:
    if r.ecc_uncorrected_volatile is None:
        report.add("ecc", True, "not supported on this GPU")
    else:
        report.add(
            "ecc",
            r.ecc_uncorrected_volatile <= policy.max_ecc_uncorrected,
            f"{r.ecc_uncorrected_volatile} uncorrected volatile errors",
        )
    if r.retired_pages_pending is None:
        report.add("retired-pages", True, "not supported on this GPU")
    else:
        report.add(
            "retired-pages",
            not r.retired_pages_pending,
            "retirement pending (reset the GPU)" if r.retired_pages_pending else "none pending",
        )
    limit = (r.slowdown_temp_c - policy.temp_margin_c) if r.slowdown_temp_c else policy.max_temp_c
    report.add("temperature", r.temperature_c < limit, f"{r.temperature_c} C (limit {limit} C)")
    clocks_ok = r.sm_clock_mhz > 0 and r.sm_clock_max_mhz > 0 and r.sm_clock_mhz <= r.sm_clock_max_mhz
    report.add("clocks", clocks_ok, f"SM {r.sm_clock_mhz}/{r.sm_clock_max_mhz} MHz")


def cuda_matmul(index: int, size: int) -> tuple[bool, str]:
    """Multiply two random matrices on GPU ``index`` and on the CPU; compare. Skipped without torch CUDA."""
    if importlib.util.find_spec("torch") is None:
        return True, "skipped (torch not installed)"
    import torch

    if not torch.cuda.is_available():
        return True, "skipped (torch has no CUDA here)"
    try:
        gen = torch.Generator().manual_seed(index)
        a = torch.randn(size, size, generator=gen)
        b = torch.randn(size, size, generator=gen)
        dev = torch.device("cuda", index)
        got = (a.to(dev) @ b.to(dev)).cpu()
        torch.cuda.synchronize(dev)
    except RuntimeError as exc:  # CUDA errors surface as RuntimeError
        return False, f"CUDA matmul failed: {exc}"
    want = a @ b
    err = float((got - want).abs().max() / want.abs().max())
    return err < 1e-2, f"{size}x{size} max relative error {err:.1e}"


def active_check(
    nvml: Nvml, index: int, policy: HealthPolicy = HealthPolicy(), pending_xids: list[int] | None = None
) -> HealthReport:
    """The short check run on boot. ``pending_xids``: XIDs the caller's watch saw for this device."""
    report = HealthReport(f"gpu{index}")
    try:
        reading = nvml.read(index)
    except NvmlError as exc:
        report.add("answers", False, str(exc))
        return report
    report.device = f"gpu{index} {reading.name} {reading.uuid}"
    report.add("answers", True, f"{reading.memory_total // 2**20} MiB")
    _reading_checks(report, reading, policy)
    critical = sorted({x for x in pending_xids or [] if x in policy.critical_xids})
    report.add("xid", not critical, f"critical XIDs {critical}" if critical else "no critical XID")
    if policy.matmul and report.ok:
        report.add("matmul", *cuda_matmul(index, policy.matmul_size))
    return report


def deep_check(
    nvml: Nvml, index: int, policy: HealthPolicy = HealthPolicy(), pending_xids: list[int] | None = None
) -> HealthReport:
    report = active_check(nvml, index, policy, pending_xids)
    if policy.matmul and report.ok:
        report.add("deep-matmul", *cuda_matmul(index, policy.deep_matmul_size))
    return report
