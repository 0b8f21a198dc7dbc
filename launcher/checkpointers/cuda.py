"""CUDA checkpointer: the CUDA driver's checkpoint API composed with a CPU checkpointer.

Checkpoint (engine already idle: the adapter's before-checkpoint hooks moved weights to host memory and
dropped the KV cache, so little device memory is left to copy):

    refuse what cannot work (no CUDA process, > 1 GPU, driver < 550)
    lock(timeout) every CUDA process -> checkpoint each (device memory -> its host memory, GPU released)
    -> CPU checkpoint of the tree (CRIU: the host memory now holds the device state) -> cuda.json
    -> [leave_running: restore in place + unlock, the engine serves again]

Restore:   read cuda.json -> gate (driver version, GPU model) -> CPU restore -> every CUDA process of the
           restored tree must be CHECKPOINTED -> restore each with gpuPairs {snapshot GPU -> target GPU}
           -> unlock each -> RUNNING (the launcher then runs after-restore hooks and the canary).

Failure rules: a lock timeout unlocks what was locked and leaves the engine RUNNING (snapshot aborted);
any failure after a CUDA checkpoint puts the original back in place (restore + unlock) so it keeps
serving, and an engine that cannot be brought back to RUNNING is stopped (never left locked: its
requests would hang); a failed CUDA restore stops the restored sandbox (never a half-restored replica)
and raises ``RestoreFailed(reason="cuda")`` so the launcher cold-boots. Every step checks the state it
expects. The driver calls run in a helper process (``gpu/helper.py``), each bounded: a call stuck in the
driver fails its step instead of hanging the launcher.

Before the CPU dump, no process of the tree may still hold ``/dev/nvidia*`` open or mapped: the CUDA
checkpoint releases CUDA's own handles, but NVML (vLLM and SGLang query it) keeps ``/dev/nvidiactl`` and
``/dev/nvidiaN`` open, and CRIU would either fail on them or re-open a device with none of the driver's
state behind it. The snapshot is refused, naming the process, fd and path.

Which processes: the sandbox's host PIDs (``host_pids()`` when the sandbox has it, else ``pid`` and its
descendants from /proc), kept where the driver knows them as CUDA processes. This fits the CRIU sandbox
(host processes). runsc runs sandboxed processes under its own kernel: there gVisor's
``--cuda-checkpoint-path`` runs ``coldstart-cuda-checkpoint --toggle`` inside the sandbox instead.

Why not CRIU's CUDA plugin: it runs the same four actions but without a lock timeout we choose, without
GPU remapping by UUID, and with errors only in CRIU's log. Worse, CRIU loads every ``*.so`` in its plugin
folder (``--libdir``, else ``$CRIU_LIBS_DIR``, else ``/usr/lib/criu/``): an installed ``cuda_plugin.so``
would restore and unlock the process itself, this checkpointer would find it RUNNING and fall back to a
cold boot every time. So CRIU runs with ``--libdir`` set to an empty folder we own (``NO_PLUGINS_DIR``,
handed to the CPU checkpointer as ``plugin_dir``; never through the launcher's environment), on purpose
without its CUDA plugin.
Limits (driver, r570-r580): no UVM/managed memory and no CUDA IPC (the driver refuses at checkpoint;
nothing visible earlier tells), one chip type per restore, NCCL (tensor parallel) processes deadlock.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from coldstart.launcher.atomic import write_text_atomic
from coldstart.launcher.checkpointers.base import Checkpointer, CheckpointerInfo
from coldstart.launcher.errors import (
    CheckpointerUnavailable,
    GpuError,
    GpuRefused,
    NoNvidiaDriver,
    RestoreFailed,
    RestoreReason,
)
from coldstart.launcher.gpu.driver import CudaCheckpointAPI, CudaProcessState
from coldstart.launcher.gpu.helper import CallBounds, HelperCudaAPI
from coldstart.launcher.gpu.inventory import GpuInventory, gpu_processes, read_inventory
from coldstart.launcher.sandboxes.base import Sandbox

log = logging.getLogger("coldstart.cuda")

CUDA_INFO_FILE = "cuda.json"
MIN_DRIVER_MAJOR = 550  # first driver with the checkpoint API
PARITY_DRIVER_MAJOR = 570  # lock with timeout, driver API at parity with cuda-checkpoint
REMAP_DRIVER_MAJOR = 580  # restore onto another GPU (gpuPairs)
NO_PLUGINS_DIR = Path("/run/coldstart/criu-no-plugins")  # empty: CRIU loads no CUDA plugin of its own
DEVICE_PREFIX = "/dev/nvidia"

# Engine flags that spread one replica over several GPUs (vLLM, SGLang spellings).
_PARALLEL_FLAGS = {
    "--tensor-parallel-size": "tensor parallel",
    "-tp": "tensor parallel",
    "--tp-size": "tensor parallel",
    "--tp": "tensor parallel",
    "--pipeline-parallel-size": "pipeline parallel",
    "-pp": "pipeline parallel",
    "--pp-size": "pipeline parallel",
    "--data-parallel-size": "data parallel",
    "-dp": "data parallel",
    "--dp-size": "data parallel",
    "--dp": "data parallel",
}


@dataclass(frozen=True)
class CudaOptions:
    lock_timeout_s: float = 30.0  # wait this long for in-flight kernels, then abort the snapshot
    target_gpu: str | None = None  # UUID to restore onto; None: the snapshot's GPU if here, else same model
    bounds: CallBounds = field(default_factory=CallBounds)  # how long each driver call may take
    device_prefix: str = DEVICE_PREFIX  # files under it, open or mapped, block the CPU dump


@dataclass(frozen=True)
class SnapshotGpu:
    uuid: str
    name: str
    memory_total: int


@dataclass(frozen=True)
class CudaSnapshotInfo:
    """``cuda.json`` in the image folder: what a restore needs to know about the GPU side."""

    driver_version: str
    gpu: SnapshotGpu
    pids: tuple[int, ...]  # host PIDs at checkpoint time (for logs; restored PIDs differ)
    device_bytes: int  # device memory the CUDA processes held at lock time (NVML), i.e. copied to host
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CudaSnapshotInfo:
        raw = json.loads(text)
        return cls(
            driver_version=str(raw["driver_version"]),
            gpu=SnapshotGpu(**raw["gpu"]),
            pids=tuple(int(p) for p in raw["pids"]),
            device_bytes=int(raw["device_bytes"]),
            timings={str(k): float(v) for k, v in raw.get("timings", {}).items()},
        )


def refuse_unsupported_engine_args(engine_args: Sequence[str]) -> None:
    """Raise ``GpuRefused`` for engine arguments that put one replica on several GPUs (NCCL)."""
    args = list(engine_args)
    for i, arg in enumerate(args):
        flag, _, value = arg.partition("=")
        if flag not in _PARALLEL_FLAGS:
            continue
        if not value and i + 1 < len(args):
            value = args[i + 1]
        try:
            size = int(value)
        except ValueError:
            continue
        if size > 1:
            raise GpuRefused(
                f"{flag} {size}: {_PARALLEL_FLAGS[flag]} > 1 (NCCL across GPUs) cannot be CUDA-checkpointed "
                "yet; use 1, or --snapshot criu|off for this engine"
            )


def check_driver(driver_version: str) -> None:
    """Refuse a driver older than the checkpoint API."""
    major = int(driver_version.split(".")[0])
    if major < MIN_DRIVER_MAJOR:
        raise GpuRefused(
            f"NVIDIA driver {driver_version} has no CUDA checkpoint API (needs >= {MIN_DRIVER_MAJOR}, "
            f"r{PARITY_DRIVER_MAJOR}+ recommended): upgrade the driver or use --snapshot criu|off"
        )


def plan_gpu_pairs(snapshot: CudaSnapshotInfo, inventory: GpuInventory, target: str | None) -> dict[str, str]:
    """{snapshot GPU UUID: target GPU UUID}. Refuses a target of another model or another driver."""
    if inventory.driver_version != snapshot.driver_version:
        raise GpuRefused(
            f"NVIDIA driver {inventory.driver_version} != snapshot's {snapshot.driver_version}: "
            "CUDA restore needs the same driver; take a new snapshot on this host"
        )
    if target is not None:
        gpu = inventory.by_uuid(target)
    else:
        same = [g for g in inventory.gpus if g.uuid == snapshot.gpu.uuid]
        candidates = (
            same or [g for g in inventory.gpus if g.name == snapshot.gpu.name] or list(inventory.gpus)
        )
        if not candidates:
            raise GpuRefused("this host has no GPU to restore a CUDA snapshot onto")
        gpu = candidates[0]
    if gpu.name != snapshot.gpu.name:
        raise GpuRefused(
            f"GPU model {gpu.name} ({gpu.uuid}) != snapshot's {snapshot.gpu.name}: CUDA restore needs the "
            "same chip type; restore on a matching GPU or take a new snapshot"
        )
    if gpu.uuid != snapshot.gpu.uuid:
        major = inventory.driver_major
        if major < REMAP_DRIVER_MAJOR:
            raise GpuRefused(
                f"restoring onto another GPU ({gpu.uuid}) needs driver r{REMAP_DRIVER_MAJOR}+ "
                f"(this host has {inventory.driver_version}); restore onto {snapshot.gpu.uuid}"
            )
    return {snapshot.gpu.uuid: gpu.uuid}


def sandbox_host_pids(sandbox: Sandbox) -> list[int]:
    """Host PIDs of the sandbox's process tree, root first."""
    pids = sandbox.host_pids()
    if not pids:
        raise GpuError(
            f"{type(sandbox).__name__} of replica has no host processes to checkpoint: CUDA checkpoint "
            "needs a running CRIU sandbox (runsc uses --cuda-checkpoint-path instead)"
        )
    return pids


