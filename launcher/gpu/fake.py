"""A simulated GPU host behind the interfaces of ``cuda.bindings.driver`` and ``pynvml``.

Used where the real driver cannot exist (no GPU here; CI): unit tests of the CUDA checkpointer, the
driver helper process (``gpu/helper.py --fake-host``, built with ``to_spec``/``from_spec``) and
``bench/gpu_coldstart.py --fake-gpu``. It keeps the CUDA checkpoint state machine per pid exactly as the
driver documents it (RUNNING -lock-> LOCKED -checkpoint-> CHECKPOINTED -restore-> LOCKED -unlock->
RUNNING; any other transition returns ``CUDA_ERROR_ILLEGAL_STATE``), records every call in order, lets a
test make one call fail with a chosen ``CUresult``, and can make a call never return (``hang``).

    host = FakeGpuHost.with_gpus("NVIDIA H200", count=2)
    host.add_process(4242, gpus=[host.gpus[0].uuid], device_bytes=1 << 30)
    api = CudaCheckpointAPI(host.driver); inventory = read_inventory(host.nvml)
    host.fail("lock", "CUDA_ERROR_TIMEOUT", pid=4242)      # next lock of 4242 times out
"""

from __future__ import annotations

import ctypes
import enum
import json
import threading
import uuid as uuid_mod
from dataclasses import dataclass, field
from typing import Any


class CUresult(enum.IntEnum):
    # Values as in cuda.h.
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1
    CUDA_ERROR_OUT_OF_MEMORY = 2
    CUDA_ERROR_NOT_INITIALIZED = 3
    CUDA_ERROR_NO_DEVICE = 100
    CUDA_ERROR_INVALID_DEVICE = 101
    CUDA_ERROR_NOT_FOUND = 500
    CUDA_ERROR_NOT_READY = 600
    CUDA_ERROR_NOT_PERMITTED = 800
    CUDA_ERROR_NOT_SUPPORTED = 801
    CUDA_ERROR_TIMEOUT = 909
    CUDA_ERROR_ILLEGAL_STATE = 401
    CUDA_ERROR_UNKNOWN = 999


class CUprocessState(enum.IntEnum):
    CU_PROCESS_STATE_RUNNING = 0
    CU_PROCESS_STATE_LOCKED = 1
    CU_PROCESS_STATE_CHECKPOINTED = 2
    CU_PROCESS_STATE_FAILED = 3


class CUuuid:
    """Like the real one: reads through ``_ptr`` (no copy) or owns 16 bytes; ``bytes`` is read-only."""

    def __init__(self, _ptr: int = 0) -> None:
        self._own = ctypes.create_string_buffer(16)
        self._ptr = _ptr or ctypes.addressof(self._own)

    @property
    def bytes(self) -> bytes:
        return ctypes.string_at(self._ptr, 16)

    def getPtr(self) -> int:  # noqa: N802 -- cuda-bindings' name
        return self._ptr


class CUcheckpointLockArgs:
    def __init__(self) -> None:
        self.timeoutMs = 0


class CUcheckpointGpuPair:
    def __init__(self) -> None:
        self.oldUuid = CUuuid()
        self.newUuid = CUuuid()


class CUcheckpointRestoreArgs:
    def __init__(self) -> None:
        self.gpuPairs: list[CUcheckpointGpuPair] = []
        self.gpuPairsCount = 0


@dataclass
class FakeGpu:
    uuid: str
    name: str
    memory_total: int = 141 << 30
    persistence_mode: bool = True


@dataclass
class FakeProcess:
    pid: int
    gpus: list[str]  # UUIDs of the GPUs it is on (kept while checkpointed: what it was on)
    device_bytes: int = 0
    state: CUprocessState = CUprocessState.CU_PROCESS_STATE_RUNNING
    host_bytes: int = 0  # device memory copied into its host memory by checkpoint
    busy: bool = False  # in-flight kernels that never finish: a timed lock fails


def _uuid_text(raw: bytes) -> str:
    return f"GPU-{uuid_mod.UUID(bytes=raw)}"


