"""The bounded driver calls (``launcher/gpu/helper.py``): a real helper process over a simulated GPU host
(state machine, errors crossing the pipe as the same classes, a call that never returns is cut off and
the helper replaced), and over the real cuda-bindings without a driver."""

from __future__ import annotations

import ctypes.util
import os
import time

import pytest

from coldstart.launcher.errors import (
    CheckpointUnsupported,
    CudaCallFailed,
    CudaCallTimeout,
    CudaStateError,
    LockTimeout,
    NoNvidiaDriver,
)
from coldstart.launcher.gpu.driver import CudaProcessState
from coldstart.launcher.gpu.fake import FakeGpuHost
from coldstart.launcher.gpu.helper import CallBounds, HelperCudaAPI

PID = 4242

no_driver = pytest.mark.skipif(
    bool(ctypes.util.find_library("cuda")),
    reason="an NVIDIA driver is installed here; the no-driver mapping is tested where there is none",
)


@pytest.fixture
def host() -> FakeGpuHost:
    h = FakeGpuHost.with_gpus("NVIDIA H100 80GB HBM3", count=2, driver_version="580.159.04")
    h.add_process(PID, gpus=[h.gpus[0].uuid])
    return h


def helper(host: FakeGpuHost, **bounds: float) -> HelperCudaAPI:
    return HelperCudaAPI(CallBounds(**bounds), fake_host_spec=host.to_spec())


def test_full_cycle_through_the_helper(host: FakeGpuHost) -> None:
    api = helper(host)
    try:
        api.require_checkpoint_api()
        assert api.driver_version() == 12080
        assert api.is_cuda_process(PID) and not api.is_cuda_process(PID + 1)
        api.lock(PID, 5)
        api.checkpoint(PID)
        assert api.state(PID) is CudaProcessState.CHECKPOINTED
        api.restore(PID, {host.gpus[0].uuid: host.gpus[1].uuid})
        api.unlock(PID)
        assert api.state(PID) is CudaProcessState.RUNNING
        assert api.restore_thread_id(PID) == PID + 1
        with pytest.raises(CudaStateError, match=f"cannot unlock CUDA process {PID} in state running"):
            api.unlock(PID)
    finally:
        api.close()


def test_errors_cross_as_the_same_classes(host: FakeGpuHost) -> None:
    host.fail("lock", "CUDA_ERROR_TIMEOUT", pid=PID)
    host.fail("checkpoint", "CUDA_ERROR_NOT_SUPPORTED", pid=PID)
    api = helper(host)
    try:
        with pytest.raises(LockTimeout, match="snapshot was aborted") as info:
            api.lock(PID, 1)
        assert (info.value.call, info.value.pid, info.value.result) == (
            "cuCheckpointProcessLock",
            PID,
            "CUDA_ERROR_TIMEOUT",
        )
        api.lock(PID, 1)
        with pytest.raises(CudaCallFailed, match="UVM/managed memory"):
            api.checkpoint(PID)
        api.unlock(PID)  # never left locked
        assert api.state(PID) is CudaProcessState.RUNNING
    finally:
        api.close()


def test_a_call_that_never_returns_is_cut_off_and_the_helper_replaced(host: FakeGpuHost) -> None:
    host.hang.add("restore")
    api = helper(host, restore_s=1.0)
    try:
        api.lock(PID, 1)
        api.checkpoint(PID)
        first = api._proc
        assert first is not None
        t0 = time.monotonic()
        with pytest.raises(CudaCallTimeout, match=f"CUDA restore of pid {PID} did not return within 1 s"):
            api.restore(PID)
        assert time.monotonic() - t0 < 10
        assert first.poll() is not None  # killed and reaped
        assert api._proc is None
        # The next call gets a fresh helper (here: the simulated host as first described).
        assert api.state(PID) is CudaProcessState.RUNNING
        assert api._proc is not None and api._proc.pid != first.pid
    finally:
        api.close()


def test_close_ends_the_helper(host: FakeGpuHost) -> None:
    api = helper(host)
    api.start()
    proc = api._proc
    assert proc is not None
    api.close()
    assert proc.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)


def test_bindings_without_the_api_through_the_helper() -> None:
    api = helper(FakeGpuHost.with_gpus(has_checkpoint_api=False))
    try:
        with pytest.raises(CheckpointUnsupported, match="has no cuCheckpointProcessGetState"):
            api.require_checkpoint_api()
    finally:
        api.close()


@no_driver
def test_real_bindings_without_driver_through_the_helper() -> None:
    api = HelperCudaAPI()
    try:
        api.require_checkpoint_api()  # cuda-bindings 13 here: the structs and calls exist
        with pytest.raises(NoNvidiaDriver, match="^no NVIDIA driver on this host"):
            api.state(1)
        with pytest.raises(NoNvidiaDriver):
            api.driver_version()
    finally:
        api.close()
