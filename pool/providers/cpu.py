"""``cpu``: N CPU slots treated as units, so a launcher on a host without GPUs runs CPU replicas
through the same acquire/release path (health checks always pass; nothing is paid for)."""

from __future__ import annotations

import os

from coldstart.pool.errors import CapacityError, ConfigError
from coldstart.pool.health import HealthReport
from coldstart.pool.providers.base import Device, Provider


class CpuProvider(Provider):
    name = "cpu"
    kind = "cpu"

    def __init__(self, slots: int | None = None) -> None:
        self.slots = slots if slots is not None else max(1, os.cpu_count() or 1)
        if self.slots < 0:
            raise ConfigError(f"cpu provider: slots must be >= 0, got {self.slots}")
        self._used: set[int] = set()

    def capacity(self) -> int:
        return self.slots

    def default_type(self) -> str:
        return "cpu-slot"

    async def allocate(self, type_name: str | None = None) -> Device:
        free = [i for i in range(self.slots) if i not in self._used]
        if not free:
            raise CapacityError(f"all {self.slots} CPU slots are in use; raise --cpu-slots or stop a replica")
        self._used.add(free[0])
        return Device("cpu", "cpu-slot", f"cpu{free[0]}")

    async def free(self, device: Device) -> None:
        self._used.discard(int(device.id.removeprefix("cpu")))

    def check(self, device: Device, deep: bool = False) -> HealthReport:
        report = HealthReport(device.label)
        report.add("cpu", True, "CPU slot (no GPU checks)")
        return report

    def describe(self) -> list[str]:
        return [f"cpu{i}  {'in use' if i in self._used else 'free'}" for i in range(self.slots)]
