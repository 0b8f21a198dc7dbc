"""The CUDA checkpoint API wrapper against a fake driver (state machine, guards, every error mapping), and
against the real ``cuda.bindings`` without a driver (this machine has none)."""

from __future__ import annotations

import ctypes
import ctypes.util

import pytest

from coldstart.launcher.errors import (
    CheckpointUnsupported,
    CudaCallFailed,
    CudaStateError,
    GpuError,
    LockTimeout,
    NoNvidiaDriver,
)
from coldstart.launcher.gpu.driver import (
    CudaCheckpointAPI,
    CudaProcessState,
    _cu_uuid,
    _map_result,
    uuid_bytes,
)
from coldstart.launcher.gpu.fake import CUresult, FakeGpuHost

PID = 4242

# These use the real cuda-bindings/pynvml and expect no NVIDIA driver (as on CI and the dev box).
no_driver = pytest.mark.skipif(
    bool(ctypes.util.find_library("cuda") or ctypes.util.find_library("nvidia-ml")),
    reason="an NVIDIA driver is installed here; the no-driver error mapping is tested where there is none",
)


@pytest.fixture
def host() -> FakeGpuHost:
    h = FakeGpuHost.with_gpus("NVIDIA H200", count=2, driver_version="580.65.06")
    h.add_process(PID, gpus=[h.gpus[0].uuid])
    return h


def test_full_cycle_in_place(host: FakeGpuHost) -> None:
    api = CudaCheckpointAPI(host.driver)
    assert api.state(PID) is CudaProcessState.RUNNING
    api.lock(PID, timeout_s=5)
    assert api.state(PID) is CudaProcessState.LOCKED
    api.checkpoint(PID)
    assert api.state(PID) is CudaProcessState.CHECKPOINTED
    api.restore(PID)
    assert api.state(PID) is CudaProcessState.LOCKED
    api.unlock(PID)
    assert api.state(PID) is CudaProcessState.RUNNING
    assert host.transitions(PID) == ["lock", "checkpoint", "restore", "unlock"]
    assert ("Init", None) in host.calls  # restore needs cuInit in the caller


def test_restore_onto_other_gpu_by_uuid(host: FakeGpuHost) -> None:
    api = CudaCheckpointAPI(host.driver)
    old, new = host.gpus[0].uuid, host.gpus[1].uuid
    api.lock(PID)
    api.checkpoint(PID)
    api.restore(PID, {old: new})
    api.unlock(PID)
    assert host.processes[PID].gpus == [new]


def test_identity_pairs_restore_in_place_without_remap(host: FakeGpuHost) -> None:
    api = CudaCheckpointAPI(host.driver)
    uuid = host.gpus[0].uuid
    api.lock(PID)
    api.checkpoint(PID)
    assert api._restore_args({uuid: uuid}) is None  # works on r570 drivers, which cannot remap
    assert api._restore_args({uuid: uuid}, explicit=True).gpuPairsCount == 1
    api.restore(PID, {uuid: uuid})
    assert host.processes[PID].gpus == [uuid]


def test_real_bindings_build_gpu_pairs() -> None:
    """The real cuda.bindings structs accept our UUIDs (CUuuid.bytes is read-only: written via getPtr)."""
    from cuda.bindings import driver

    api = CudaCheckpointAPI(driver)
    a, b = "GPU-12345678-1234-1234-1234-123456789abc", "GPU-87654321-4321-4321-4321-cba987654321"
    args = api._restore_args({a: b})
    assert args.gpuPairsCount == 1
    assert args.gpuPairs[0].oldUuid.bytes == uuid_bytes(a)
    assert args.gpuPairs[0].newUuid.bytes == uuid_bytes(b)
    lock_args = driver.CUcheckpointLockArgs()
    lock_args.timeoutMs = 1500
    assert lock_args.timeoutMs == 1500


