"""The CUDA checkpointer's whole sequence against a fake GPU host: order of calls, the state each step
expects, and every failure path (lock timeout, driver errors, CPU checkpoint failure, gate refusals,
CUDA restore failure). The CPU checkpointer here is a recording stand-in that behaves like CRIU towards
CUDA: it saves whatever state the processes are in and restores them CHECKPOINTED under new PIDs."""

from __future__ import annotations

import asyncio
import ctypes.util
import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from coldstart.engine_adapters.base import LaunchSpec
from coldstart.launcher.checkpointers.base import Checkpointer, CheckpointerInfo
from coldstart.launcher.checkpointers.cuda import (
    CUDA_INFO_FILE,
    CudaCheckpointer,
    CudaOptions,
    CudaSnapshotInfo,
    refuse_unsupported_engine_args,
    sandbox_host_pids,
)
from coldstart.launcher.errors import (
    CheckpointerUnavailable,
    CudaCallFailed,
    CudaStateError,
    GpuError,
    GpuRefused,
    LockTimeout,
    RestoreFailed,
    SnapshotError,
)
from coldstart.launcher.gpu.driver import CudaCheckpointAPI
from coldstart.launcher.gpu.fake import CUprocessState, FakeGpuHost
from coldstart.launcher.process import process_tree
from coldstart.launcher.sandboxes.base import Sandbox

ENGINE, WORKER = 1000, 1001
_new_pids = itertools.count(5000)

# These use the real cuda-bindings/pynvml and expect no NVIDIA driver (as on CI and the dev box).
no_driver = pytest.mark.skipif(
    bool(ctypes.util.find_library("cuda") or ctypes.util.find_library("nvidia-ml")),
    reason="an NVIDIA driver is installed here; the no-driver error mapping is tested where there is none",
)


class FakeSandbox(Sandbox):
    def __init__(self, host: FakeGpuHost, pids: list[int], events: list[tuple]) -> None:
        self._host, self._pids, self._events = host, pids, events
        self.stopped = False

    base_url = "http://127.0.0.1:1"
    bind_host = "127.0.0.1"
    bind_port = 1

    def host_pids(self) -> list[int]:
        return list(self._pids)

    async def start(self, spec: LaunchSpec) -> None:
        pass

    def exit_code(self) -> int | None:
        return None

    def log_tail(self, lines: int = 20) -> str:
        return ""

    async def stop(self, grace_s: float = 10.0) -> None:
        self.stopped = True
        self._events.append(("stop", tuple(self._pids)))
        for pid in self._pids:
            self._host.processes.pop(pid, None)


class RecordingCpu(Checkpointer):
    """CRIU as the CUDA layer sees it: saves the tree as is; restores it with CUDA CHECKPOINTED."""

    name = "fakecpu"

    def __init__(self, host: FakeGpuHost) -> None:
        self.host = host
        self.events: list[tuple] = []
        self.fail_checkpoint = False
        self.fail_restore = False
        self.restore_state = CUprocessState.CU_PROCESS_STATE_CHECKPOINTED

    def probe(self) -> CheckpointerInfo:
        return CheckpointerInfo("fakecpu", "1.0", frozenset({"leave-running"}))

    def new_sandbox(self, workdir: Path, replica_id: str) -> Sandbox:
        return FakeSandbox(self.host, [], self.events)

    async def checkpoint(self, sandbox: Sandbox, image_dir: Path, *, leave_running: bool) -> None:
        pids = sandbox.host_pids()  # type: ignore[attr-defined]
        states = {pid: self.host.state(pid) for pid in pids if pid in self.host.processes}
        self.events.append(("cpu_checkpoint", states))
        if self.fail_checkpoint:
            raise SnapshotError("criu dump failed: (fake) Can't dump socket")
        saved = {str(pid): self.host.processes[pid].gpus for pid in pids if pid in self.host.processes}
        (image_dir / "pages.img").write_text(json.dumps(saved))
        if not leave_running:
            for pid in pids:
                self.host.processes.pop(pid, None)

    async def restore(self, image_dir: Path, workdir: Path, replica_id: str) -> Sandbox:
        self.events.append(("cpu_restore", replica_id))
        if self.fail_restore:
            raise RestoreFailed("checkpointer", "criu restore failed: (fake)")
        saved = json.loads((image_dir / "pages.img").read_text())
        pids = []
        for gpus in saved.values():
            pid = next(_new_pids)
            self.host.add_process(pid, gpus=gpus, state=self.restore_state)
            pids.append(pid)
        return FakeSandbox(self.host, pids, self.events)


