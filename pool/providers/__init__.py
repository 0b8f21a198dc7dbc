"""Providers of units: ``local`` (this host's GPUs via NVML), ``simulated`` (cloud instance types) and
``cpu`` (CPU slots, for hosts without GPUs). ``make_provider(name, **options)`` is the registry."""

from __future__ import annotations

import importlib
from typing import Any

from coldstart.pool.errors import UnknownProviderError
from coldstart.pool.providers.base import Device, Provider

# name -> "module:class", imported only when asked for: the CPU provider must not need what the others
# import (numpy for ``simulated``, nvidia-ml-py for ``local``), so a CPU-only install serves.
_PROVIDERS = {
    "local": "coldstart.pool.providers.local:LocalProvider",
    "simulated": "coldstart.pool.providers.simulated:SimulatedProvider",
    "cpu": "coldstart.pool.providers.cpu:CpuProvider",
}
PROVIDER_NAMES = tuple(_PROVIDERS)


def provider_class(name: str) -> type[Provider]:
    if name not in _PROVIDERS:
        raise UnknownProviderError(f"unknown provider {name!r}; valid: {', '.join(_PROVIDERS)}")
    module, _, cls = _PROVIDERS[name].partition(":")
    found: type[Provider] = getattr(importlib.import_module(module), cls)
    return found


def make_provider(name: str, **options: Any) -> Provider:
    return provider_class(name)(**options)


__all__ = ["Device", "Provider", "PROVIDER_NAMES", "make_provider"]
