"""The one boundary between ``coldstart.pool`` and NVML (nvidia-ml-py, ``import pynvml``).

Every NVML call goes through ``Nvml._call``, which maps ``pynvml.NVMLError`` subclasses to our errors:
a missing library or driver becomes ``NoDriverError`` ("no NVIDIA driver on this host"), anything else
``NvmlError`` naming the call. Optional readings a GPU does not support (ECC on consumer boards, retired
pages on newer ones that remap rows instead) come back as ``None``, not as errors.

``Nvml`` takes the module as a parameter so tests can inject a fake module with the same names
(``tests/pool/fake_nvml.py``): the one thing this machine cannot have is a GPU driver.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from coldstart.pool.errors import NoDriverError, NvmlError

NO_DRIVER = (
    "no NVIDIA driver on this host (NVML cannot be loaded); use the 'cpu' provider to run CPU replicas"
)

# NVML error class names that mean "this host has no usable driver" (map to NoDriverError).
DRIVER_MISSING_ERRORS = ("NVMLError_LibraryNotFound", "NVMLError_DriverNotLoaded")
# Readings that some GPUs do not have: return None instead of failing the check.
OPTIONAL_ERRORS = ("NVMLError_NotSupported", "NVMLError_FunctionNotFound")


@dataclass(frozen=True)
class DeviceReading:
    """One snapshot of a GPU's health-relevant counters."""

    index: int
    uuid: str
    name: str
    memory_total: int
    temperature_c: int
    slowdown_temp_c: int | None
    sm_clock_mhz: int
    sm_clock_max_mhz: int
    ecc_uncorrected_volatile: int | None
    retired_pages_pending: bool | None


@dataclass(frozen=True)
class XidEvent:
    index: int
    uuid: str
    xid: int


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Nvml:
    """A thin typed wrapper around a pynvml-like module. Not thread-safe; one per thread that uses it."""

    def __init__(self, module: ModuleType | Any | None = None) -> None:
        self._module = module
        self._initialised = False

    @property
    def nv(self) -> Any:
        if self._module is None:
            try:
                self._module = importlib.import_module("pynvml")
            except ImportError as exc:  # a CPU-only install: no GPUs to see, CPU slots serve
                raise NoDriverError(
                    "nvidia-ml-py is not installed, so no GPU can be seen (pip install 'coldstart[gpu]')"
                ) from exc
        return self._module

    def _call(self, name: str, *args: Any, optional: bool = False) -> Any:
        nv = self.nv
        try:
            return getattr(nv, name)(*args)
        except nv.NVMLError as exc:
            kind = type(exc).__name__
            if optional and kind in OPTIONAL_ERRORS:
                return None
            if kind in DRIVER_MISSING_ERRORS:
                raise NoDriverError(NO_DRIVER) from exc
            raise NvmlError(f"NVML {name} failed: {exc}; check the GPU with nvidia-smi") from exc

    # -- lifecycle -------------------------------------------------------------------------------------
    def init(self) -> None:
        if not self._initialised:
            self._call("nvmlInit")
            self._initialised = True

    def shutdown(self) -> None:
        if self._initialised:
            self._initialised = False
            self._call("nvmlShutdown")

    def __enter__(self) -> Nvml:
        self.init()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- readings --------------------------------------------------------------------------------------
    def driver_version(self) -> str:
        return _text(self._call("nvmlSystemGetDriverVersion"))

    def device_count(self) -> int:
        return int(self._call("nvmlDeviceGetCount"))

    def _handle(self, index: int) -> Any:
        return self._call("nvmlDeviceGetHandleByIndex", index)

    def uuid(self, index: int) -> str:
        return _text(self._call("nvmlDeviceGetUUID", self._handle(index)))

    def name(self, index: int) -> str:
        return _text(self._call("nvmlDeviceGetName", self._handle(index)))

    def read(self, index: int) -> DeviceReading:
        nv, h = self.nv, self._handle(index)
        ecc = self._call(
            "nvmlDeviceGetTotalEccErrors",
            h,
            nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
            nv.NVML_VOLATILE_ECC,
            optional=True,
        )
        pending = self._call("nvmlDeviceGetRetiredPagesPendingStatus", h, optional=True)
        return DeviceReading(
            index=index,
            uuid=_text(self._call("nvmlDeviceGetUUID", h)),
            name=_text(self._call("nvmlDeviceGetName", h)),
            memory_total=int(self._call("nvmlDeviceGetMemoryInfo", h).total),
            temperature_c=int(self._call("nvmlDeviceGetTemperature", h, nv.NVML_TEMPERATURE_GPU)),
            slowdown_temp_c=self._call(
                "nvmlDeviceGetTemperatureThreshold", h, nv.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN, optional=True
            ),
            sm_clock_mhz=int(self._call("nvmlDeviceGetClockInfo", h, nv.NVML_CLOCK_SM)),
            sm_clock_max_mhz=int(self._call("nvmlDeviceGetMaxClockInfo", h, nv.NVML_CLOCK_SM)),
            ecc_uncorrected_volatile=None if ecc is None else int(ecc),
            retired_pages_pending=None if pending is None else bool(pending == nv.NVML_FEATURE_ENABLED),
        )


class XidWatch:
    """Passive monitoring: an NVML event set registered for critical XID events on some devices."""

    def __init__(self, nvml: Nvml, indices: list[int]) -> None:
        self._nvml = nvml
        nv = nvml.nv
        self._set = nvml._call("nvmlEventSetCreate")
        self._uuids: dict[str, int] = {}
        for index in indices:
            handle = nvml._handle(index)
            nvml._call("nvmlDeviceRegisterEvents", handle, nv.nvmlEventTypeXidCriticalError, self._set)
            self._uuids[nvml.uuid(index)] = index

    def poll(self, timeout_ms: int = 0) -> list[XidEvent]:
        """Every critical XID queued so far (waits up to ``timeout_ms`` for the first one)."""
        nv = self._nvml.nv
        events: list[XidEvent] = []
        while True:
            try:
                data = self._nvml.nv.nvmlEventSetWait(self._set, timeout_ms)
            except nv.NVMLError_Timeout:
                return events
            except nv.NVMLError as exc:  # mapped like every other call
                msg = f"NVML nvmlEventSetWait failed: {exc}; check the GPU with nvidia-smi"
                raise NvmlError(msg) from exc
            uuid = _text(nv.nvmlDeviceGetUUID(data.device))
            events.append(XidEvent(self._uuids.get(uuid, -1), uuid, int(data.eventData)))
            timeout_ms = 0

    def close(self) -> None:
        self._nvml._call("nvmlEventSetFree", self._set)