@pytest.fixture
def host() -> FakeGpuHost:
    h = FakeGpuHost.with_gpus("NVIDIA H200", count=2, driver_version="580.65.06")
    h.add_process(ENGINE, gpus=[h.gpus[0].uuid], device_bytes=3 << 30)
    return h


@pytest.fixture
def cpu(host: FakeGpuHost) -> RecordingCpu:
    return RecordingCpu(host)


def make(host: FakeGpuHost, cpu: RecordingCpu, **options: object) -> CudaCheckpointer:
    return CudaCheckpointer(cpu, CudaCheckpointAPI(host.driver), host.nvml, CudaOptions(**options))  # type: ignore[arg-type]


def engine(host: FakeGpuHost, cpu: RecordingCpu, *pids: int) -> FakeSandbox:
    return FakeSandbox(host, list(pids or (ENGINE,)), cpu.events)


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)


# -- checkpoint ------------------------------------------------------------------------------------


def test_checkpoint_leave_running_order_and_states(
    host: FakeGpuHost, cpu: RecordingCpu, tmp_path: Path
) -> None:
    run(make(host, cpu).checkpoint(engine(host, cpu), tmp_path, leave_running=True))
    # lock -> checkpoint -> CPU checkpoint (sees CHECKPOINTED) -> restore in place -> unlock
    assert host.transitions(ENGINE) == ["lock", "checkpoint", "restore", "unlock"]
    assert cpu.events == [("cpu_checkpoint", {ENGINE: "checkpointed"})]
    assert host.state(ENGINE) == "running"
    assert host.processes[ENGINE].gpus == [host.gpus[0].uuid]
    info = CudaSnapshotInfo.from_json((tmp_path / CUDA_INFO_FILE).read_text())
    assert info.gpu.uuid == host.gpus[0].uuid and info.gpu.name == "NVIDIA H200"
    assert info.driver_version == "580.65.06" and info.device_bytes == 3 << 30
    assert {"cuda_lock", "cuda_checkpoint", "cpu_checkpoint"} <= set(info.timings)


def test_checkpoint_without_leave_running_does_not_resume(
    host: FakeGpuHost, cpu: RecordingCpu, tmp_path: Path
) -> None:
    run(make(host, cpu).checkpoint(engine(host, cpu), tmp_path, leave_running=False))
    assert host.transitions(ENGINE) == ["lock", "checkpoint"]
    assert ENGINE not in host.processes  # the CPU checkpointer ended it


def test_two_processes_on_one_gpu_are_locked_all_before_any_checkpoint(
    host: FakeGpuHost, cpu: RecordingCpu, tmp_path: Path
) -> None:
    host.add_process(WORKER, gpus=[host.gpus[0].uuid], device_bytes=1 << 30)
    run(make(host, cpu).checkpoint(engine(host, cpu, ENGINE, WORKER, 77), tmp_path, leave_running=True))
    assert [c for c, _ in host.calls if c != "GetState"] == [
        "lock", "lock", "checkpoint", "checkpoint", "Init", "restore", "unlock", "restore", "unlock",
    ]  # fmt: skip
    assert cpu.events == [("cpu_checkpoint", {ENGINE: "checkpointed", WORKER: "checkpointed"})]
    assert host.state(ENGINE) == host.state(WORKER) == "running"


def test_lock_timeout_aborts_and_leaves_engine_running(
    host: FakeGpuHost, cpu: RecordingCpu, tmp_path: Path
) -> None:
    host.add_process(WORKER, gpus=[host.gpus[0].uuid])
    host.processes[WORKER].busy = True  # its kernels never finish within the timeout
    with pytest.raises(LockTimeout, match="still running and the snapshot was aborted"):
        run(
            make(host, cpu, lock_timeout_s=0.1).checkpoint(
                engine(host, cpu, ENGINE, WORKER), tmp_path, leave_running=True
            )
        )
    assert host.transitions(ENGINE) == ["lock", "unlock"]  # the one already locked is let go
    assert host.state(ENGINE) == host.state(WORKER) == "running"
    assert cpu.events == []  # no CPU checkpoint
    assert not (tmp_path / CUDA_INFO_FILE).exists()