@dataclass
class FakeGpuHost:
    gpus: list[FakeGpu] = field(default_factory=list)
    driver_version: str = "570.86.10"
    cuda_version: int = 12080
    has_checkpoint_api: bool = True
    driver_installed: bool = True  # False: libcuda/libnvidia-ml missing, as on this machine
    processes: dict[int, FakeProcess] = field(default_factory=dict)
    calls: list[tuple[str, int | None]] = field(default_factory=list)
    hang: set[str] = field(default_factory=set)  # calls that never return (a stuck driver)
    _faults: dict[tuple[str, int | None], list[CUresult]] = field(default_factory=dict)

    def to_spec(self) -> str:
        """JSON of the host (GPUs, processes, pending faults, hangs): the helper process rebuilds it."""
        return json.dumps(
            {
                "driver_version": self.driver_version,
                "cuda_version": self.cuda_version,
                "has_checkpoint_api": self.has_checkpoint_api,
                "driver_installed": self.driver_installed,
                "gpus": [[g.uuid, g.name] for g in self.gpus],
                "processes": [[p.pid, p.gpus, int(p.state)] for p in self.processes.values()],
                "faults": [[c, pid, [r.name for r in q]] for (c, pid), q in self._faults.items()],
                "hang": sorted(self.hang),
            }
        )

    @classmethod
    def from_spec(cls, text: str) -> FakeGpuHost:
        raw = json.loads(text)
        host = cls(
            gpus=[FakeGpu(uuid=u, name=n) for u, n in raw["gpus"]],
            driver_version=raw["driver_version"],
            cuda_version=raw["cuda_version"],
            has_checkpoint_api=raw["has_checkpoint_api"],
            driver_installed=raw["driver_installed"],
            hang=set(raw["hang"]),
        )
        for pid, gpus, state in raw["processes"]:
            host.add_process(pid, gpus, state=CUprocessState(state))
        for call, pid, results in raw["faults"]:
            for result in results:
                host.fail(call, result, pid=pid)
        return host

    @classmethod
    def with_gpus(cls, name: str = "NVIDIA H200", count: int = 1, **kwargs: Any) -> FakeGpuHost:
        gpus = [FakeGpu(uuid=f"GPU-{uuid_mod.uuid4()}", name=name) for _ in range(count)]
        return cls(gpus=gpus, **kwargs)

    def add_process(
        self, pid: int, gpus: list[str], device_bytes: int = 1 << 30, state: CUprocessState | None = None
    ) -> FakeProcess:
        proc = FakeProcess(pid=pid, gpus=list(gpus), device_bytes=device_bytes)
        if state is not None:
            proc.state = state
        self.processes[pid] = proc
        return proc

    def fail(self, call: str, result: str, pid: int | None = None, times: int = 1) -> None:
        """The next ``times`` calls of ``call`` ("lock", "restore", "GetState", ...) return ``result``."""
        self._faults.setdefault((call, pid), []).extend([CUresult[result]] * times)

    def state(self, pid: int) -> str:
        return self.processes[pid].state.name.removeprefix("CU_PROCESS_STATE_").lower()

    def transitions(self, pid: int | None = None) -> list[str]:
        """The checkpoint calls made so far (GetState queries left out), e.g. ["lock", "checkpoint"]."""
        return [c for c, p in self.calls if c != "GetState" and (pid is None or p == pid)]

    @property
    def driver(self) -> FakeDriver:
        return FakeDriver(self)

    @property
    def nvml(self) -> FakeNvml:
        return FakeNvml(self)

    def _fault(self, call: str, pid: int | None) -> CUresult | None:
        for key in ((call, pid), (call, None)):
            queue = self._faults.get(key)
            if queue:
                return queue.pop(0)
        return None


# Aliases for annotations inside FakeDriver, whose class attributes of the same names (the driver module's
# interface) would shadow the types for a type checker.
_Result = CUresult
_State = CUprocessState
_LockArgs = CUcheckpointLockArgs
_RestoreArgs = CUcheckpointRestoreArgs