def device_handles(pids: Iterable[int], prefix: str = DEVICE_PREFIX) -> list[str]:
    """Open fds and mappings of files under ``prefix`` in ``pids``, e.g. ``pid 7 fd 12 /dev/nvidiactl``.

    Read from /proc/PID/fd and /proc/PID/maps; a process that is gone or unreadable contributes nothing.
    """
    found: list[str] = []
    for pid in pids:
        try:
            fds = sorted(Path(f"/proc/{pid}/fd").iterdir(), key=lambda p: int(p.name))
        except OSError:
            fds = []
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith(prefix):
                found.append(f"pid {pid} fd {fd.name} {target}")
        try:
            maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
        except OSError:
            maps = []
        mapped = {fields[5] for fields in (line.split(None, 5) for line in maps) if len(fields) == 6}
        found += [f"pid {pid} maps {path}" for path in sorted(mapped) if path.startswith(prefix)]
    return found


def refuse_device_handles(pids: Iterable[int], prefix: str = DEVICE_PREFIX) -> None:
    """``GpuRefused`` when the checkpointed tree still holds GPU device files (checked before the dump)."""
    held = device_handles(pids, prefix)
    if held:
        shown = "; ".join(held[:6]) + (f"; and {len(held) - 6} more" if len(held) > 6 else "")
        raise GpuRefused(
            f"after the CUDA checkpoint the engine still holds GPU device files ({shown}): CRIU cannot save "
            "them (NVML keeps /dev/nvidiactl open: vLLM/SGLang query it); close NVML before the checkpoint "
            "(a before-checkpoint hook calling nvmlShutdown) or use --snapshot off"
        )


