"""Engine adapters by name. ``get_adapter`` raises ``UnknownEngine`` listing the valid names."""

from __future__ import annotations

import importlib

from coldstart.engine_adapters.base import EngineAdapter
from coldstart.engine_adapters.errors import EngineArgsRefused, UnknownEngine

# name -> "module:Class"; imported on use so a missing optional engine costs nothing.
ADAPTERS: dict[str, str] = {
    "transformers": "coldstart.engine_adapters.transformers:TransformersAdapter",
    "vllm": "coldstart.engine_adapters.vllm:VllmAdapter",
    "sglang": "coldstart.engine_adapters.sglang:SglangAdapter",
    "custom": "coldstart.engine_adapters.custom:CustomAdapter",
}


def get_adapter(name: str, *, engine_python: str | None = None) -> EngineAdapter:
    """The adapter for ``name``; ``engine_python`` names the engine's own environment (vllm, sglang)."""
    if name not in ADAPTERS:
        raise UnknownEngine(f"unknown engine {name!r}; valid engines: {', '.join(sorted(ADAPTERS))}")
    module_name, class_name = ADAPTERS[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if engine_python is None:
        return cls()
    if not cls.own_environment:
        raise EngineArgsRefused(
            f"--engine-python applies to engines in an environment of their own (vllm, sglang), not "
            f"{name!r}, which runs in coldstart's"
        )
    return cls(engine_python=engine_python)
