"""``settings.py`` and ``server.make_snapshots``: ServeConfig reaches the engine, autoscaler and snapshots."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from coldstart.engine_adapters.base import EngineEnvironment
from coldstart.engine_adapters.vllm import VllmAdapter
from coldstart.launcher.checkpointers import registry
from coldstart.launcher.checkpointers.base import CheckpointerInfo
from coldstart.launcher.checkpointers.criu import CriuCheckpointer
from coldstart.launcher.checkpointers.cuda import CudaCheckpointer, CudaOptions
from coldstart.launcher.config import Canary, ServeConfig, WarmupRequest
from coldstart.launcher.errors import GpuRefused, UsageError
from coldstart.launcher.gpu.driver import CudaCheckpointAPI
from coldstart.launcher.gpu.fake import FakeGpuHost
from coldstart.launcher.metrics import Metrics
from coldstart.launcher.server import make_snapshots
from coldstart.launcher.settings import engine_config, scaling_policy, snapshot_settings

TP2 = ("--tensor-parallel-size", "2")

# A vLLM on CUDA, described rather than probed: these tests must not need vLLM installed.
CUDA_VLLM = EngineEnvironment("/venvs/vllm/bin/python", "vllm", "0.11.0", "cuda", sleep_mode=True)


def test_engine_config_carries_env_and_warmups() -> None:
    config = ServeConfig(
        engine="custom",
        model="m",
        engine_env={"A": "1"},
        warmup=(WarmupRequest("/v1/completions", {"prompt": "hi"}),),
    )
    econf = engine_config(config)
    assert dict(econf.env) == {"A": "1"} and econf.warmup == (("/v1/completions", {"prompt": "hi"}),)


def test_scaling_policy_refuses_inconsistent_bounds() -> None:
    with pytest.raises(UsageError, match="--max-replicas"):
        scaling_policy(ServeConfig(min_replicas=3, max_replicas=2))


def test_snapshot_settings(tmp_path: Path) -> None:
    assert snapshot_settings(ServeConfig(snapshot="off")) is None
    settings = snapshot_settings(ServeConfig(snapshot_dir=tmp_path, canary=Canary("hi", 3)))
    assert settings is not None and settings.store_dir == tmp_path and settings.canary == Canary("hi", 3)


def test_cache_paths_follow_xdg_when_the_config_is_made(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert ServeConfig().snapshot_dir == tmp_path / "coldstart" / "snapshots"


def _fake_cuda() -> CudaCheckpointer:
    host = FakeGpuHost()
    return CudaCheckpointer(CriuCheckpointer(), CudaCheckpointAPI(host.driver), host.nvml, CudaOptions())  # type: ignore[arg-type]


def test_auto_picking_cuda_refuses_tensor_parallel(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The NCCL refusal used to run only for --snapshot cuda; auto picks cuda on GPU hosts."""
    monkeypatch.setattr(registry, "best_available", _fake_cuda)
    adapter = VllmAdapter(environment=CUDA_VLLM)
    auto = ServeConfig(engine="vllm", model="m", engine_args=TP2, snapshot="auto")
    with caplog.at_level(logging.WARNING, logger="coldstart.serve"):
        # auto: snapshots off, said why
        assert make_snapshots(auto, adapter, Metrics().for_model("m")) is None
    assert "tensor-parallel-size 2" in caplog.text and "snapshots off" in caplog.text
    monkeypatch.setattr(registry, "CHECKPOINTERS", {**registry.CHECKPOINTERS, "cuda": _fake_cuda})
    named = ServeConfig(engine="vllm", model="m", engine_args=TP2, snapshot="cuda")
    with pytest.raises(GpuRefused, match="tensor-parallel-size 2"):
        make_snapshots(named, adapter, Metrics().for_model("m"))


def test_model_files_inside_the_mounted_image_are_pinned_by_its_digest(tmp_path: Path) -> None:
    """Hashing them again would read the whole model through FUSE (and pull it on a new host)."""
    from coldstart.engine_adapters.base import EngineConfig
    from coldstart.engine_adapters.registry import get_adapter
    from coldstart.launcher.image import with_mountpoint
    from coldstart.launcher.snapshots.manager import SnapshotManager
    from coldstart.launcher.snapshots.store import SnapshotStore

    mount = tmp_path / "image"
    (mount / "models" / "m").mkdir(parents=True)
    (mount / "models" / "m" / "weights.bin").write_bytes(b"w")
    index = tmp_path / "image.cidx"
    index.write_bytes(b"index")
    config = with_mountpoint(ServeConfig(engine="custom", model="{image}/models/m", image=index), mount)
    settings = snapshot_settings(config)
    assert settings is not None and settings.image_mount == mount
    econf = EngineConfig(model=config.model, engine_args=("python3", "-m", "http.server", "{port}"))
    adapter = get_adapter("custom")

    class Stub(CriuCheckpointer):
        def probe(self) -> CheckpointerInfo:
            return CheckpointerInfo("stub", "1")

    store = SnapshotStore(tmp_path / "store")
    inside = SnapshotManager(Stub(), store, adapter, econf, image_mount=settings.image_mount)
    assert inside._model_digests(adapter, econf, fresh=True) == {}
    plain = SnapshotManager(Stub(), store, adapter, econf)  # the same files outside any image are pinned
    assert list(plain._model_digests(adapter, econf, fresh=True)) == [str(mount / "models/m/weights.bin")]


def test_a_snapshot_no_tier_has_is_not_tried_again_after_the_pull_at_launch(tmp_path: Path) -> None:
    """With --snapshot-tiers the first replica tries a restore; once the pull at launch found no tier with the
    snapshot, replicas cold-boot without a failed restore ("missing") counted against them."""
    from coldstart.engine_adapters.base import EngineConfig
    from coldstart.engine_adapters.registry import get_adapter
    from coldstart.launcher.snapshots.manager import SnapshotManager
    from coldstart.launcher.snapshots.remote import remote_for
    from coldstart.launcher.snapshots.store import SnapshotStore

    origin = tmp_path / "origin"
    (origin / "chunks").mkdir(parents=True)
    econf = EngineConfig(model="m", engine_args=("python3", "-m", "http.server", "{port}"))
    adapter = get_adapter("custom")

    class Stub(CriuCheckpointer):
        def probe(self) -> CheckpointerInfo:
            return CheckpointerInfo("stub", "1")

    remote = remote_for([str(origin)], None, None)
    manager = SnapshotManager(Stub(), SnapshotStore(tmp_path / "store"), adapter, econf, remote=remote)
    assert manager.has_snapshot()  # not known yet: a restore would try the tiers
    pull = manager.prefetch(adapter, econf)
    assert pull is not None
    pull.join(timeout=60)
    assert not pull.is_alive() and not manager.has_snapshot()