def without_criu_plugins(cpu: Checkpointer) -> None:
    """Make the CRIU ``cpu`` runs load plugins from an empty folder we own (``--libdir``): no
    ``cuda_plugin.so``; this checkpointer does the CUDA part itself."""
    NO_PLUGINS_DIR.mkdir(parents=True, exist_ok=True)
    cpu.plugin_dir = NO_PLUGINS_DIR


class CudaCheckpointer(Checkpointer):
    """``cpu`` (CRIU) plus the CUDA driver's checkpoint API; ``api``/``nvml`` injectable for tests."""

    name = "cuda"

    def __init__(
        self,
        cpu: Checkpointer,
        api: CudaCheckpointAPI | None = None,
        nvml: Any | None = None,
        options: CudaOptions | None = None,
    ) -> None:
        self.cpu = cpu
        self.options = options or CudaOptions()
        self.api = api or HelperCudaAPI(self.options.bounds)
        self.nvml = nvml
        self.last_timings: dict[str, float] = {}

    # -- Checkpointer interface --------------------------------------------------------------------

    def check_engine_args(self, engine_args: Sequence[str]) -> None:
        refuse_unsupported_engine_args(engine_args)

    def probe(self) -> CheckpointerInfo:
        cpu_info = self.cpu.probe()
        try:
            inventory = read_inventory(self.nvml)
            check_driver(inventory.driver_version)
            if not inventory.gpus:
                raise GpuRefused("NVML sees no GPU on this host")
        except GpuError as exc:
            raise CheckpointerUnavailable(f"cuda checkpoint unavailable: {exc}") from exc
        caps = set(cpu_info.capabilities) | {"cuda"}
        if inventory.driver_major >= REMAP_DRIVER_MAJOR:
            caps.add("gpu-remap")
        return CheckpointerInfo(
            name=f"cuda+{cpu_info.name}",
            version=f"{cpu_info.version}+nvidia-{inventory.driver_version}",
            capabilities=frozenset(caps),
        )

    def new_sandbox(self, workdir: Path, replica_id: str) -> Sandbox:
        return self.cpu.new_sandbox(workdir, replica_id)

    async def checkpoint(self, sandbox: Sandbox, image_dir: Path, *, leave_running: bool) -> None:
        timings: dict[str, float] = {}
        self.last_timings = timings
        inventory = await asyncio.to_thread(read_inventory, self.nvml)
        check_driver(inventory.driver_version)
        pids = await self._cuda_pids(sandbox)
        if not pids:
            raise GpuRefused(
                "no CUDA process in the engine's process tree: use --snapshot criu for a CPU engine"
            )
        gpu, device_bytes = await self._gpu_of(pids, inventory)
        for pid in pids:
            await self._step(
                timings, "expect_running", self.api.expect, pid, CudaProcessState.RUNNING, "lock"
            )
        try:
            for pid in pids:
                await self._step(timings, "cuda_lock", self.api.lock, pid, self.options.lock_timeout_s)
            for pid in pids:
                await self._step(timings, "cuda_checkpoint", self.api.checkpoint, pid)
            for pid in pids:
                await self._step(
                    timings,
                    "expect_checkpointed",
                    self.api.expect,
                    pid,
                    CudaProcessState.CHECKPOINTED,
                    "save",
                )
            tree = await asyncio.to_thread(sandbox_host_pids, sandbox)
            await asyncio.to_thread(refuse_device_handles, tree, self.options.device_prefix)
            without_criu_plugins(self.cpu)
            t0 = time.perf_counter()
            await self.cpu.checkpoint(sandbox, image_dir, leave_running=leave_running)
            timings["cpu_checkpoint"] = time.perf_counter() - t0
        except BaseException as exc:
            # Nothing was saved: put every CUDA process back as it was so the engine keeps serving.
            problems = await self._resume_in_place(pids, timings)
            if problems:  # never leave it locked: its requests would hang, and it cannot serve
                await sandbox.stop()
                log.warning("cuda checkpoint aborted (%s); the engine could not resume and was stopped%s",
                            exc, _problems(problems))  # fmt: skip
            else:
                log.warning("cuda checkpoint aborted (%s); engine resumed in place", exc)
            raise
        info = CudaSnapshotInfo(
            driver_version=inventory.driver_version,
            gpu=gpu,
            pids=tuple(pids),
            device_bytes=device_bytes,
            timings=dict(timings),
        )
        write_text_atomic(image_dir / CUDA_INFO_FILE, info.to_json())
        if leave_running:
            problems = await self._resume_in_place(pids, timings)
            if problems:
                await sandbox.stop()  # never leave it locked
                raise GpuError(
                    f"snapshot saved but the engine did not resume on its GPU ({problems[0]}); it was "
                    "stopped: replace the replica"
                )
        log.info(
            "cuda checkpoint of %s on %s: %.1f MiB device memory, %s",
            pids,
            gpu.name,
            device_bytes / 2**20,
            " ".join(f"{k}={v:.3f}s" for k, v in timings.items()),
        )

    async def restore(self, image_dir: Path, workdir: Path, replica_id: str) -> Sandbox:
        return await self.restore_onto(image_dir, workdir, replica_id, self.options.target_gpu)

    async def restore_onto(
        self, image_dir: Path, workdir: Path, replica_id: str, target_gpu: str | None
    ) -> Sandbox:
        """Restore onto ``target_gpu`` (a UUID from the buffer; None: see ``CudaOptions.target_gpu``)."""
        timings: dict[str, float] = {}
        self.last_timings = timings
        try:
            info = CudaSnapshotInfo.from_json((image_dir / CUDA_INFO_FILE).read_text())
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RestoreFailed(
                RestoreReason.CUDA, f"snapshot has no readable {CUDA_INFO_FILE}: {exc}"
            ) from exc
        try:
            inventory = await asyncio.to_thread(read_inventory, self.nvml)
            pairs = plan_gpu_pairs(info, inventory, target_gpu)
        except NoNvidiaDriver as exc:
            raise RestoreFailed(RestoreReason.CUDA, str(exc)) from exc
        except GpuError as exc:
            raise RestoreFailed(RestoreReason.GATE, str(exc)) from exc
        without_criu_plugins(self.cpu)
        t0 = time.perf_counter()
        sandbox = await self.cpu.restore(image_dir, workdir, replica_id)
        timings["cpu_restore"] = time.perf_counter() - t0
        try:
            pids = await self._cuda_pids(sandbox)
            if len(pids) != len(info.pids):
                raise GpuError(
                    f"restored tree has {len(pids)} CUDA processes, the snapshot had {len(info.pids)}"
                )
            for pid in pids:
                await self._step(
                    timings,
                    "expect_checkpointed",
                    self.api.expect,
                    pid,
                    CudaProcessState.CHECKPOINTED,
                    "restore",
                )
            for pid in pids:
                await self._step(timings, "cuda_restore", self.api.restore, pid, pairs)
            for pid in pids:
                await self._step(timings, "cuda_unlock", self.api.unlock, pid)
            for pid in pids:
                await self._step(
                    timings, "expect_running", self.api.expect, pid, CudaProcessState.RUNNING, "serve"
                )
        except BaseException as exc:
            await sandbox.stop()
            if isinstance(exc, GpuError):
                raise RestoreFailed(RestoreReason.CUDA, f"CUDA restore failed: {exc}") from exc
            raise
        log.info(
            "cuda restore onto %s: %s",
            next(iter(pairs.values())),
            " ".join(f"{k}={v:.3f}s" for k, v in timings.items()),
        )
        return sandbox

    # -- steps ---------------------------------------------------------------------------------------

    async def _step(self, timings: dict[str, float], name: str, func: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await asyncio.to_thread(func, *args)
        finally:
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0

    async def _cuda_pids(self, sandbox: Sandbox) -> list[int]:
        candidates = await asyncio.to_thread(sandbox_host_pids, sandbox)
        return [pid for pid in candidates if await asyncio.to_thread(self.api.is_cuda_process, pid)]

    async def _gpu_of(self, pids: list[int], inventory: GpuInventory) -> tuple[SnapshotGpu, int]:
        """The one GPU the CUDA processes use, and the device memory they hold (refuses > 1 GPU)."""
        procs = await asyncio.to_thread(gpu_processes, self.nvml)
        mine = [procs[pid] for pid in pids if pid in procs]
        used = sorted({uuid for proc in mine for uuid in proc.gpus})
        if len(used) > 1:
            raise GpuRefused(
                f"the engine uses {len(used)} GPUs ({', '.join(used)}): tensor parallel > 1 (NCCL) cannot be "
                "CUDA-checkpointed yet; serve on one GPU or use --snapshot criu|off"
            )
        if not used:
            if len(inventory.gpus) != 1:
                raise GpuError(
                    f"NVML lists no GPU for CUDA processes {pids}: cannot tell which GPU to record; "
                    "pin the engine to one GPU with CUDA_VISIBLE_DEVICES"
                )
            used = [inventory.gpus[0].uuid]
        gpu = inventory.by_uuid(used[0])
        device_bytes = sum(proc.used_bytes for proc in mine)
        return SnapshotGpu(uuid=gpu.uuid, name=gpu.name, memory_total=gpu.memory_total), device_bytes

    async def _resume_in_place(self, pids: list[int], timings: dict[str, float]) -> list[str]:
        """Bring each process back to RUNNING on its own GPU from whatever state it is in; report problems.

        Driven by the observed state, so it is right after any partial failure: CHECKPOINTED -> restore
        + unlock, LOCKED -> unlock, RUNNING -> nothing, gone (dumped and killed) -> nothing.
        """
        problems: list[str] = []
        for pid in pids:
            try:
                if not await asyncio.to_thread(self.api.is_cuda_process, pid):
                    continue
                state = await asyncio.to_thread(self.api.state, pid)
                if state is CudaProcessState.CHECKPOINTED:
                    await self._step(timings, "resume_restore", self.api.restore, pid, None)
                    state = CudaProcessState.LOCKED
                if state is CudaProcessState.LOCKED:
                    await self._step(timings, "resume_unlock", self.api.unlock, pid)
                await asyncio.to_thread(self.api.expect, pid, CudaProcessState.RUNNING, "serve")
            except GpuError as exc:
                problems.append(str(exc))
        return problems


def _problems(problems: list[str]) -> str:
    return "" if not problems else f", but: {'; '.join(problems)}"
