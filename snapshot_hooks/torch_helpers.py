"""Torch helpers for before-checkpoint / after-restore hooks, on CPU and CUDA alike.

- ``WeightOffloader(module)``: moves every parameter and buffer of a module off its device and back.
  On CUDA the host copy is pinned (fast copies back, and the device memory is really released); on CPU the
  host copy *is* the original storage (zero copy): the module simply stops referencing it until reload.
  Identity is kept: the same ``Parameter`` objects get their ``.data`` swapped, so tied weights, optimizer
  references and hooks on the module stay valid. Tensors that are plain attributes (not parameters or
  buffers) are not seen; register them with ``ReleasableBuffers`` or make them buffers.
- ``ReleasableBuffers``: tensors allocated up front (a static KV cache, workspaces) whose *storage* is
  freed and re-allocated in place (``untyped_storage().resize_()``, as FSDP frees parameters), so every
  holder of the tensor object keeps working after ``recreate()``. The content is zeroed, not restored:
  use it for caches, not for weights. Data pointers change: CUDA graphs captured on them must be
  re-captured (rejected alternative: keeping addresses needs a VMM allocator as vLLM's CuMemAllocator).
- ``file_back_module(module, directory)`` (CPU): the weights' memory moved, in place, into private mappings
  of content-addressed files under ``directory`` (``file_backed.py``): a CPU checkpoint then holds no copy
  of them, and every replica restored on a host shares their pages through the page cache. Nothing to
  undo after a restore. Keep the files where they are for as long as a snapshot maps them.
- ``empty_device_cache()``: return the CUDA caching allocator's free blocks to the driver, so a CUDA
  checkpoint does not copy memory nobody uses.

Every method is idempotent (offload twice, recreate what is allocated: no-ops) because the hooks library
rolls back a failed before-checkpoint by running all after-restore hooks.
"""

from __future__ import annotations

import gc
import os
import threading
from dataclasses import dataclass
from typing import Any

import torch

from coldstart.snapshot_hooks.file_backed import FileBackReport, file_back


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Offloaded:
    tensor: torch.Tensor  # the Parameter/buffer object the module holds
    host: torch.Tensor  # where its data lives while offloaded
    device: torch.device


class WeightOffloader:
    """Offload a module's parameters and buffers to (pinned, on CUDA) host memory and bring them back."""

    def __init__(self, module: torch.nn.Module, *, pin_memory: bool | None = None) -> None:
        self._module = module
        self._pin = pin_memory
        self._offloaded: list[_Offloaded] = []
        self._lock = threading.Lock()

    def _tensors(self) -> list[torch.Tensor]:
        seen: set[int] = set()
        out: list[torch.Tensor] = []
        for t in [*self._module.parameters(), *self._module.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t)
        return out

    @property
    def is_offloaded(self) -> bool:
        return bool(self._offloaded)

    def offload(self) -> int:
        """Move weights to host memory; returns the bytes moved (0 when already offloaded)."""
        with self._lock, torch.no_grad():
            if self._offloaded:
                return 0
            moved = 0
            devices: set[torch.device] = set()
            for t in self._tensors():
                device = t.device
                if device.type == "cpu":
                    host = t.data  # zero copy: the module lets go of it, we keep it
                else:
                    pin = self._pin if self._pin is not None else device.type == "cuda"
                    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
                    host.copy_(t.data, non_blocking=pin)
                    devices.add(device)
                self._offloaded.append(_Offloaded(t, host, device))
                moved += host.numel() * host.element_size()
            for device in devices:
                _sync(device)  # host copies complete before the device memory goes
            for item in self._offloaded:
                item.tensor.data = torch.empty(0, dtype=item.tensor.dtype, device=item.device)
            return moved

    def reload(self) -> int:
        """Move weights back to the devices they came from; returns the bytes moved (0 when in place)."""
        with self._lock, torch.no_grad():
            if not self._offloaded:
                return 0
            moved = 0
            devices: set[torch.device] = set()
            for item in self._offloaded:
                if item.device.type == "cpu":
                    item.tensor.data = item.host
                else:
                    item.tensor.data = item.host.to(item.device, non_blocking=item.host.is_pinned())
                    devices.add(item.device)
                moved += item.host.numel() * item.host.element_size()
            for device in devices:
                _sync(device)
            self._offloaded = []
            return moved

    def report(self) -> dict[str, Any]:
        """Where the weights are now, measured from the tensors themselves (not from a flag)."""
        with self._lock:
            module_bytes: dict[str, int] = {}
            for t in self._tensors():
                key = str(t.device)
                module_bytes[key] = module_bytes.get(key, 0) + t.numel() * t.element_size()
            host_bytes = sum(i.host.numel() * i.host.element_size() for i in self._offloaded)
            return {
                "location": "host" if self._offloaded else "device",
                "module_bytes_by_device": module_bytes,
                "module_bytes": sum(module_bytes.values()),
                "host_backup_bytes": host_bytes,
                "host_backup_pinned": any(i.host.is_pinned() for i in self._offloaded),
                "tensors": len(self._tensors()),
            }


