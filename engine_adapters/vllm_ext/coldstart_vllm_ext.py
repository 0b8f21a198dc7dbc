"""vLLM worker extension (``--worker-extension-cls coldstart_vllm_ext.ColdstartWorkerExtension``): runs in
vLLM's worker process, in vLLM's environment; the launcher calls it through ``POST /collective_rpc``.

``coldstart_file_back(directory)``, called while the engine is paused, just before the checkpoint:
1. the KV cache is released (its pages read as zero afterwards; the adapter resets vLLM's prefix cache
   first, so no request can reuse a block computed before the checkpoint), so it is not dumped;
2. glibc's free memory is returned to the kernel (``malloc_trim``: load-time copies freed into the heap);
3. every large anonymous mapping left (the weights: torch tensors and oneDNN's packed copies, which no
   tensor names) is moved into a private mapping of a content-addressed file under ``directory``
   (``snapshot_hooks/file_backed.py``): not in the checkpoint image, shared by every replica restored on
   a host through the page cache.
Returns the report as JSON (``FileBackReport.to_json`` plus ``kv_cache_bytes``), which the launcher pins
in the snapshot's manifest.

Why a worker extension: it is vLLM's own way to add a method to the worker that ``collective_rpc`` may call
by name (the HTTP route takes only a name and string arguments). This file imports nothing of coldstart's
package: it is found on ``PYTHONPATH`` by vLLM's interpreter and loads ``file_backed.py`` by its path.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

FILE_BACKED = Path(__file__).resolve().parents[2] / "snapshot_hooks" / "file_backed.py"
MIN_BYTES = 4 << 20  # smaller mappings are Python's and the allocator's own, not weights


def _file_backed() -> ModuleType:
    name = "coldstart_file_backed"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, FILE_BACKED)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {FILE_BACKED}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _storage_ranges(tensors: list[Any]) -> list[tuple[int, int]]:
    seen: dict[int, int] = {}
    for tensor in tensors:
        if tensor is None:
            continue
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sorted(seen.items())


class ColdstartWorkerExtension:
    """Mixed into vLLM's worker class by ``--worker-extension-cls``."""

    model_runner: Any

    def coldstart_file_back(self, directory: str, min_bytes: str = str(MIN_BYTES)) -> str:
        fb = _file_backed()
        kv = _storage_ranges(list(getattr(self.model_runner, "kv_caches", []) or []))
        dropped = fb.drop(kv)
        fb.release_free_heap()
        # Released pages are not resident: anonymous_regions leaves the KV cache out by itself.
        report = fb.file_back(fb.anonymous_regions(int(min_bytes)), directory).to_json()
        return json.dumps({**report, "kv_cache_bytes": dropped})
