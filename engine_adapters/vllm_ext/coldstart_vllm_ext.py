"""vLLM worker extension (``--worker-extension-cls coldstart_vllm_ext.ColdstartWorkerExtension``): runs in
vLLM's worker process, in vLLM's environment; the launcher calls it through ``POST /collective_rpc``.

``coldstart_file_back(directory)``, called while the engine is paused, just before the checkpoint:
1. the KV cache is released (its pages read as zero afterwards; the adapter resets vLLM's prefix cache
   first, so no request can reuse a block computed before the checkpoint), so it is not dumped;
2. glibc's free memory is returned to the kernel (``malloc_trim``: load-time copies freed into the heap);
3. every large anonymous mapping left (the weights: torch tensors and oneDNN's packed copies, which no
   tensor names) is moved into a private mapping of a content-addressed file under ``directory``
   (``snapshot_hooks/file_backed.py``): not in the checkpoint image, shared by every replica restored on
   a host through the page cache;
4. the rest of its anonymous memory (Python's and torch's heaps, ~640 MiB with the Qwen3-0.6B shape) is
   marked mergeable (``MADV_MERGEABLE``; CRIU restores the mark): where the host runs KSM, replicas
   restored from one image share those pages too.
Returns the report as JSON (``FileBackReport.to_json`` plus ``kv_cache_bytes``), which the launcher pins
in the snapshot's manifest.

Why a worker extension: it is vLLM's own way to add a method to the worker that ``collective_rpc`` may call
by name (the HTTP route takes only a name and string arguments). This file imports nothing of coldstart's
package: it is found on ``PYTHONPATH`` by vLLM's interpreter and loads ``file_backed.py`` by its path.

One copy of a tied embedding (``_one_copy_of_tied_embeddings``, installed when vLLM imports this module in
the worker, before the model loads): vLLM's CPU build (0.32) prepacks every unquantized embedding table for
oneDNN (``UnquantizedEmbeddingMethod.process_weights_after_loading`` -> ``dispatch_cpu_unquantized_gemm``,
``remove_weight=False``) so that it can serve as an LM head. With tied word embeddings (Qwen3-0.6B) that is
done twice, for the embedding module and for the LM head that shares its weight: two packed copies beside
the table, 3 x 297 MiB for one 297 MiB tensor. The embedding module's copy is never used (lookups read the
table), and the tied head's is the table in another layout. Here neither is made: both run ``F.linear`` on
the table itself. Measured with the Qwen3-0.6B shape: in the worker of a plain host process (2 cores, AMX
allowed) the same logits (max difference 0.0 at 1, 4, 32 and 256 rows) and the head's matmul 15.7 -> 21.5
ms for one row (a decode step), 19.6 -> 24.6 ms for 32; with CRIU (``bench/startup.py``; AMX denied in its
sandbox) the weight files 1,823 -> 1,224 MB and restore -> first token 1.15 -> 1.07 s (its first-token
phase 0.20 -> 0.18 s: no slowdown seen at that resolution). An untied head keeps its packed copy (its own
weights, packed as vLLM does).
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


UNPACKED: list[str] = []  # the tables left unpacked (reported by coldstart_file_back)


def _unpacked_linear(x: Any, weight: Any, bias: Any) -> Any:
    import torch.nn.functional as F  # noqa: N812 - vLLM's environment has torch; this module may load without

    return F.linear(x, weight, bias)


def _one_copy_of_tied_embeddings() -> bool:
    """Wrap vLLM's ``UnquantizedEmbeddingMethod.process_weights_after_loading`` on CPU (see the module
    docstring); False, leaving vLLM as it is, where its layout is not the one this was measured on."""
    try:
        from vllm.model_executor.layers import vocab_parallel_embedding as vpe
        from vllm.platforms import current_platform
    except ImportError:
        return False
    method = getattr(vpe, "UnquantizedEmbeddingMethod", None)
    head = getattr(vpe, "ParallelLMHead", None)
    original = getattr(method, "process_weights_after_loading", None)
    if method is None or head is None or original is None or not current_platform.is_cpu():
        return False
    if getattr(original, "coldstart", False):
        return True
    tables: set[int] = set()  # data pointers of the embedding tables processed so far

    def process_weights_after_loading(self: Any, layer: Any) -> None:
        weight = getattr(layer, "weight", None)
        if weight is None or weight.is_meta:
            return original(self, layer)
        if isinstance(layer, head):
            if weight.data_ptr() not in tables:
                return original(self, layer)  # an untied head: its own weights, packed as vLLM does
            UNPACKED.append("tied lm head")
        else:
            tables.add(weight.data_ptr())  # vLLM visits model.embed_tokens before lm_head
            UNPACKED.append("embedding")
        layer.cpu_linear = _unpacked_linear
        return None

    process_weights_after_loading.coldstart = True  # type: ignore[attr-defined]
    method.process_weights_after_loading = process_weights_after_loading
    return True


_one_copy_of_tied_embeddings()


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
        # What stays anonymous (the interpreter's and torch's heaps) is marked for KSM: replicas restored
        # from this image start with the same bytes there and, where the host runs KSM, come to share them.
        report["mergeable_bytes"] = fb.mergeable()
        return json.dumps({**report, "kv_cache_bytes": dropped, "unpacked_tables": UNPACKED})