@dataclass
class _Releasable:
    name: str
    tensor: torch.Tensor
    nbytes: int


class ReleasableBuffers:
    """Named tensors allocated up front whose storage is freed before a checkpoint and re-allocated after."""

    def __init__(self) -> None:
        self._items: list[_Releasable] = []
        self._storages: set[int] = set()
        self._lock = threading.Lock()

    def register(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Track ``tensor`` (it must be allocated now); tensors sharing a storage are tracked once."""
        with self._lock:
            storage = tensor.untyped_storage()
            if storage.nbytes() == 0:
                raise ValueError(f"buffer {name!r} has no storage; register it once allocated")
            if storage.data_ptr() not in self._storages:
                self._storages.add(storage.data_ptr())
                self._items.append(_Releasable(name, tensor, storage.nbytes()))
        return tensor

    @property
    def is_allocated(self) -> bool:
        """True when every registered buffer has its storage (measured, not remembered)."""
        return all(i.tensor.untyped_storage().nbytes() == i.nbytes for i in self._items)

    def free(self) -> int:
        """Release every buffer's storage; returns the bytes released. Tensor objects stay valid shells."""
        with self._lock, torch.no_grad():
            freed = 0
            for item in self._items:
                storage = item.tensor.untyped_storage()
                if storage.nbytes():
                    freed += storage.nbytes()
                    storage.resize_(0)
            return freed

    def recreate(self) -> int:
        """Re-allocate every freed buffer with its old size, zero-filled; returns the bytes allocated."""
        with self._lock, torch.no_grad():
            allocated = 0
            for item in self._items:
                storage = item.tensor.untyped_storage()
                if storage.nbytes() != item.nbytes:
                    storage.resize_(item.nbytes)
                    item.tensor.zero_()
                    allocated += item.nbytes
            for device in {i.tensor.device for i in self._items}:
                _sync(device)
            return allocated

    def report(self) -> dict[str, Any]:
        with self._lock:
            return {
                "allocated": self.is_allocated,
                "buffers": len(self._items),
                "bytes_allocated": sum(i.tensor.untyped_storage().nbytes() for i in self._items),
                "bytes_when_allocated": sum(i.nbytes for i in self._items),
                "shapes": sorted({str(tuple(i.tensor.shape)) for i in self._items}),
                "devices": sorted({str(i.tensor.device) for i in self._items}),
            }


def empty_device_cache() -> dict[str, int]:
    """Collect garbage and hand the CUDA caching allocator's unused blocks back to the driver."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return device_memory()


def device_memory() -> dict[str, int]:
    """CUDA memory in use and reserved on the current device (zeros without CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {
            "cuda_allocated_bytes": int(torch.cuda.memory_allocated()),
            "cuda_reserved_bytes": int(torch.cuda.memory_reserved()),
        }
    return {"cuda_allocated_bytes": 0, "cuda_reserved_bytes": 0}


def file_back_module(
    module: torch.nn.Module, directory: str | os.PathLike[str], min_bytes: int = 1 << 20
) -> FileBackReport:
    """Move the storage of every CPU parameter and buffer of ``module`` of at least ``min_bytes`` into
    content-addressed files under ``directory`` (see ``file_backed.file_back``); same tensors, same data
    pointers, same values. Call it while nothing runs the module (a before-checkpoint hook on the model's
    thread)."""
    ranges: dict[int, int] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device.type != "cpu":
            raise ValueError(f"file_back_module: a {tensor.device} tensor; only CPU memory maps files")
        storage = tensor.untyped_storage()
        if storage.nbytes() >= min_bytes:
            ranges[storage.data_ptr()] = storage.nbytes()
    return file_back(sorted(ranges.items()), directory)