def test_driver_checkpoint_error_restores_in_place(
    host: FakeGpuHost, cpu: RecordingCpu, tmp_path: Path
) -> None:
    host.fail("checkpoint", "CUDA_ERROR_NOT_SUPPORTED", pid=ENGINE)
    with pytest.raises(CudaCallFailed, match="UVM/managed memory"):
        run(make(host, cpu).checkpoint(engine(host, cpu), tmp_path, leave_running=True))
    assert host.transitions(ENGINE) == ["lock", "checkpoint", "unlock"]
    assert host.state(ENGINE) == "running" and cpu.events == []


def test_cpu_checkpoint_failure_restores_original_in_place(
    host: FakeGpuHost, cpu: RecordingCpu, tmp_path: Path
) -> None:
    cpu.fail_checkpoint = True
    with pytest.raises(SnapshotError, match="criu dump failed"):
        run(make(host, cpu).checkpoint(engine(host, cpu), tmp_path, leave_running=True))
    assert host.transitions(ENGINE) == ["lock", "checkpoint", "restore", "unlock"]
    assert host.state(ENGINE) == "running"
    assert host.processes[ENGINE].gpus == [host.gpus[0].uuid]
    assert not (tmp_path / CUDA_INFO_FILE).exists()


def test_resume_failure_after_saving_says_replace_the_replica(
    host: FakeGpuHost, cpu: RecordingCpu, tmp_path: Path
) -> None:
    host.fail("restore", "CUDA_ERROR_OUT_OF_MEMORY", pid=ENGINE)
    sandbox = engine(host, cpu)
    with pytest.raises(GpuError, match="snapshot saved but the engine did not resume.*stopped: replace"):
        run(make(host, cpu).checkpoint(sandbox, tmp_path, leave_running=True))
    assert (tmp_path / CUDA_INFO_FILE).exists()
    assert sandbox.stopped  # not left CHECKPOINTED/LOCKED, where its requests would hang


def test_abort_that_cannot_resume_stops_the_engine(
    host: FakeGpuHost, cpu: RecordingCpu, tmp_path: Path
) -> None:
    cpu.fail_checkpoint = True
    host.fail("unlock", "CUDA_ERROR_UNKNOWN", pid=ENGINE)
    sandbox = engine(host, cpu)
    with pytest.raises(SnapshotError, match="criu dump failed"):
        run(make(host, cpu).checkpoint(sandbox, tmp_path, leave_running=True))
    assert host.transitions(ENGINE) == ["lock", "checkpoint", "restore", "unlock"]
    assert sandbox.stopped and ENGINE not in host.processes


