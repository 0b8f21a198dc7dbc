"""Engine adapters by name. ``get_adapter`` raises ``UnknownEngine`` listing the valid names."""

from __future__ import annotations

import importlib

from coldstart.engine_adapters.base import EngineAdapter
from coldstart.engine_adapters.errors import UnknownEngine

# name -> "module:Class"; imported on use so a missing optional engine costs nothing.
ADAPTERS: dict[str, str] = {
    "transformers": "coldstart.engine_adapters.transformers:TransformersAdapter",
    "vllm": "coldstart.engine_adapters.vllm:VllmAdapter",
    "sglang": "coldstart.engine_adapters.sglang:SglangAdapter",
    "custom": "coldstart.engine_adapters.custom:CustomAdapter",
}


def get_adapter(name: str) -> EngineAdapter:
    if name not in ADAPTERS:
        raise UnknownEngine(f"unknown engine {name!r}; valid engines: {', '.join(sorted(ADAPTERS))}")
    module_name, class_name = ADAPTERS[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls()  # type: ignore[no-any-return]