def test_cu_uuid_owns_its_bytes() -> None:
    """A ``CUuuid(_ptr=...)`` over a temporary buffer reads freed memory once the buffer goes; ours must
    hold its 16 bytes after everything it was made from is gone and the heap has been reused."""
    import gc

    from cuda.bindings import driver

    text = "GPU-12345678-1234-1234-1234-123456789abc"
    made = [_cu_uuid(driver, text) for _ in range(50)]
    gc.collect()
    noise = [ctypes.create_string_buffer(b"\xff" * 16, 16) for _ in range(5000)]
    assert all(u.bytes == uuid_bytes(text) for u in made)
    pair = driver.CUcheckpointGpuPair()
    pair.oldUuid = made[0]
    del made, noise
    gc.collect()
    assert pair.oldUuid.bytes == uuid_bytes(text)


@pytest.mark.parametrize(
    "missing", ["CUcheckpointGpuPair", "CUcheckpointRestoreArgs", "cuCheckpointProcessLock"]
)
def test_bindings_older_than_13_are_refused_up_front(missing: str) -> None:
    """cuda-bindings 12.x has the calls but not CUcheckpointGpuPair: say so before the first remap."""
    host = FakeGpuHost.with_gpus()
    driver = host.driver
    setattr(driver, missing, None)
    with pytest.raises(CheckpointUnsupported, match=f"has no {missing}: pip install 'cuda-bindings>=13,<14'"):
        CudaCheckpointAPI(driver).require_checkpoint_api()


def test_remap_without_gpu_pair_struct_is_one_line_error(host: FakeGpuHost) -> None:
    driver = host.driver
    driver.CUcheckpointGpuPair = None  # type: ignore[assignment,misc]
    api = CudaCheckpointAPI(driver)
    api.lock(PID)
    api.checkpoint(PID)
    with pytest.raises(CheckpointUnsupported, match="needs CUcheckpointGpuPair"):
        api.restore(PID, {host.gpus[0].uuid: host.gpus[1].uuid})
    api.restore(PID)  # in place needs no pairs: still works
    assert api.state(PID) is CudaProcessState.LOCKED


@pytest.mark.parametrize(
    ("step", "state"),
    [
        ("checkpoint", "RUNNING"),
        ("restore", "RUNNING"),
        ("unlock", "RUNNING"),
        ("lock", "LOCKED"),
        ("restore", "LOCKED"),
        ("lock", "CHECKPOINTED"),
        ("checkpoint", "CHECKPOINTED"),
        ("unlock", "CHECKPOINTED"),
    ],
)
def test_guards_refuse_wrong_state_before_calling_the_driver(
    host: FakeGpuHost, step: str, state: str
) -> None:
    from coldstart.launcher.gpu.fake import CUprocessState

    host.processes[PID].state = CUprocessState[f"CU_PROCESS_STATE_{state}"]
    api = CudaCheckpointAPI(host.driver)
    with pytest.raises(CudaStateError, match=f"cannot {step} CUDA process {PID} in state {state.lower()}"):
        getattr(api, step)(PID)
    assert host.transitions(PID) == []


def test_lock_timeout_leaves_process_running(host: FakeGpuHost) -> None:
    host.processes[PID].busy = True
    api = CudaCheckpointAPI(host.driver)
    with pytest.raises(LockTimeout, match="still running and the snapshot was aborted") as info:
        api.lock(PID, timeout_s=0.5)
    assert info.value.result == "CUDA_ERROR_TIMEOUT"
    assert api.state(PID) is CudaProcessState.RUNNING


def test_lock_not_ready_is_a_timeout_too(host: FakeGpuHost) -> None:
    host.fail("lock", "CUDA_ERROR_NOT_READY", pid=PID)
    with pytest.raises(LockTimeout):
        CudaCheckpointAPI(host.driver).lock(PID, timeout_s=1)