def test_device_files_still_held_refuse_the_dump_and_resume(
    host: FakeGpuHost, cpu: RecordingCpu, tmp_path: Path
) -> None:
    """NVML in the engine keeps /dev/nvidiactl open after the CUDA checkpoint: named, no dump, resumed.
    A real process holds a file open and mapped under a stand-in prefix (this host has no /dev/nvidia*)."""
    devdir = tmp_path / "dev"
    devdir.mkdir()
    ctl = devdir / "nvidiactl"
    ctl.write_bytes(b"\0" * 4096)
    script = (
        "import mmap, sys; f = open(sys.argv[1], 'r+b'); m = mmap.mmap(f.fileno(), 4096); "
        "print(f.fileno(), flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(ctl)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        fd = int(holder.stdout.readline())
        sandbox = engine(host, cpu, ENGINE, holder.pid)
        image = tmp_path / "image"
        image.mkdir()
        checkpointer = make(host, cpu, device_prefix=str(devdir))
        with pytest.raises(GpuRefused, match="still holds GPU device files") as info:
            run(checkpointer.checkpoint(sandbox, image, leave_running=True))
        text = str(info.value)
        assert f"pid {holder.pid} fd {fd} {ctl}" in text and f"pid {holder.pid} maps {ctl}" in text
        assert "\n" not in text
        assert cpu.events == []  # no dump
        assert host.transitions(ENGINE) == ["lock", "checkpoint", "restore", "unlock"]
        assert host.state(ENGINE) == "running" and not sandbox.stopped
    finally:
        holder.kill()
        holder.wait()
        for stream in (holder.stdin, holder.stdout):
            if stream is not None:
                stream.close()


def test_criu_runs_without_its_own_cuda_plugin(
    host: FakeGpuHost, cpu: RecordingCpu, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CRIU's cuda_plugin.so would restore + unlock the process itself: every CRIU we run gets an empty
    plugin folder (``--libdir``, as the CPU checkpointer's ``plugin_dir``), for the dump and for the
    restore; the launcher's own environment is left alone."""
    import coldstart.launcher.checkpointers.cuda as cuda_mod

    empty = tmp_path / "no-plugins"
    monkeypatch.setattr(cuda_mod, "NO_PLUGINS_DIR", empty)
    monkeypatch.setenv("CRIU_LIBS_DIR", "/usr/lib/criu")
    seen: list[str | None] = []
    checkpoint, restore = cpu.checkpoint, cpu.restore

    async def spy_checkpoint(*args: object, **kwargs: object) -> None:
        seen.append(str(cpu.plugin_dir))
        await checkpoint(*args, **kwargs)  # type: ignore[arg-type]

    async def spy_restore(*args: object) -> Sandbox:
        seen.append(str(cpu.plugin_dir))
        return await restore(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(cpu, "checkpoint", spy_checkpoint)
    monkeypatch.setattr(cpu, "restore", spy_restore)
    checkpointer = make(host, cpu)
    run(checkpointer.checkpoint(engine(host, cpu), tmp_path, leave_running=False))
    run(checkpointer.restore(tmp_path, tmp_path, "r2"))
    assert seen == [str(empty), str(empty)]
    assert os.environ["CRIU_LIBS_DIR"] == "/usr/lib/criu"
    assert empty.is_dir() and list(empty.iterdir()) == []


def test_refuses_an_engine_on_two_gpus(host: FakeGpuHost, cpu: RecordingCpu, tmp_path: Path) -> None:
    host.processes[ENGINE].gpus = [g.uuid for g in host.gpus]
    with pytest.raises(GpuRefused, match="uses 2 GPUs.*tensor parallel > 1"):
        run(make(host, cpu).checkpoint(engine(host, cpu), tmp_path, leave_running=True))
    assert host.transitions() == [] and host.state(ENGINE) == "running"


def test_refuses_a_tree_without_cuda(host: FakeGpuHost, cpu: RecordingCpu, tmp_path: Path) -> None:
    with pytest.raises(GpuRefused, match="no CUDA process"):
        run(make(host, cpu).checkpoint(engine(host, cpu, 31337), tmp_path, leave_running=True))


def test_refuses_old_driver(cpu: RecordingCpu, tmp_path: Path) -> None:
    old = FakeGpuHost.with_gpus(driver_version="535.183.01")
    old.add_process(ENGINE, gpus=[old.gpus[0].uuid])
    cpu.host = old
    with pytest.raises(GpuRefused, match="535.183.01 has no CUDA checkpoint API"):
        run(make(old, cpu).checkpoint(engine(old, cpu), tmp_path, leave_running=True))
    assert old.transitions() == []


def test_process_not_running_is_refused_before_any_lock(
    host: FakeGpuHost, cpu: RecordingCpu, tmp_path: Path
) -> None:
    host.add_process(WORKER, gpus=[host.gpus[0].uuid], state=CUprocessState.CU_PROCESS_STATE_LOCKED)
    with pytest.raises(CudaStateError, match=f"cannot lock CUDA process {WORKER} in state locked"):
        run(make(host, cpu).checkpoint(engine(host, cpu, ENGINE, WORKER), tmp_path, leave_running=True))
    assert host.transitions() == []


# -- restore ---------------------------------------------------------------------------------------


@pytest.fixture
def snapshot(host: FakeGpuHost, cpu: RecordingCpu, tmp_path: Path) -> Path:
    image = tmp_path / "image"
    image.mkdir()
    run(make(host, cpu).checkpoint(engine(host, cpu), image, leave_running=True))
    host.calls.clear()
    cpu.events.clear()
    return image


def test_restore_on_the_snapshot_gpu(
    host: FakeGpuHost, cpu: RecordingCpu, snapshot: Path, tmp_path: Path
) -> None:
    sandbox = run(make(host, cpu).restore(snapshot, tmp_path, "r1"))
    (pid,) = sandbox.host_pids()
    assert cpu.events == [("cpu_restore", "r1")]
    assert host.transitions(pid) == ["restore", "unlock"]
    assert host.state(pid) == "running" and host.processes[pid].gpus == [host.gpus[0].uuid]
    assert host.state(ENGINE) == "running"  # the original is untouched


def test_restore_onto_another_gpu_by_uuid(
    host: FakeGpuHost, cpu: RecordingCpu, snapshot: Path, tmp_path: Path
) -> None:
    target = host.gpus[1].uuid
    checkpointer = make(host, cpu)
    sandbox = run(checkpointer.restore_onto(snapshot, tmp_path, "r2", target))
    (pid,) = sandbox.host_pids()
    assert host.processes[pid].gpus == [target]
    assert host.state(pid) == "running"
    assert {"cpu_restore", "cuda_restore", "cuda_unlock"} <= set(checkpointer.last_timings)


def test_restore_target_from_options(
    host: FakeGpuHost, cpu: RecordingCpu, snapshot: Path, tmp_path: Path
) -> None:
    target = host.gpus[1].uuid
    sandbox = run(make(host, cpu, target_gpu=target).restore(snapshot, tmp_path, "r3"))
    assert host.processes[sandbox.host_pids()[0]].gpus == [target]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("model", "GPU model NVIDIA A100.*!= snapshot's NVIDIA H200"),
        ("driver", "NVIDIA driver 580.95.05 != snapshot's 580.65.06"),
        ("missing", "is not on this host"),
        ("old_remap", "needs driver r580"),
    ],
)
def test_restore_gate_refuses_before_cpu_restore(
    host: FakeGpuHost, cpu: RecordingCpu, snapshot: Path, tmp_path: Path, change: str, message: str
) -> None:
    target: str | None = host.gpus[1].uuid
    if change == "model":
        host.gpus[1].name = "NVIDIA A100"
    elif change == "driver":
        host.driver_version = "580.95.05"
    elif change == "missing":
        target = "GPU-00000000-0000-0000-0000-000000000000"
    elif change == "old_remap":
        host.driver_version = "570.86.10"
        info = json.loads((snapshot / CUDA_INFO_FILE).read_text())
        info["driver_version"] = "570.86.10"
        (snapshot / CUDA_INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(RestoreFailed, match=message) as exc:
        run(make(host, cpu).restore_onto(snapshot, tmp_path, "r", target))
    assert exc.value.reason == "gate"
    assert cpu.events == []


def test_cuda_restore_failure_stops_the_sandbox(
    host: FakeGpuHost, cpu: RecordingCpu, snapshot: Path, tmp_path: Path
) -> None:
    host.fail("restore", "CUDA_ERROR_OUT_OF_MEMORY")
    with pytest.raises(RestoreFailed, match="CUDA restore failed.*not enough free memory") as exc:
        run(make(host, cpu).restore(snapshot, tmp_path, "r"))
    assert exc.value.reason == "cuda"
    assert cpu.events[0] == ("cpu_restore", "r") and cpu.events[-1][0] == "stop"


def test_restored_process_not_checkpointed_is_refused(
    host: FakeGpuHost, cpu: RecordingCpu, snapshot: Path, tmp_path: Path
) -> None:
    cpu.restore_state = CUprocessState.CU_PROCESS_STATE_RUNNING  # an image taken without the CUDA step
    with pytest.raises(RestoreFailed, match="cannot restore CUDA process .* in state running") as exc:
        run(make(host, cpu).restore(snapshot, tmp_path, "r"))
    assert exc.value.reason == "cuda" and cpu.events[-1][0] == "stop"


def test_unlock_failure_stops_the_sandbox(
    host: FakeGpuHost, cpu: RecordingCpu, snapshot: Path, tmp_path: Path
) -> None:
    host.fail("unlock", "CUDA_ERROR_UNKNOWN")
    with pytest.raises(RestoreFailed, match="CUDA_ERROR_UNKNOWN"):
        run(make(host, cpu).restore(snapshot, tmp_path, "r"))
    assert cpu.events[-1][0] == "stop"


def test_cpu_restore_failure_passes_through(
    host: FakeGpuHost, cpu: RecordingCpu, snapshot: Path, tmp_path: Path
) -> None:
    cpu.fail_restore = True
    with pytest.raises(RestoreFailed) as exc:
        run(make(host, cpu).restore(snapshot, tmp_path, "r"))
    assert exc.value.reason == "checkpointer" and host.transitions() == []


def test_restore_without_cuda_info(host: FakeGpuHost, cpu: RecordingCpu, tmp_path: Path) -> None:
    with pytest.raises(RestoreFailed, match=f"no readable {CUDA_INFO_FILE}") as exc:
        run(make(host, cpu).restore(tmp_path, tmp_path, "r"))
    assert exc.value.reason == "cuda"


def test_restore_on_a_host_without_driver(
    host: FakeGpuHost, cpu: RecordingCpu, snapshot: Path, tmp_path: Path
) -> None:
    host.driver_installed = False
    with pytest.raises(RestoreFailed, match="no NVIDIA driver") as exc:
        run(make(host, cpu).restore(snapshot, tmp_path, "r"))
    assert exc.value.reason == "cuda" and cpu.events == []


# -- probe, refusals, PIDs -------------------------------------------------------------------------


def test_probe(host: FakeGpuHost, cpu: RecordingCpu) -> None:
    info = make(host, cpu).probe()
    assert info.name == "cuda+fakecpu" and info.version == "1.0+nvidia-580.65.06"
    assert {"cuda", "gpu-remap", "leave-running"} <= info.capabilities
    host.driver_version = "570.86.10"
    assert "gpu-remap" not in make(host, cpu).probe().capabilities


@pytest.mark.parametrize("setup", ["no_driver", "old_driver", "no_gpu"])
def test_probe_unavailable(host: FakeGpuHost, cpu: RecordingCpu, setup: str) -> None:
    if setup == "no_driver":
        host.driver_installed = False
    elif setup == "old_driver":
        host.driver_version = "545.23.08"
    else:
        host.gpus.clear()
    with pytest.raises(CheckpointerUnavailable, match="cuda checkpoint unavailable"):
        make(host, cpu).probe()


@no_driver
def test_probe_with_real_libraries_and_no_driver(cpu: RecordingCpu) -> None:
    with pytest.raises(CheckpointerUnavailable, match="no NVIDIA driver on this host"):
        CudaCheckpointer(cpu).probe()


@pytest.mark.parametrize(
    "args",
    [
        ["--tensor-parallel-size", "2"],
        ["--tensor-parallel-size=4"],
        ["-tp", "2"],
        ["--tp-size", "8"],
        ["--pipeline-parallel-size", "2"],
        ["--dp", "2"],
    ],
)
def test_refuses_multi_gpu_engine_args(args: list[str]) -> None:
    with pytest.raises(GpuRefused, match="> 1"):
        refuse_unsupported_engine_args(["--max-model-len", "4096", *args])


def test_accepts_single_gpu_engine_args() -> None:
    refuse_unsupported_engine_args(["--tensor-parallel-size", "1", "--enable-sleep-mode", "--port", "8000"])


def test_process_tree_of_a_real_process_group() -> None:
    # The parent waits on its child, so killing the child lets the parent exit and reap it.
    script = "import subprocess; c = subprocess.Popen(['sleep', '30']); print(c.pid, flush=True); c.wait()"
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert process_tree(parent.pid) == [parent.pid, child]

        class WithPids:
            def host_pids(self) -> list[int]:
                return process_tree(parent.pid)

        assert sandbox_host_pids(WithPids()) == [parent.pid, child]  # type: ignore[arg-type]
    finally:
        if child:
            os.kill(child, signal.SIGKILL)
        parent.wait(timeout=30)
        parent.stdout.close()  # type: ignore[union-attr]


def test_sandbox_without_pids_is_refused() -> None:
    class NoHostProcesses:  # a stopped sandbox, or gVisor's: no host PIDs of the engine
        def host_pids(self) -> list[int]:
            return []

    with pytest.raises(GpuError, match="has no host processes to checkpoint"):
        sandbox_host_pids(NoHostProcesses())  # type: ignore[arg-type]
