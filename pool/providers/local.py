"""``local``: the NVIDIA GPUs of this host, found and checked through NVML.

On a host without a driver, constructing it raises ``NoDriverError`` with one line that says so and
points at the ``cpu`` provider. Units are whole GPUs; allocation is instant (they are already here), so the
buffer only saves the health check. A GPU that fails a check is quarantined: not handed out again by this
provider (``quarantined`` says why; ``coldstart pool health`` re-checks by hand).
"""

from __future__ import annotations

from coldstart.pool.errors import CapacityError, NoDriverError
from coldstart.pool.health import HealthPolicy, HealthReport, active_check, deep_check
from coldstart.pool.nvml import Nvml, XidWatch
from coldstart.pool.providers.base import Device, Provider


class LocalProvider(Provider):
    name = "local"
    kind = "gpu"

    def __init__(self, nvml: Nvml | None = None, policy: HealthPolicy | None = None) -> None:
        self.nvml = nvml or Nvml()
        self.policy = policy or HealthPolicy()
        self.nvml.init()
        self.count = self.nvml.device_count()
        if self.count == 0:
            self.nvml.shutdown()
            raise NoDriverError("the NVIDIA driver sees no GPUs on this host; use the 'cpu' provider")
        self.devices = [
            Device("local", self.nvml.name(i), f"gpu{i}", uuid=self.nvml.uuid(i), index=i)
            for i in range(self.count)
        ]
        self._watch = XidWatch(self.nvml, list(range(self.count)))
        self._xids: dict[int, list[int]] = {i: [] for i in range(self.count)}
        self._used: set[int] = set()
        self.quarantined: dict[int, str] = {}

    def capacity(self) -> int:
        return self.count

    def default_type(self) -> str:
        return self.devices[0].type_name

    def _drain_xids(self) -> None:
        for event in self._watch.poll(0):
            self._xids.setdefault(event.index, []).append(event.xid)

    async def allocate(self, type_name: str | None = None) -> Device:
        for device in self.devices:
            index = device.index or 0
            if (
                index not in self._used
                and index not in self.quarantined
                and type_name in (None, device.type_name)
            ):
                self._used.add(device.index or 0)
                return device
        bad = f", {len(self.quarantined)} quarantined after failed checks" if self.quarantined else ""
        raise CapacityError(f"all {self.count} local GPUs are in use{bad}; stop a replica or add GPUs")

    async def free(self, device: Device) -> None:
        self._used.discard(device.index or 0)

    def check(self, device: Device, deep: bool = False) -> HealthReport:
        index = device.index or 0
        self._drain_xids()
        pending = self._xids.get(index, [])
        run = deep_check if deep else active_check
        report = run(self.nvml, index, self.policy, pending)
        if report.ok:
            self._xids[index] = []  # seen and judged harmless
        else:
            self.quarantined[index] = report.summary()
        return report

    def poll_failures(self, devices: list[Device]) -> dict[str, str]:
        self._drain_xids()
        out = {}
        for device in devices:
            critical = [x for x in self._xids.get(device.index or 0, []) if x in self.policy.critical_xids]
            if critical:
                out[device.id] = f"critical XID {critical} on {device.label}"
                self.quarantined[device.index or 0] = out[device.id]
        return out

    def describe(self) -> list[str]:
        lines = [f"driver {self.nvml.driver_version()}"]
        for d in self.devices:
            r = self.nvml.read(d.index or 0)
            lines.append(
                f"{d.id}  {r.name}  {r.uuid}  {r.memory_total // 2**20} MiB  {r.temperature_c} C  "
                f"SM {r.sm_clock_mhz}/{r.sm_clock_max_mhz} MHz  "
                + ("in use" if d.index in self._used else self.quarantined.get(d.index or 0, "free"))
            )
        return lines

    def close(self) -> None:
        self._watch.close()
        self.nvml.shutdown()
