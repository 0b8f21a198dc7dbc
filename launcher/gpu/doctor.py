"""GPU rows of ``coldstart doctor``: NVIDIA driver, GPUs, CUDA checkpoint API support, persistence mode.

``cli_doctor`` prints these next to its CPU rows. Each row is (name, status, detail) with status one of
``ok``, ``warn`` (works, with a caveat), ``fail`` (GPU snapshots cannot work here) or ``skip`` (no GPU
here, nothing to check). A host without a driver is not an error for ``doctor``: it gets one ``fail`` row
for the driver that says so, and the other rows are skipped.
"""

from __future__ import annotations

import platform
import subprocess
from dataclasses import dataclass
from typing import Any, Literal

from coldstart.launcher.checkpointers.cuda import MIN_DRIVER_MAJOR, PARITY_DRIVER_MAJOR, REMAP_DRIVER_MAJOR
from coldstart.launcher.errors import GpuError, NoNvidiaDriver
from coldstart.launcher.gpu.driver import CudaCheckpointAPI
from coldstart.launcher.gpu.inventory import GpuInventory, read_inventory

Status = Literal["ok", "warn", "fail", "skip"]


@dataclass(frozen=True)
class GpuCheck:
    name: str
    status: Status
    detail: str

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "warn", "skip")


def gpu_checks(nvml: Any | None = None, driver: Any | None = None) -> list[GpuCheck]:
    """The GPU rows, in display order. ``nvml``/``driver`` are injectable (fakes in tests)."""
    try:
        inventory = read_inventory(nvml)
    except NoNvidiaDriver as exc:
        return [
            GpuCheck("nvidia driver", "fail", str(exc)),
            GpuCheck("gpus", "skip", "no driver: GPU snapshots unavailable, CPU snapshots unaffected"),
            GpuCheck("cuda checkpoint", "skip", "no driver"),
            GpuCheck("persistence mode", "skip", "no driver"),
        ]
    except GpuError as exc:
        return [GpuCheck("nvidia driver", "fail", str(exc))]
    return [
        GpuCheck("nvidia driver", "ok", inventory.driver_version),
        _gpus_row(inventory),
        _checkpoint_row(inventory, driver),
        _persistence_row(inventory),
        _kernel_row(),
    ]


def _kernel_row(release: str | None = None, dmesg: str | None = None) -> GpuCheck:
    reason = gvisor_reason(release, dmesg)
    if reason:
        return GpuCheck("kernel", "fail", reason)
    return GpuCheck("kernel", "ok", f"{platform.release() if release is None else release} (not gVisor)")


def _gpus_row(inventory: GpuInventory) -> GpuCheck:
    if not inventory.gpus:
        return GpuCheck("gpus", "fail", "the driver is loaded but NVML sees no GPU")
    parts = [f"{g.index}: {g.name} {g.memory_total / 2**30:.0f} GiB {g.uuid}" for g in inventory.gpus]
    return GpuCheck("gpus", "ok", "; ".join(parts))


def _checkpoint_row(inventory: GpuInventory, driver: Any | None) -> GpuCheck:
    major = inventory.driver_major
    if major < MIN_DRIVER_MAJOR:
        return GpuCheck(
            "cuda checkpoint",
            "fail",
            f"driver {inventory.driver_version} predates the CUDA checkpoint API (needs >= "
            f"{MIN_DRIVER_MAJOR}, r{PARITY_DRIVER_MAJOR}+ recommended): GPU snapshots refused",
        )
    api = CudaCheckpointAPI(driver)
    try:
        cuda = api.driver_version()
        api.require_checkpoint_api()
    except GpuError as exc:
        return GpuCheck("cuda checkpoint", "fail", str(exc))
    cuda_text = f"CUDA {cuda // 1000}.{cuda % 1000 // 10}"
    if major < PARITY_DRIVER_MAJOR:
        return GpuCheck(
            "cuda checkpoint",
            "warn",
            f"driver {inventory.driver_version} ({cuda_text}): basic API only, no lock timeout; "
            f"upgrade to r{PARITY_DRIVER_MAJOR}+",
        )
    remap = (
        "restore onto another GPU by UUID"
        if major >= REMAP_DRIVER_MAJOR
        else f"restore onto the same GPU only (remap needs r{REMAP_DRIVER_MAJOR}+)"
    )
    return GpuCheck("cuda checkpoint", "ok", f"driver {inventory.driver_version} ({cuda_text}): {remap}")


def _persistence_row(inventory: GpuInventory) -> GpuCheck:
    off = [str(g.index) for g in inventory.gpus if not g.persistence_mode]
    if not off:
        return GpuCheck("persistence mode", "ok", "on" if inventory.gpus else "no GPU")
    return GpuCheck(
        "persistence mode",
        "warn",
        f"off on GPU {', '.join(off)}: restore still works (coldstart calls cuInit first) but each first "
        "CUDA call re-initialises the GPU; enable with nvidia-smi -pm 1",
    )


def gvisor_reason(release: str | None = None, dmesg: str | None = None) -> str | None:
    """One line saying this host runs under gVisor, or None.

    gVisor reports kernel ``4.4.0`` (some builds ``4.19.0-gvisor``) and its ``dmesg`` starts with
    ``Starting gVisor...``. CRIU cannot work there (no real kernel below), so CPU and CUDA snapshots
    through CRIU are impossible; seen on the device tool's ``nvidia-h200`` kind.
    """
    release = platform.release() if release is None else release
    if dmesg is None:
        dmesg = _dmesg_head()
    markers = []
    if release == "4.4.0" or "gvisor" in release.lower():
        markers.append(f"kernel {release}")
    if "Starting gVisor" in dmesg:
        markers.append("dmesg 'Starting gVisor...'")
    if not markers:
        return None
    return (
        f"this host runs under gVisor ({', '.join(markers)}): CRIU cannot checkpoint here, so CRIU and CUDA "
        "snapshots are off; use a VM or bare-metal GPU host (a real kernel, criu check passing)"
    )


def _dmesg_head() -> str:
    try:
        done = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5)  # noqa: S607
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout[:4096]
