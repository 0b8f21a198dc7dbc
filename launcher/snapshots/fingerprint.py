"""The host fingerprint a snapshot is taken on, and the compatibility gate that compares it with this host.

A CPU image restores only where the CPU has every feature the process may already have picked (glibc,
torch and numpy choose code paths by CPUID at start: an AVX-512 path restored on a CPU without AVX-512
dies with SIGILL), on the same kernel (CRIU and gVisor save kernel-specific state), and for a CUDA image
on the same GPU model and driver version. The gate names the exact field that differs.

GPU fields come from ``coldstart.launcher.gpu.inventory.gpu_fingerprint()`` (the GPU helper's; ``{}`` on
hosts without an NVIDIA driver): that is the hook, nothing here knows NVML.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class HostFingerprint:
    arch: str
    kernel: str
    cpu_model: str
    cpu_flags: tuple[str, ...]
    gpu: dict[str, str] = field(default_factory=dict)  # gpu_model, gpu_driver_version (where present)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["cpu_flags"] = list(self.cpu_flags)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HostFingerprint:
        return cls(
            arch=str(data["arch"]),
            kernel=str(data["kernel"]),
            cpu_model=str(data.get("cpu_model", "")),
            cpu_flags=tuple(data.get("cpu_flags", ())),
            gpu={str(k): str(v) for k, v in (data.get("gpu") or {}).items()},
        )


def _cpuinfo(text: str) -> tuple[str, tuple[str, ...]]:
    model, flags = "", ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:  # x86 / arm64
            flags = value
    return model, tuple(sorted(set(flags.split())))


def _gpu_fields() -> dict[str, str]:
    try:
        from coldstart.launcher.gpu.inventory import gpu_fingerprint
    except ImportError:
        return {}
    try:
        return dict(gpu_fingerprint())
    except Exception:  # a broken driver must not stop CPU snapshots; doctor reports it
        return {}


@functools.cache
def host_fingerprint() -> HostFingerprint:
    """This host's fingerprint (read once per process)."""
    try:
        model, flags = _cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        model, flags = "", ()
    return HostFingerprint(
        arch=platform.machine(),
        kernel=platform.release(),
        cpu_model=model,
        cpu_flags=flags,
        gpu=_gpu_fields(),
    )


def incompatibilities(snapshot: HostFingerprint, host: HostFingerprint) -> list[str]:
    """Why a snapshot taken on ``snapshot`` cannot restore on ``host``; empty when it can.

    CPU features: the host must have every flag the snapshot's host had (more is fine). Kernel, architecture
    and GPU fields must be equal. The CPU model name alone does not matter.
    """
    problems = []
    if snapshot.arch != host.arch:
        problems.append(f"architecture {snapshot.arch} != {host.arch} on this host")
    missing = sorted(set(snapshot.cpu_flags) - set(host.cpu_flags))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        problems.append(f"cpu flag{'s' if len(missing) > 1 else ''} {shown} missing on this host")
    if snapshot.kernel != host.kernel:
        problems.append(f"kernel {snapshot.kernel} != {host.kernel} on this host")
    for key in sorted(set(snapshot.gpu) | set(host.gpu)):
        want, have = snapshot.gpu.get(key, "none"), host.gpu.get(key, "none")
        if want != have:
            problems.append(f"{key.replace('_', ' ')} {want} != {have} on this host")
    return problems
