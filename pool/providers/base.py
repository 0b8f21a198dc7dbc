"""The provider interface: where units come from, how they are checked, and how they go back."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

from coldstart.pool.health import HealthReport


@dataclass(frozen=True)
class Device:
    """What a provider handed out. ``index`` is the CUDA/NVML index on this host (local GPUs only)."""

    provider: str
    type_name: str
    id: str
    price_per_hour: float = 0.0
    uuid: str | None = None
    index: int | None = None

    @property
    def label(self) -> str:
        return f"{self.provider}:{self.id}"


class Provider(abc.ABC):
    name: ClassVar[str]
    kind: ClassVar[str]  # "gpu" or "cpu": what a replica placed on this provider's units runs on

    @abc.abstractmethod
    def capacity(self) -> int | None:
        """How many units this provider can hand out at once (None: no fixed limit)."""

    def default_type(self) -> str:
        return self.name

    @abc.abstractmethod
    async def allocate(self, type_name: str | None = None) -> Device:
        """Get one booted unit (waits the provider's lead time). Raises ``CapacityError`` when out."""

    @abc.abstractmethod
    async def free(self, device: Device) -> None:
        """Give the unit back (stop paying for it)."""

    @abc.abstractmethod
    def check(self, device: Device, deep: bool = False) -> HealthReport:
        """Blocking health check; the pool runs it in a worker thread."""

    def poll_failures(self, devices: list[Device]) -> dict[str, str]:
        """Passive monitoring: ``device.id -> reason`` for units that broke while in use. Non-blocking."""
        return {}

    @abc.abstractmethod
    def describe(self) -> list[str]:
        """One line per unit or instance type, for ``coldstart pool inventory``."""

    def close(self) -> None:
        """Release provider-wide resources (NVML handles)."""
