"""The scheduler API the launcher uses: acquire the fastest healthy unit, release it, never hand out a
unit that failed its health check."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from fake_nvml import FakeNvml, gpus

from coldstart.pool.catalog import InstanceType
from coldstart.pool.errors import AcquireTimeoutError, PoolClosedError, UnknownProviderError
from coldstart.pool.health import HealthPolicy
from coldstart.pool.nvml import Nvml
from coldstart.pool.providers import make_provider
from coldstart.pool.providers.local import LocalProvider
from coldstart.pool.scheduler import Pool
from coldstart.pool.states import UnitState

S = UnitState


def local(fake: FakeNvml) -> LocalProvider:
    return LocalProvider(Nvml(fake), HealthPolicy(matmul=False))


def test_acquire_serves_from_the_buffer_and_release_returns_to_it() -> None:
    async def main() -> None:
        async with Pool(make_provider("simulated", time_scale=0.0), target_idle=1) as pool:
            unit = await pool.acquire(timeout=5)
            assert unit.state is S.ASSIGNED and unit.device is not None
            await pool.release(unit)
            assert unit.state is S.IDLE
            again = await pool.acquire(timeout=5)
            assert again is unit  # the idle healthy one, not a new one
            await pool.release(again)
        assert all(u.state is S.RELEASED for u in pool.inventory.units.values())

    asyncio.run(main())


def test_a_gpu_failing_its_health_check_never_gets_a_replica() -> None:
    fake = FakeNvml(gpus(2))
    fake.gpus[0].temperature_c = 95  # gpu0 is too hot

    async def main() -> None:
        async with Pool(local(fake), target_idle=0) as pool:
            unit = await pool.acquire(timeout=5)
            assert unit.device is not None and unit.device.id == "gpu1"
            with pytest.raises(AcquireTimeoutError, match="no healthy local unit within 0.2s"):
                await pool.acquire(timeout=0.2)
            failed = [t for t in pool.inventory.log if t.dst is S.FAILED]
            assert failed and "temperature" in failed[0].reason
            assert not any(u.state is S.ASSIGNED and u.device and u.device.id == "gpu0"
                           for u in pool.inventory.units.values())  # fmt: skip

    asyncio.run(main())


def test_xid_while_assigned_fails_the_unit_and_tells_the_owner() -> None:
    fake = FakeNvml(gpus(1))
    seen: list[str] = []

    async def main() -> None:
        async with Pool(local(fake), target_idle=0, monitor_every_s=3600) as pool:
            pool.on_failure.append(lambda unit, reason: seen.append(f"{unit.id}: {reason}"))
            unit = await pool.acquire(timeout=5)
            fake.gpus[0].xids.append(79)
            await pool.monitor_once()
            assert unit.state is S.FAILED
            assert seen == ["u1: critical XID [79] on local:gpu0"]
            await pool.release(unit)
            assert unit.state is S.RELEASED

    asyncio.run(main())


def test_failed_simulated_units_are_replaced() -> None:
    flaky = InstanceType("flaky", 2.0, 10.0, supply_cap=50, failure_rate=0.5)

    async def main() -> None:
        provider = make_provider("simulated", types=[flaky], seed=3, time_scale=0.0)
        async with Pool(provider, target_idle=3) as pool:
            units = [await pool.acquire(timeout=5) for _ in range(3)]
            assert all(u.last_health.endswith("healthy (1 checks)") for u in units)
            assert pool.counts()["released"] > 0  # some failed their check and were handed back

    asyncio.run(main())


def test_cpu_provider_runs_without_any_gpu() -> None:
    async def main() -> None:
        async with Pool(make_provider("cpu", slots=2), target_idle=0) as pool:
            assert pool.kind == "cpu"
            a, b = await pool.acquire(timeout=1), await pool.acquire(timeout=1)
            assert {a.device.id, b.device.id} == {"cpu0", "cpu1"}  # type: ignore[union-attr]
            with pytest.raises(AcquireTimeoutError):
                await pool.acquire(timeout=0.1)
            await pool.release(a)
            assert (await pool.acquire(timeout=1)).device.id == a.device.id  # type: ignore[union-attr]

    asyncio.run(main())


def test_zero_units_is_not_an_error_until_one_is_asked_for() -> None:
    async def main() -> None:
        pool = Pool(make_provider("cpu", slots=0), target_idle=2)
        await pool.start()
        assert pool.counts()["requested"] == 0
        await pool.close()
        with pytest.raises(PoolClosedError):
            await pool.acquire(timeout=0.1)

    asyncio.run(main())


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Yield to the pool's tasks until ``condition`` holds (a deadline only against a hang)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0)


def test_set_target_trims_the_buffer() -> None:
    async def main() -> None:
        async with Pool(make_provider("cpu", slots=4), target_idle=3) as pool:
            await _until(lambda: pool.counts()["idle"] == 3)
            pool.set_target(1)
            await _until(lambda: pool.counts()["idle"] <= 1)
            assert pool.counts()["idle"] == 1  # trimmed to the target, not below

    asyncio.run(main())


def test_unknown_provider_lists_valid_names() -> None:
    with pytest.raises(UnknownProviderError, match="valid: local, simulated, cpu"):
        make_provider("aws")


def test_pool_for_host_falls_back_to_cpu_slots_here() -> None:
    from coldstart.pool import pool_for_host, unit_env

    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:  # pragma: no cover
        pynvml.nvmlShutdown()
        pytest.skip("this host has an NVIDIA driver")

    async def main() -> None:
        async with pool_for_host(cpu_slots=1, target_idle=0) as pool:
            assert pool.kind == "cpu"
            unit = await pool.acquire(timeout=1)
            assert unit_env(unit) == {}

    asyncio.run(main())


def test_unit_env_pins_the_gpu() -> None:
    from coldstart.pool import unit_env

    async def main() -> None:
        async with Pool(local(FakeNvml(gpus(1))), target_idle=0) as pool:
            unit = await pool.acquire(timeout=1)
            assert unit_env(unit) == {"CUDA_VISIBLE_DEVICES": "GPU-00000000-fake"}

    asyncio.run(main())
