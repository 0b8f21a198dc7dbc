"""The GPUs of this host as NVML sees them: UUID, model, memory, persistence mode, driver version, and
which processes use which GPU.

``pynvml`` (package ``nvidia-ml-py``) imports without a driver; ``nvmlInit`` then raises
``NVMLError_LibraryNotFound`` (no ``libnvidia-ml.so.1``) or ``NVMLError_DriverNotLoaded``. Every NVML
error is mapped here, in ``_nvml_errors``, to a one-line ``GpuError``. The module is injectable: tests
pass ``FakeGpuHost().nvml``.

``pool/`` keeps its own NVML view for buffer health (it may not import the launcher); this one serves
the CUDA checkpointer (which GPUs a process used, which GPU to restore onto), ``coldstart doctor`` and
the snapshot's host fingerprint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from coldstart.launcher.errors import GpuError, GpuNotFound, NoNvidiaDriver

NO_NVML_HINT = "no NVIDIA driver on this host (libnvidia-ml.so.1 not found): install the NVIDIA driver >= 570"


@dataclass(frozen=True)
class GpuInfo:
    index: int
    uuid: str  # "GPU-xxxxxxxx-..." as nvidia-smi -L prints it
    name: str  # the model, e.g. "NVIDIA H200"
    memory_total: int  # bytes
    memory_used: int  # bytes
    persistence_mode: bool


@dataclass(frozen=True)
class GpuInventory:
    driver_version: str  # display driver, e.g. "570.86.10"
    gpus: tuple[GpuInfo, ...]

    @property
    def driver_major(self) -> int:
        return driver_major(self.driver_version)

    def by_uuid(self, gpu_uuid: str) -> GpuInfo:
        for gpu in self.gpus:
            if gpu.uuid == gpu_uuid:
                return gpu
        have = ", ".join(g.uuid for g in self.gpus) or "none"
        raise GpuNotFound(f"GPU {gpu_uuid} is not on this host (have: {have}); see nvidia-smi -L")


def driver_major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError as exc:
        raise GpuError(f"unreadable NVIDIA driver version {version!r}") from exc


def _load_nvml() -> Any:
    try:
        import pynvml
    except ImportError as exc:
        raise NoNvidiaDriver("nvidia-ml-py is not installed: pip install 'coldstart[gpu]'") from exc
    return pynvml


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@contextlib.contextmanager
def _nvml_errors(nvml: Any, what: str) -> Iterator[None]:
    """The one boundary where NVML exceptions become ``GpuError``s."""
    try:
        yield
    except nvml.NVMLError as exc:
        code = getattr(exc, "value", None)
        if code in (
            getattr(nvml, "NVML_ERROR_LIBRARY_NOT_FOUND", 12),
            getattr(nvml, "NVML_ERROR_DRIVER_NOT_LOADED", 9),
        ):
            raise NoNvidiaDriver(NO_NVML_HINT) from exc
        if code == getattr(nvml, "NVML_ERROR_NO_PERMISSION", 4):
            raise GpuError(f"NVML denied {what}: run as root") from exc
        raise GpuError(f"NVML failed to {what}: {exc}") from exc


@contextlib.contextmanager
def nvml_session(nvml: Any | None = None) -> Iterator[Any]:
    """``nvmlInit`` ... ``nvmlShutdown`` around a block; yields the NVML module."""
    nvml = nvml if nvml is not None else _load_nvml()
    with _nvml_errors(nvml, "initialize"):
        nvml.nvmlInit()
    try:
        yield nvml
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


def read_inventory(nvml: Any | None = None) -> GpuInventory:
    """Every GPU NVML sees, in NVML index order. Raises ``NoNvidiaDriver`` without a driver."""
    with nvml_session(nvml) as n:
        with _nvml_errors(n, "read the driver version"):
            version = _text(n.nvmlSystemGetDriverVersion())
        gpus = []
        with _nvml_errors(n, "list GPUs"):
            count = int(n.nvmlDeviceGetCount())
        for index in range(count):
            with _nvml_errors(n, f"read GPU {index}"):
                handle = n.nvmlDeviceGetHandleByIndex(index)
                memory = n.nvmlDeviceGetMemoryInfo(handle)
                persistence = n.nvmlDeviceGetPersistenceMode(handle) == getattr(n, "NVML_FEATURE_ENABLED", 1)
                gpus.append(
                    GpuInfo(
                        index=index,
                        uuid=_text(n.nvmlDeviceGetUUID(handle)),
                        name=_text(n.nvmlDeviceGetName(handle)),
                        memory_total=int(memory.total),
                        memory_used=int(memory.used),
                        persistence_mode=bool(persistence),
                    )
                )
    return GpuInventory(driver_version=version, gpus=tuple(gpus))


@dataclass(frozen=True)
class GpuProcess:
    pid: int  # host PID, as NVML reports it
    gpus: tuple[str, ...]  # UUIDs of the GPUs it has a compute context on
    used_bytes: int  # device memory it holds on them (0 where NVML cannot tell)


def gpu_processes(nvml: Any | None = None) -> dict[int, GpuProcess]:
    """Every process with a compute context on a GPU. A CUDA-checkpointed process is not listed."""
    gpus: dict[int, list[str]] = {}
    used: dict[int, int] = {}
    with nvml_session(nvml) as n:
        with _nvml_errors(n, "list GPUs"):
            count = int(n.nvmlDeviceGetCount())
        for index in range(count):
            with _nvml_errors(n, f"list the processes of GPU {index}"):
                handle = n.nvmlDeviceGetHandleByIndex(index)
                gpu_uuid = _text(n.nvmlDeviceGetUUID(handle))
                for proc in n.nvmlDeviceGetComputeRunningProcesses(handle):
                    pid = int(proc.pid)
                    gpus.setdefault(pid, []).append(gpu_uuid)
                    used[pid] = used.get(pid, 0) + int(proc.usedGpuMemory or 0)
    return {pid: GpuProcess(pid, tuple(uuids), used[pid]) for pid, uuids in gpus.items()}


def gpu_fingerprint(nvml: Any | None = None) -> dict[str, str]:
    """GPU fields of the host fingerprint: model(s) and driver version; ``{}`` on a host without a driver.

    Only what must match for a CUDA restore (the driver version exactly, the chip type): the GPU count
    and UUIDs differ between hosts that can share a snapshot, so they stay out.
    """
    try:
        inventory = read_inventory(nvml)
    except NoNvidiaDriver:
        return {}
    models = sorted({gpu.name for gpu in inventory.gpus})
    return {"gpu_model": ",".join(models) or "none", "gpu_driver_version": inventory.driver_version}
