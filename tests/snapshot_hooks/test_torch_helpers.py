"""Torch helpers on CPU (always) and CUDA (when a GPU is present, e.g. on the H200 runner)."""

from __future__ import annotations

import random
import tempfile

import numpy as np
import pytest
import torch

from coldstart.snapshot_hooks import refresh_process_state, reseed_rngs
from coldstart.snapshot_hooks.torch_helpers import (
    ReleasableBuffers,
    WeightOffloader,
    device_memory,
    empty_device_cache,
)

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
]


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.proj = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight  # tied, as many LMs do
        self.register_buffer("scale", torch.full((16,), 0.5))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(self.embed(ids)) * self.scale)


@pytest.mark.parametrize("device", DEVICES)
def test_weights_leave_the_device_and_come_back_identical(device: str) -> None:
    torch.manual_seed(0)
    model = Tied().to(device).eval()
    ids = torch.arange(10, device=device)
    with torch.no_grad():
        expected = model(ids).cpu()
    params_before = [id(p) for p in model.parameters()]
    offloader = WeightOffloader(model)

    moved = offloader.offload()
    report = offloader.report()
    assert moved == report["host_backup_bytes"] == (50 * 16 + 16 * 16 + 16 + 16) * 4
    assert report["location"] == "host" and report["module_bytes"] == 0  # measured from the tensors
    assert report["host_backup_pinned"] is (device == "cuda")
    if device == "cuda":
        empty_device_cache()
        assert device_memory()["cuda_allocated_bytes"] < moved
    assert offloader.offload() == 0  # idempotent

    assert offloader.reload() == moved
    assert offloader.reload() == 0
    assert offloader.report()["location"] == "device"
    assert [id(p) for p in model.parameters()] == params_before  # same Parameter objects
    assert model.head.weight is model.embed.weight  # still tied
    assert all(p.device.type == device for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(ids).cpu(), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_buffers_are_freed_in_place_and_recreated_with_the_same_shape(device: str) -> None:
    keys = torch.ones(2, 4, 32, 8, device=device)
    values = torch.ones(2, 4, 32, 8, device=device)
    view = keys[0]  # shares keys' storage: tracked once
    buffers = ReleasableBuffers()
    for name, t in [("keys", keys), ("values", values), ("view", view)]:
        buffers.register(name, t)
    nbytes = 2 * keys.numel() * 4
    assert buffers.report()["buffers"] == 2 and buffers.is_allocated

    assert buffers.free() == nbytes
    assert not buffers.is_allocated and buffers.report()["bytes_allocated"] == 0
    assert keys.shape == (2, 4, 32, 8) and keys.untyped_storage().nbytes() == 0
    assert buffers.free() == 0

    assert buffers.recreate() == nbytes
    assert buffers.is_allocated and buffers.recreate() == 0
    assert keys.shape == (2, 4, 32, 8) and keys.device.type == device
    assert torch.count_nonzero(keys) == 0 and torch.count_nonzero(values) == 0  # zeroed, usable
    keys[0, 0, 0, 0] = 3.0
    assert view[0, 0, 0] == 3.0  # the view still aliases the re-allocated storage


def test_register_refuses_an_unallocated_tensor() -> None:
    with pytest.raises(ValueError, match="buffer 'empty' has no storage"):
        ReleasableBuffers().register("empty", torch.empty(0))


def test_reseed_makes_identical_rng_states_diverge() -> None:
    draws = []
    for _ in range(2):
        random.seed(7)
        np.random.seed(7)
        torch.manual_seed(7)  # the same state in two replicas restored from one image
        seed = reseed_rngs()
        draws.append((seed, random.random(), float(np.random.rand()), float(torch.rand(1))))
    assert all(a != b for a, b in zip(draws[0], draws[1], strict=True))


def test_refresh_gives_fresh_temp_names() -> None:
    old = tempfile._get_candidate_names()  # type: ignore[attr-defined]
    identity = refresh_process_state()
    assert tempfile._get_candidate_names() is not old  # type: ignore[attr-defined]
    assert identity.rng_seed != 0 and identity.hostname


@pytest.mark.parametrize("device", DEVICES)
def test_readme_five_lines(device: str) -> None:
    """The pattern in snapshot_hooks/README.md, on a registry of its own."""
    from coldstart import snapshot_hooks as hooks

    registry = hooks.HookRegistry()
    model = Tied().to(device).eval()
    kv = torch.randn(1, 2, 64, 8, device=device)
    ids = torch.arange(5, device=device)
    with torch.no_grad():
        expected = model(ids).cpu()

    weights = WeightOffloader(model)
    cache = ReleasableBuffers()
    cache.register("kv", kv)
    hooks.before_checkpoint(weights.offload, registry=registry)
    hooks.before_checkpoint(cache.free, registry=registry)
    hooks.after_restore(weights.reload, registry=registry)
    hooks.after_restore(cache.recreate, registry=registry)

    before = registry.run_before_checkpoint()
    assert before.ok and [h.name for h in before.hooks] == ["offload", "free"]
    assert weights.report()["module_bytes"] == 0 and not cache.is_allocated
    after = registry.run_after_restore()
    assert [h.name for h in after.hooks] == ["coldstart.refresh_process_state", "recreate", "reload"]
    assert cache.is_allocated and kv.shape == (1, 2, 64, 8)
    with torch.no_grad():
        assert torch.equal(model(ids).cpu(), expected)
