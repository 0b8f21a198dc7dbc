"""A replica restored with the CUDA checkpointer goes onto the GPU its pool unit names; checkpointers that
place no GPU state get ``restore_onto`` from the base class, which restores plainly."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from coldstart.engine_adapters.base import EngineConfig, EngineEnvironment
from coldstart.engine_adapters.vllm import VllmAdapter
from coldstart.launcher.checkpointers.base import Checkpointer, CheckpointerInfo
from coldstart.launcher.sandboxes.base import Sandbox
from coldstart.launcher.snapshots.manager import SnapshotManager
from coldstart.launcher.snapshots.store import SnapshotStore

# A vLLM on CUDA, described rather than probed: these tests must not need vLLM installed.
CUDA_VLLM = EngineEnvironment("/venvs/vllm/bin/python", "vllm", "0.11.0", "cuda", sleep_mode=True)


class CpuCheckpointer(Checkpointer):
    """A checkpointer without GPU placement (as CRIU, runsc): only ``restore`` of its own."""

    name = "recording"

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def probe(self) -> CheckpointerInfo:
        return CheckpointerInfo("recording", "1")

    def new_sandbox(self, workdir: Path, replica_id: str) -> Sandbox:
        raise NotImplementedError

    async def checkpoint(self, sandbox: Sandbox, image_dir: Path, *, leave_running: bool) -> None:
        raise NotImplementedError

    async def restore(self, image_dir: Path, workdir: Path, replica_id: str) -> Sandbox:
        self.calls.append(("restore", replica_id))
        return "sandbox"  # type: ignore[return-value]


class GpuCheckpointer(CpuCheckpointer):
    """Stands in for CudaCheckpointer's restore entry points (the real one is tested on a fake driver)."""

    async def restore_onto(
        self, image_dir: Path, workdir: Path, replica_id: str, target_gpu: str | None
    ) -> Sandbox:
        self.calls.append(("restore_onto", target_gpu))
        return "sandbox"  # type: ignore[return-value]


def restore(checkpointer: Checkpointer, env: dict[str, str], tmp_path: Path) -> None:
    config = EngineConfig("m", env=env)
    adapter = VllmAdapter(environment=CUDA_VLLM)
    manager = SnapshotManager(checkpointer, SnapshotStore(tmp_path), adapter, config)
    asyncio.run(manager._restore_sandbox(tmp_path, tmp_path, "r1", config))


def test_gpu_unit_uuid_is_the_restore_target(tmp_path: Path) -> None:
    cuda = GpuCheckpointer()
    restore(cuda, {"CUDA_VISIBLE_DEVICES": "GPU-1234"}, tmp_path)
    assert cuda.calls == [("restore_onto", "GPU-1234")]


def test_cpu_slots_and_cpu_checkpointers_restore_plainly(tmp_path: Path) -> None:
    cuda = GpuCheckpointer()
    restore(cuda, {}, tmp_path)  # no GPU unit: the checkpointer's own choice (CudaOptions.target_gpu)
    criu = CpuCheckpointer()
    restore(criu, {"CUDA_VISIBLE_DEVICES": "GPU-1234"}, tmp_path)
    assert cuda.calls == [("restore_onto", None)] and criu.calls == [("restore", "r1")]


def test_base_restore_onto_ignores_the_gpu() -> None:
    criu = CpuCheckpointer()
    asyncio.run(criu.restore_onto(Path("/x"), Path("/y"), "r7", "GPU-1234"))
    assert criu.calls == [("restore", "r7")]
