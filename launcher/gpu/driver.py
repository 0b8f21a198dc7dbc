"""A thin typed wrapper over the CUDA driver's checkpoint API (``cuda.bindings.driver``).

    RUNNING --lock--> LOCKED --checkpoint--> CHECKPOINTED --restore--> LOCKED --unlock--> RUNNING

``cuCheckpointProcessLock`` blocks new CUDA calls of another process and waits for its submitted work;
``...Checkpoint`` copies its device memory into its own host memory and releases the GPU (so a CPU
checkpointer captures it); ``...Restore`` puts it back, onto other GPUs when given UUID pairs (driver
r580+); ``...Unlock`` lets its CUDA calls run again. The calling process needs no CUDA context, but a
restore needs persistence mode or ``cuInit`` done in the caller, so ``restore`` calls ``cuInit(0)`` once.

Why the driver API and not NVIDIA's ``cuda-checkpoint`` binary: it is a download we cannot ship, it is one
process per call, and its errors are free text. The API reports a ``CUresult``; every failure is mapped
here, at one boundary (``_call``), to a one-line ``GpuError``. The driver module is injectable: tests pass
a fake with the same functions (``launcher/gpu/fake.py``), everything else gets the real one.

The calls block without a timeout of their own (lock has one; checkpoint, restore and unlock do not) and a
thread cannot be cancelled: ``launcher/gpu/helper.py`` runs this class in a child process so that every
call is bounded, and a call that hangs costs a killed helper rather than a stuck launcher.

Without a driver, ``cuda.bindings`` raises ``DynamicLibNotFoundError`` (a ``RuntimeError``) on the first
call instead of returning an error code; that becomes ``NoNvidiaDriver``.
"""

from __future__ import annotations

import ctypes
import enum
import threading
import uuid as uuid_mod
from collections.abc import Mapping
from typing import Any

from coldstart.launcher.errors import (
    CheckpointUnsupported,
    CudaCallFailed,
    CudaStateError,
    GpuError,
    LockTimeout,
    NoNvidiaDriver,
)

NO_DRIVER_HINT = "no NVIDIA driver on this host (libcuda.so.1 not found): install the NVIDIA driver >= 570"


class CudaProcessState(enum.IntEnum):
    """``CUprocessState``; CHECKPOINTING/RESTORING are transient states of newer drivers."""

    RUNNING = 0
    LOCKED = 1
    CHECKPOINTED = 2
    FAILED = 3
    CHECKPOINTING = 4
    RESTORING = 5

    @property
    def label(self) -> str:
        """The word NVIDIA's ``cuda-checkpoint --get-state`` prints (CRIU's plugin parses it)."""
        return self.name.lower()


# Hints per CUresult name, per call where the cause differs. Unlisted results get the generic line.
_HINTS: dict[tuple[str, str], str] = {
    ("*", "CUDA_ERROR_NOT_INITIALIZED"): "the process has no CUDA context (is it a CUDA process?)",
    ("*", "CUDA_ERROR_INVALID_VALUE"): "no such process, or an invalid argument",
    ("*", "CUDA_ERROR_ILLEGAL_STATE"): "the process is not in the state this step needs",
    ("*", "CUDA_ERROR_NOT_SUPPORTED"): "the driver does not support CUDA checkpoint (need >= 550, r570+)",
    ("*", "CUDA_ERROR_NOT_PERMITTED"): "not permitted: run as root or as the process's owner",
    ("checkpoint", "CUDA_ERROR_NOT_SUPPORTED"): (
        "the process holds memory CUDA checkpoint cannot save (UVM/managed memory, CUDA IPC) "
        "or the driver is too old"
    ),
    (
        "restore",
        "CUDA_ERROR_NOT_SUPPORTED",
    ): "GPU remapping needs driver r580+, or the GPU is of another model",
    ("restore", "CUDA_ERROR_INVALID_DEVICE"): "a target GPU UUID is not on this host",
    ("restore", "CUDA_ERROR_NO_DEVICE"): "no usable GPU to restore onto",
    ("restore", "CUDA_ERROR_OUT_OF_MEMORY"): "the target GPU has not enough free memory",
    ("restore", "CUDA_ERROR_NOT_INITIALIZED"): "enable persistence mode (nvidia-smi -pm 1) and retry",
}
_CALLS = tuple(
    f"cuCheckpointProcess{step}"
    for step in ("GetState", "GetRestoreThreadId", "Lock", "Checkpoint", "Restore", "Unlock")
)
_LOCK_TIMEOUT_RESULTS = frozenset({"CUDA_ERROR_TIMEOUT", "CUDA_ERROR_NOT_READY"})
# The argument structs of the checkpoint API. cuda-bindings 12.x has the calls but not CUcheckpointGpuPair
# (restore onto a GPU by UUID): 13.0 added it, so a 12.x install fails at the first remapped restore.
_STRUCTS = ("CUcheckpointLockArgs", "CUcheckpointRestoreArgs", "CUcheckpointGpuPair", "CUuuid")
UPGRADE_BINDINGS = "pip install 'cuda-bindings>=13,<14' (or 'coldstart[gpu]')"


