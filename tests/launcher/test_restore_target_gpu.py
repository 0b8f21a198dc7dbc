"""A replica restored with the CUDA checkpointer goes onto the GPU its pool unit names."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from coldstart.engine_adapters.base import EngineConfig
from coldstart.engine_adapters.registry import get_adapter
from coldstart.launcher.checkpointers.base import CheckpointerInfo
from coldstart.launcher.snapshots.store import SnapshotStore
from coldstart.launcher.snapshots.manager import SnapshotManager


class RecordingCheckpointer:
    """Stands in for CudaCheckpointer's restore entry points (the real one is tested on a fake driver)."""

    def __init__(self, gpu_aware: bool) -> None:
        self.calls: list[tuple[str, Any]] = []
        if gpu_aware:
            self.restore_onto = self._restore_onto

    def probe(self) -> CheckpointerInfo:
        return CheckpointerInfo("recording", "1")

    async def restore(self, image_dir: Path, workdir: Path, replica_id: str) -> str:
        self.calls.append(("restore", replica_id))
        return "sandbox"

    async def _restore_onto(
        self, image_dir: Path, workdir: Path, replica_id: str, target_gpu: str | None
    ) -> str:
        self.calls.append(("restore_onto", target_gpu))
        return "sandbox"


def restore(checkpointer: RecordingCheckpointer, env: dict[str, str], tmp_path: Path) -> None:
    config = EngineConfig("m", env=env)
    manager = SnapshotManager(checkpointer, SnapshotStore(tmp_path), get_adapter("vllm"), config)  # type: ignore[arg-type]
    asyncio.run(manager._restore_sandbox(tmp_path, tmp_path, "r1", config))


def test_gpu_unit_uuid_is_the_restore_target(tmp_path: Path) -> None:
    cuda = RecordingCheckpointer(gpu_aware=True)
    restore(cuda, {"CUDA_VISIBLE_DEVICES": "GPU-1234"}, tmp_path)
    assert cuda.calls == [("restore_onto", "GPU-1234")]


def test_cpu_slots_and_cpu_checkpointers_restore_plainly(tmp_path: Path) -> None:
    cuda = RecordingCheckpointer(gpu_aware=True)
    restore(cuda, {}, tmp_path)
    criu = RecordingCheckpointer(gpu_aware=False)
    restore(criu, {"CUDA_VISIBLE_DEVICES": "GPU-1234"}, tmp_path)
    assert cuda.calls == [("restore", "r1")] and criu.calls == [("restore", "r1")]
