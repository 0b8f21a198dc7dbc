"""A fake ``pynvml`` module: the same names the pool calls, over GPUs described in Python.

Only for what this machine cannot have (an NVIDIA driver). Inject with ``Nvml(FakeNvml([...]))``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


class NVMLError(Exception):
    pass


class NVMLError_LibraryNotFound(NVMLError):  # noqa: N801 (pynvml's names)
    pass


class NVMLError_DriverNotLoaded(NVMLError):  # noqa: N801
    pass


class NVMLError_NotSupported(NVMLError):  # noqa: N801
    pass


class NVMLError_Timeout(NVMLError):  # noqa: N801
    pass


class NVMLError_GpuIsLost(NVMLError):  # noqa: N801
    pass


@dataclass
class FakeGpu:
    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    memory_total: int = 80 * 2**30
    temperature_c: int = 40
    slowdown_temp_c: int | None = 90
    sm_clock_mhz: int = 1980
    sm_clock_max_mhz: int = 1980
    ecc_uncorrected: int | None = 0  # None: NotSupported
    retired_pending: bool | None = False  # None: NotSupported
    lost: bool = False
    xids: deque[int] = field(default_factory=deque)


@dataclass
class _Memory:
    total: int


@dataclass
class _Event:
    device: int
    eventData: int  # noqa: N815 (pynvml's name)
    eventType: int = 8  # noqa: N815


class FakeNvml:
    NVMLError = NVMLError
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    NVMLError_DriverNotLoaded = NVMLError_DriverNotLoaded
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_Timeout = NVMLError_Timeout
    NVMLError_GpuIsLost = NVMLError_GpuIsLost
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    NVML_VOLATILE_ECC = 0
    NVML_TEMPERATURE_GPU = 0
    NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = 1
    NVML_CLOCK_SM = 1
    NVML_FEATURE_ENABLED = 1
    nvmlEventTypeXidCriticalError = 8

    def __init__(self, gpus: list[FakeGpu], driver: bool = True) -> None:
        self.gpus = gpus
        self.driver = driver
        self.initialised = 0
        self.event_sets: list[list[int]] = []

    def _gpu(self, handle: int) -> FakeGpu:
        gpu = self.gpus[handle]
        if gpu.lost:
            raise NVMLError_GpuIsLost("GPU is lost")
        return gpu

    def nvmlInit(self) -> None:  # noqa: N802
        if not self.driver:
            raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")
        self.initialised += 1

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.initialised -= 1

    def nvmlSystemGetDriverVersion(self) -> str:  # noqa: N802
        return "580.00"

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        return index

    def nvmlDeviceGetUUID(self, h: int) -> str:  # noqa: N802
        return self.gpus[h].uuid

    def nvmlDeviceGetName(self, h: int) -> str:  # noqa: N802
        return self._gpu(h).name

    def nvmlDeviceGetMemoryInfo(self, h: int) -> _Memory:  # noqa: N802
        return _Memory(self._gpu(h).memory_total)

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:  # noqa: N802
        return self._gpu(h).temperature_c

    def nvmlDeviceGetTemperatureThreshold(self, h: int, kind: int) -> int:  # noqa: N802
        value = self._gpu(h).slowdown_temp_c
        if value is None:
            raise NVMLError_NotSupported("Not Supported")
        return value

    def nvmlDeviceGetClockInfo(self, h: int, clock: int) -> int:  # noqa: N802
        return self._gpu(h).sm_clock_mhz

    def nvmlDeviceGetMaxClockInfo(self, h: int, clock: int) -> int:  # noqa: N802
        return self._gpu(h).sm_clock_max_mhz

    def nvmlDeviceGetTotalEccErrors(self, h: int, kind: int, counter: int) -> int:  # noqa: N802
        value = self._gpu(h).ecc_uncorrected
        if value is None:
            raise NVMLError_NotSupported("Not Supported")
        return value

    def nvmlDeviceGetRetiredPagesPendingStatus(self, h: int) -> int:  # noqa: N802
        value = self._gpu(h).retired_pending
        if value is None:
            raise NVMLError_NotSupported("Not Supported")
        return 1 if value else 0

    def nvmlEventSetCreate(self) -> int:  # noqa: N802
        self.event_sets.append([])
        return len(self.event_sets) - 1

    def nvmlDeviceRegisterEvents(self, h: int, kinds: int, event_set: int) -> None:  # noqa: N802
        self.event_sets[event_set].append(h)

    def nvmlEventSetWait(self, event_set: int, timeout_ms: int) -> _Event:  # noqa: N802
        for h in self.event_sets[event_set]:
            if self.gpus[h].xids:
                return _Event(h, self.gpus[h].xids.popleft())
        raise NVMLError_Timeout("Timeout")

    def nvmlEventSetFree(self, event_set: int) -> None:  # noqa: N802
        self.event_sets[event_set] = []


def gpus(n: int, **overrides: object) -> list[FakeGpu]:
    return [FakeGpu(uuid=f"GPU-{i:08d}-fake", **overrides) for i in range(n)]  # type: ignore[arg-type]