@pytest.mark.parametrize(
    ("call", "result", "message"),
    [
        ("checkpoint", "CUDA_ERROR_NOT_SUPPORTED", "UVM/managed memory"),
        ("checkpoint", "CUDA_ERROR_ILLEGAL_STATE", "not in the state this step needs"),
        ("restore", "CUDA_ERROR_OUT_OF_MEMORY", "not enough free memory"),
        ("restore", "CUDA_ERROR_INVALID_DEVICE", "not on this host"),
        ("restore", "CUDA_ERROR_NOT_INITIALIZED", "persistence mode"),
        ("unlock", "CUDA_ERROR_UNKNOWN", "dmesg"),
        ("lock", "CUDA_ERROR_NOT_PERMITTED", "run as root"),
    ],
)
def test_driver_errors_become_one_line_errors(
    host: FakeGpuHost, call: str, result: str, message: str
) -> None:
    api = CudaCheckpointAPI(host.driver)
    if call in ("checkpoint", "unlock"):
        api.lock(PID)
    if call == "restore":
        api.lock(PID)
        api.checkpoint(PID)
    host.fail(call, result, pid=PID)
    with pytest.raises(CudaCallFailed, match=message) as info:
        getattr(api, call)(PID)
    text = str(info.value)
    assert "\n" not in text and result in text and str(PID) in text
    assert info.value.result == result


def test_every_cuda_result_has_a_one_line_message() -> None:
    """The mapping exists for every CUresult the driver may return: none crashes or goes multi-line."""
    from cuda.bindings import driver

    for member in driver.CUresult:
        if member.name == "CUDA_SUCCESS":
            continue
        for call in ("cuCheckpointProcessLock", "cuCheckpointProcessRestore", "cuCheckpointProcessGetState"):
            err = _map_result(call, 7, member.name)
            assert isinstance(err, CudaCallFailed)
            assert "\n" not in str(err) and member.name in str(err)


def test_is_cuda_process(host: FakeGpuHost) -> None:
    api = CudaCheckpointAPI(host.driver)
    assert api.is_cuda_process(PID)
    assert not api.is_cuda_process(PID + 1)  # CUDA_ERROR_NOT_FOUND: not a CUDA process
    host.fail("GetState", "CUDA_ERROR_NOT_SUPPORTED")
    with pytest.raises(CheckpointUnsupported):  # "cannot tell" must not read as "not CUDA"
        api.is_cuda_process(PID)


def test_restore_thread_id(host: FakeGpuHost) -> None:
    assert CudaCheckpointAPI(host.driver).restore_thread_id(PID) == PID + 1


def test_bindings_without_checkpoint_api() -> None:
    host = FakeGpuHost.with_gpus(has_checkpoint_api=False)
    with pytest.raises(CheckpointUnsupported, match="cuda-bindings has no cuCheckpointProcessGetState"):
        CudaCheckpointAPI(host.driver).state(1)


def test_fake_without_driver_maps_like_the_real_one() -> None:
    host = FakeGpuHost.with_gpus(driver_installed=False)
    with pytest.raises(NoNvidiaDriver, match="no NVIDIA driver"):
        CudaCheckpointAPI(host.driver).state(1)


@no_driver
def test_real_cuda_bindings_without_driver_is_one_line_error() -> None:
    """This machine has no NVIDIA driver: cuda.bindings raises DynamicLibNotFoundError on the first call."""
    api = CudaCheckpointAPI()  # the real cuda.bindings.driver
    for call in (
        lambda: api.state(1),
        lambda: api.lock(1),
        api.driver_version,
        lambda: api.is_cuda_process(1),
    ):
        with pytest.raises(NoNvidiaDriver) as info:
            call()
        assert str(info.value).startswith("no NVIDIA driver on this host")
        assert "\n" not in str(info.value)
        assert isinstance(info.value.__cause__, RuntimeError)


@pytest.mark.parametrize("bad", ["GPU-xyz", "", "12345"])
def test_bad_uuid(bad: str) -> None:
    with pytest.raises(GpuError, match="invalid GPU UUID"):
        uuid_bytes(bad)


def test_bad_pid(host: FakeGpuHost) -> None:
    with pytest.raises(GpuError, match="invalid pid"):
        CudaCheckpointAPI(host.driver).state(0)


def test_fake_result_values_match_the_real_enum() -> None:
    from cuda.bindings import driver

    for member in CUresult:
        assert int(getattr(driver.CUresult, member.name)) == int(member), member.name
