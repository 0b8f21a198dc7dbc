"""Providers of units: ``local`` (this host's GPUs via NVML), ``simulated`` (cloud instance types) and
``cpu`` (CPU slots, for hosts without GPUs). ``make_provider(name, **options)`` is the registry."""

from __future__ import annotations

from typing import Any

from coldstart.pool.errors import UnknownProviderError
from coldstart.pool.providers.base import Device, Provider


def _registry() -> dict[str, type[Provider]]:
    from coldstart.pool.providers.cpu import CpuProvider
    from coldstart.pool.providers.local import LocalProvider
    from coldstart.pool.providers.simulated import SimulatedProvider

    return {"local": LocalProvider, "simulated": SimulatedProvider, "cpu": CpuProvider}


PROVIDER_NAMES = ("local", "simulated", "cpu")


def make_provider(name: str, **options: Any) -> Provider:
    registry = _registry()
    if name not in registry:
        raise UnknownProviderError(f"unknown provider {name!r}; valid: {', '.join(registry)}")
    return registry[name](**options)


__all__ = ["Device", "Provider", "PROVIDER_NAMES", "make_provider"]