def uuid_bytes(gpu_uuid: str) -> bytes:
    """``GPU-8a1f...`` (NVML's form) or a bare UUID -> the 16 bytes ``CUuuid`` holds."""
    text = gpu_uuid.strip()
    for prefix in ("GPU-", "MIG-"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    try:
        return uuid_mod.UUID(text).bytes
    except ValueError as exc:
        raise GpuError(
            f"invalid GPU UUID {gpu_uuid!r}: expected GPU-xxxxxxxx-xxxx-... as nvidia-smi -L shows"
        ) from exc


def _load_driver() -> Any:
    try:
        from cuda.bindings import driver
    except ImportError as exc:
        raise CheckpointUnsupported(f"cuda-bindings is not installed: {UPGRADE_BINDINGS}") from exc
    return driver


class CudaCheckpointAPI:
    """The six ``cuCheckpointProcess*`` calls with typed arguments, state guards and mapped errors.

    ``driver`` is ``cuda.bindings.driver`` unless given (a fake with the same interface in tests).
    Calls block (lock waits for in-flight kernels, checkpoint copies device memory): async callers run
    them in a thread.
    """

    def __init__(self, driver: Any | None = None) -> None:
        self._driver = driver
        self._init_lock = threading.Lock()
        self._initialized = False

    @property
    def driver(self) -> Any:
        if self._driver is None:
            self._driver = _load_driver()
        return self._driver

    # -- the one boundary where driver results and exceptions become our errors --------------------

    def _call(self, call: str, pid: int | None, *args: Any) -> tuple[Any, ...]:
        driver = self.driver
        func = getattr(driver, call, None)
        if func is None:
            raise CheckpointUnsupported(f"cuda-bindings has no {call}: {UPGRADE_BINDINGS}")
        try:
            result = func(*args)
        except RuntimeError as exc:
            raise _map_exception(call, exc) from exc
        err = result[0]
        name = getattr(err, "name", str(err))
        if int(err) != 0:
            raise _map_result(call, pid, name)
        return tuple(result[1:])

    def _init_driver(self) -> None:
        """``cuInit(0)`` once in this (the calling) process: restore needs it without persistence mode."""
        with self._init_lock:
            if not self._initialized:
                self._call("cuInit", None, 0)
                self._initialized = True

    def require_checkpoint_api(self) -> None:
        """Raise ``CheckpointUnsupported`` when the bindings lack any ``cuCheckpointProcess*`` call or the
        structs they take (``CUcheckpointGpuPair`` is missing before cuda-bindings 13)."""
        for name in (*_CALLS, *_STRUCTS):
            if getattr(self.driver, name, None) is None:
                version = _bindings_version(self.driver)
                raise CheckpointUnsupported(f"cuda-bindings{version} has no {name}: {UPGRADE_BINDINGS}")

    # -- queries ---------------------------------------------------------------------------------------

    def driver_version(self) -> int:
        """The CUDA version the driver supports, e.g. 12080 for 12.8 (not the display driver version)."""
        (version,) = self._call("cuDriverGetVersion", None)
        return int(version)

    def state(self, pid: int) -> CudaProcessState:
        (state,) = self._call("cuCheckpointProcessGetState", pid, _check_pid(pid))
        try:
            return CudaProcessState(int(state))
        except ValueError as exc:
            raise GpuError(f"pid {pid}: unknown CUDA process state {int(state)}; upgrade coldstart") from exc

    def restore_thread_id(self, pid: int) -> int:
        (tid,) = self._call("cuCheckpointProcessGetRestoreThreadId", pid, _check_pid(pid))
        return int(tid)

    def is_cuda_process(self, pid: int) -> bool:
        """True when the driver knows ``pid`` as a CUDA process (any state); False for others.

        Driver absence still raises: "not a CUDA process" and "cannot tell" must not look alike.
        """
        try:
            self.state(pid)
        except CudaCallFailed as exc:
            if exc.result == "CUDA_ERROR_NOT_SUPPORTED":
                raise CheckpointUnsupported(str(exc)) from exc
            return False
        return True

    # -- transitions -----------------------------------------------------------------------------------

    def lock(self, pid: int, timeout_s: float | None = None) -> None:
        """RUNNING -> LOCKED. ``timeout_s`` (None/0: wait forever) -> ``LockTimeout``, process RUNNING."""
        self.expect(pid, CudaProcessState.RUNNING, "lock")
        args = self.driver.CUcheckpointLockArgs()
        args.timeoutMs = 0 if not timeout_s else max(1, int(timeout_s * 1000))
        self._call("cuCheckpointProcessLock", pid, pid, args)

    def checkpoint(self, pid: int) -> None:
        """LOCKED -> CHECKPOINTED: device memory into the process's host memory, GPU released."""
        self.expect(pid, CudaProcessState.LOCKED, "checkpoint")
        self._call("cuCheckpointProcessCheckpoint", pid, pid, None)

    def restore(
        self, pid: int, gpu_pairs: Mapping[str, str] | None = None, *, explicit: bool = False
    ) -> None:
        """CHECKPOINTED -> LOCKED. ``gpu_pairs`` maps each checkpointed GPU UUID to a target GPU UUID
        and must name every GPU the process used; identical pairs (or None) restore in place, and are
        not passed to the driver unless ``explicit`` (r570 drivers cannot take pairs at all)."""
        self.expect(pid, CudaProcessState.CHECKPOINTED, "restore")
        self._init_driver()
        self._call("cuCheckpointProcessRestore", pid, pid, self._restore_args(gpu_pairs, explicit))

    def unlock(self, pid: int) -> None:
        """LOCKED -> RUNNING."""
        self.expect(pid, CudaProcessState.LOCKED, "unlock")
        self._call("cuCheckpointProcessUnlock", pid, pid, None)

    def expect(self, pid: int, wanted: CudaProcessState, step: str) -> CudaProcessState:
        """Guard: raise ``CudaStateError`` unless ``pid`` is in ``wanted`` state."""
        state = self.state(pid)
        if state is not wanted:
            raise CudaStateError(
                f"cannot {step} CUDA process {pid} in state {state.label} (needs {wanted.label})"
            )
        return state

    def _restore_args(self, gpu_pairs: Mapping[str, str] | None, explicit: bool = False) -> Any:
        # Pairs mapping every GPU onto itself are the same as none, and work on drivers without remap.
        if not gpu_pairs:
            return None
        if not explicit and all(uuid_bytes(a) == uuid_bytes(b) for a, b in gpu_pairs.items()):
            return None
        driver = self.driver
        if getattr(driver, "CUcheckpointGpuPair", None) is None:
            raise CheckpointUnsupported(
                f"restore onto GPU {next(iter(gpu_pairs.values()))} needs CUcheckpointGpuPair, which "
                f"cuda-bindings{_bindings_version(driver)} lacks: {UPGRADE_BINDINGS}"
            )
        pairs = []
        for old, new in gpu_pairs.items():
            pair = driver.CUcheckpointGpuPair()
            pair.oldUuid = _cu_uuid(driver, old)
            pair.newUuid = _cu_uuid(driver, new)
            pairs.append(pair)
        args = driver.CUcheckpointRestoreArgs()
        args.gpuPairs = pairs
        args.gpuPairsCount = len(pairs)
        return args


def _cu_uuid(driver: Any, gpu_uuid: str) -> Any:
    """A ``CUuuid`` that owns its 16 bytes.

    ``CUuuid.bytes`` is read-only. ``CUuuid(_ptr=addr)`` would not copy: it reads ``addr`` for as long as it
    lives, so a ctypes buffer freed on return leaves it pointing at freed memory. Instead the struct is
    made with its own storage and the bytes are written into it (``getPtr()`` is its address).
    """
    raw = uuid_bytes(gpu_uuid)
    cu_uuid = driver.CUuuid()
    ctypes.memmove(int(cu_uuid.getPtr()), raw, len(raw))
    if bytes(cu_uuid.bytes) != raw:  # a bindings change we have not seen: fail here, not in the driver
        raise GpuError(f"could not build a CUuuid for {gpu_uuid}: upgrade coldstart")
    return cu_uuid


def _bindings_version(driver: Any) -> str:
    """`` 12.9.0`` (with a leading space) for the real bindings, for error messages; ``""`` otherwise."""
    if getattr(driver, "__name__", "") != "cuda.bindings.driver":
        return ""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f" {version('cuda-bindings')}"
    except PackageNotFoundError:
        return ""


def _check_pid(pid: int) -> int:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        raise GpuError(f"invalid pid {pid!r}: expected a positive process id")
    return pid


def _map_exception(call: str, exc: RuntimeError) -> GpuError:
    text = str(exc)
    first_line = text.splitlines()[0] if text else type(exc).__name__
    if type(exc).__name__ == "DynamicLibNotFoundError" or "driver library" in text or "libcuda" in text:
        return NoNvidiaDriver(NO_DRIVER_HINT)
    if call in text and "not found" in text:
        return CheckpointUnsupported(
            f"the NVIDIA driver has no {call}: upgrade the driver to >= 570 for CUDA checkpoint"
        )
    return GpuError(f"{call} failed: {first_line}")


def _map_result(call: str, pid: int | None, result: str) -> CudaCallFailed:
    step = call.removeprefix("cuCheckpointProcess").lower()
    target = f" for pid {pid}" if pid is not None else ""
    if step == "lock" and result in _LOCK_TIMEOUT_RESULTS:
        return LockTimeout(
            f"CUDA lock of pid {pid} timed out ({result}): the engine is still running and the snapshot "
            "was aborted; let in-flight requests finish (or raise the lock timeout) and retry",
            call=call,
            pid=pid,
            result=result,
        )
    hint = _HINTS.get((step, result)) or _HINTS.get(("*", result)) or "see the NVIDIA driver log (dmesg)"
    return CudaCallFailed(f"{call}{target} failed with {result}: {hint}", call=call, pid=pid, result=result)
