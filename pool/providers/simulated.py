"""``simulated``: cloud instance types with a price, a lognormal allocation lead time, a supply cap and a
boot failure rate. Deterministic for a seed. ``time_scale`` shrinks the waits (tests use 0)."""

from __future__ import annotations

import asyncio

import numpy as np

from coldstart.pool.catalog import InstanceType, default_types
from coldstart.pool.errors import CapacityError, ConfigError
from coldstart.pool.health import HealthReport
from coldstart.pool.providers.base import Device, Provider


class SimulatedProvider(Provider):
    name = "simulated"
    kind = "gpu"

    def __init__(
        self, types: list[InstanceType] | None = None, seed: int = 0, time_scale: float = 1.0
    ) -> None:
        self.types = {t.name: t for t in (types or default_types())}
        if not self.types:
            raise ConfigError("simulated provider needs at least one instance type")
        self.rng = np.random.default_rng(seed)
        self.time_scale = time_scale
        self.in_use: dict[str, int] = {name: 0 for name in self.types}
        self._serial = 0

    def capacity(self) -> int:
        return sum(t.supply_cap for t in self.types.values())

    def default_type(self) -> str:
        return min(self.types.values(), key=lambda t: t.lead_time_s).name

    async def allocate(self, type_name: str | None = None) -> Device:
        name = type_name or self.default_type()
        if name not in self.types:
            raise ConfigError(f"unknown instance type {name!r}; valid: {', '.join(self.types)}")
        itype = self.types[name]
        if self.in_use[name] >= itype.supply_cap:
            raise CapacityError(f"{name}: supply cap of {itype.supply_cap} units reached; buy another type")
        self.in_use[name] += 1
        try:
            await asyncio.sleep(itype.sample_lead_time(self.rng) * self.time_scale)
        except BaseException:
            self.in_use[name] -= 1
            raise
        self._serial += 1
        return Device("simulated", name, f"{name}-{self._serial}", price_per_hour=itype.price_per_hour)

    async def free(self, device: Device) -> None:
        self.in_use[device.type_name] -= 1

    def check(self, device: Device, deep: bool = False) -> HealthReport:
        report = HealthReport(device.label)
        failed = bool(self.rng.random() < self.types[device.type_name].failure_rate)
        report.add("simulated", not failed, "simulated XID 79 (fell off the bus)" if failed else "ok")
        return report

    def describe(self) -> list[str]:
        return [
            f"{t.name}  ${t.price_per_hour:.2f}/h  lead {t.lead_time_s:.0f}s  cap {t.supply_cap}  "
            f"fail {t.failure_rate:.1%}  in use {self.in_use[t.name]}"
            for t in self.types.values()
        ]