class FakeDriver:
    """The subset of ``cuda.bindings.driver`` the launcher uses, over a ``FakeGpuHost``."""

    CUresult = CUresult
    CUprocessState = CUprocessState
    CUuuid = CUuuid
    CUcheckpointLockArgs = CUcheckpointLockArgs
    CUcheckpointGpuPair = CUcheckpointGpuPair
    CUcheckpointRestoreArgs = CUcheckpointRestoreArgs

    def __init__(self, host: FakeGpuHost) -> None:
        self._host = host
        if not host.has_checkpoint_api:  # cuda-bindings older than the API: the attributes are missing
            for name in [n for n in dir(type(self)) if n.startswith("cuCheckpointProcess")]:
                setattr(self, name, None)

    def _enter(self, call: str, pid: int | None) -> tuple[_Result | None, FakeProcess | None]:
        if not self._host.driver_installed:  # what cuda.bindings raises on its first call
            raise RuntimeError('"cuda" is an NVIDIA driver library and can only be found via system search.')
        self._host.calls.append((call, pid))
        if call in self._host.hang:
            threading.Event().wait()  # never returns: only a kill ends it
        fault = self._host._fault(call, pid)
        if fault is not None:
            return fault, None
        if pid is None:
            return None, None
        proc = self._host.processes.get(pid)
        return (None, proc) if proc is not None else (CUresult.CUDA_ERROR_NOT_FOUND, None)

    def cuInit(self, flags: int) -> tuple[_Result]:
        err, _ = self._enter("Init", None)
        return (err or CUresult.CUDA_SUCCESS,)

    def cuDriverGetVersion(self) -> tuple[_Result, int]:
        err, _ = self._enter("DriverGetVersion", None)
        return (err or CUresult.CUDA_SUCCESS, self._host.cuda_version)

    def cuCheckpointProcessGetState(self, pid: int) -> tuple[_Result, _State | None]:
        err, proc = self._enter("GetState", pid)
        if err is not None or proc is None:
            return (err or CUresult.CUDA_ERROR_NOT_FOUND, None)
        return (CUresult.CUDA_SUCCESS, proc.state)

    def cuCheckpointProcessGetRestoreThreadId(self, pid: int) -> tuple[_Result, int]:
        err, proc = self._enter("GetRestoreThreadId", pid)
        if err is not None or proc is None:
            return (err or CUresult.CUDA_ERROR_NOT_FOUND, 0)
        return (CUresult.CUDA_SUCCESS, pid + 1)

    def cuCheckpointProcessLock(self, pid: int, args: _LockArgs | None) -> tuple[_Result]:
        err, proc = self._enter("lock", pid)
        if err is not None or proc is None:
            return (err or CUresult.CUDA_ERROR_NOT_FOUND,)
        if proc.state != CUprocessState.CU_PROCESS_STATE_RUNNING:
            return (CUresult.CUDA_ERROR_ILLEGAL_STATE,)
        if proc.busy:  # the driver leaves it RUNNING when the timeout expires
            return (CUresult.CUDA_ERROR_TIMEOUT,)
        proc.state = CUprocessState.CU_PROCESS_STATE_LOCKED
        return (CUresult.CUDA_SUCCESS,)

    def cuCheckpointProcessCheckpoint(self, pid: int, args: Any) -> tuple[_Result]:
        err, proc = self._enter("checkpoint", pid)
        if err is not None or proc is None:
            return (err or CUresult.CUDA_ERROR_NOT_FOUND,)
        if proc.state != CUprocessState.CU_PROCESS_STATE_LOCKED:
            return (CUresult.CUDA_ERROR_ILLEGAL_STATE,)
        proc.host_bytes, proc.state = proc.device_bytes, CUprocessState.CU_PROCESS_STATE_CHECKPOINTED
        return (CUresult.CUDA_SUCCESS,)

    def cuCheckpointProcessRestore(self, pid: int, args: _RestoreArgs | None) -> tuple[_Result]:
        err, proc = self._enter("restore", pid)
        if err is not None or proc is None:
            return (err or CUresult.CUDA_ERROR_NOT_FOUND,)
        if proc.state != CUprocessState.CU_PROCESS_STATE_CHECKPOINTED:
            return (CUresult.CUDA_ERROR_ILLEGAL_STATE,)
        by_uuid = {g.uuid: g for g in self._host.gpus}
        target = list(proc.gpus)
        if args is not None and args.gpuPairsCount:
            pairs = {_uuid_text(p.oldUuid.bytes): _uuid_text(p.newUuid.bytes) for p in args.gpuPairs}
            if set(pairs) != set(proc.gpus):  # must list every checkpointed GPU
                return (CUresult.CUDA_ERROR_INVALID_VALUE,)
            target = [pairs[u] for u in proc.gpus]
        for old, new in zip(proc.gpus, target, strict=True):
            if new not in by_uuid:
                return (CUresult.CUDA_ERROR_INVALID_DEVICE,)
            old_gpu = by_uuid.get(old)
            if old_gpu is not None and old_gpu.name != by_uuid[new].name:
                return (CUresult.CUDA_ERROR_NOT_SUPPORTED,)
        proc.gpus, proc.state = target, CUprocessState.CU_PROCESS_STATE_LOCKED
        return (CUresult.CUDA_SUCCESS,)

    def cuCheckpointProcessUnlock(self, pid: int, args: Any) -> tuple[_Result]:
        err, proc = self._enter("unlock", pid)
        if err is not None or proc is None:
            return (err or CUresult.CUDA_ERROR_NOT_FOUND,)
        if proc.state != CUprocessState.CU_PROCESS_STATE_LOCKED:
            return (CUresult.CUDA_ERROR_ILLEGAL_STATE,)
        proc.state = CUprocessState.CU_PROCESS_STATE_RUNNING
        return (CUresult.CUDA_SUCCESS,)


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


@dataclass
class _Memory:
    total: int
    used: int
    free: int


@dataclass
class _ProcessInfo:
    pid: int
    usedGpuMemory: int  # noqa: N815 -- NVML's field name


class FakeNvml:
    """The subset of ``pynvml`` the launcher uses, over a ``FakeGpuHost``."""

    NVMLError = NVMLError
    NVML_FEATURE_ENABLED = 1
    NVML_ERROR_LIBRARY_NOT_FOUND = 12
    NVML_ERROR_DRIVER_NOT_LOADED = 9
    NVML_ERROR_NO_PERMISSION = 4

    def __init__(self, host: FakeGpuHost) -> None:
        self._host = host

    def nvmlInit(self) -> None:
        if not self._host.driver_installed:
            raise NVMLError(self.NVML_ERROR_LIBRARY_NOT_FOUND)

    def nvmlShutdown(self) -> None:
        pass

    def nvmlSystemGetDriverVersion(self) -> str:
        return self._host.driver_version

    def nvmlDeviceGetCount(self) -> int:
        return len(self._host.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self._host.gpus[index]

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> str:
        return handle.uuid

    def nvmlDeviceGetName(self, handle: FakeGpu) -> str:
        return handle.name

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu) -> _Memory:
        used = sum(
            p.device_bytes
            for p in self._host.processes.values()
            if handle.uuid in p.gpus and p.state != CUprocessState.CU_PROCESS_STATE_CHECKPOINTED
        )
        return _Memory(total=handle.memory_total, used=used, free=handle.memory_total - used)

    def nvmlDeviceGetPersistenceMode(self, handle: FakeGpu) -> int:
        return 1 if handle.persistence_mode else 0

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeGpu) -> list[_ProcessInfo]:
        # A checkpointed process has released the GPU: NVML no longer lists it.
        return [
            _ProcessInfo(pid=p.pid, usedGpuMemory=p.device_bytes)
            for p in self._host.processes.values()
            if handle.uuid in p.gpus and p.state != CUprocessState.CU_PROCESS_STATE_CHECKPOINTED
        ]
