from __future__ import annotations

import pytest
from fake_nvml import FakeGpu, FakeNvml, gpus

from coldstart.pool.errors import NoDriverError, NvmlError
from coldstart.pool.health import HealthPolicy, active_check
from coldstart.pool.nvml import DRIVER_MISSING_ERRORS, Nvml, XidWatch
from coldstart.pool.providers.local import LocalProvider

NO_MATMUL = HealthPolicy(matmul=False)


def test_real_nvml_on_this_host_says_no_driver() -> None:
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:  # pragma: no cover - a host with a driver
        pynvml.nvmlShutdown()
        pytest.skip("this host has an NVIDIA driver")
    with pytest.raises(NoDriverError, match="no NVIDIA driver on this host"):
        LocalProvider()


@pytest.mark.parametrize("name", DRIVER_MISSING_ERRORS)
def test_every_driver_missing_error_maps_to_no_driver(name: str) -> None:
    fake = FakeNvml(gpus(1))

    def fail() -> None:
        raise getattr(fake, name)("missing")

    fake.nvmlInit = fail  # type: ignore[method-assign]
    with pytest.raises(NoDriverError) as info:
        Nvml(fake).init()
    assert isinstance(info.value.__cause__, fake.NVMLError)


def test_other_nvml_errors_map_to_nvml_error() -> None:
    fake = FakeNvml([FakeGpu(lost=True)])
    nvml = Nvml(fake)
    nvml.init()
    with pytest.raises(NvmlError, match="NVML nvmlDevice.* failed: GPU is lost"):
        nvml.read(0)


def test_healthy_gpu_passes_every_check() -> None:
    nvml = Nvml(FakeNvml(gpus(1)))
    nvml.init()
    report = active_check(nvml, 0, NO_MATMUL)
    assert report.ok, report.summary()
    assert {c.name for c in report.checks} == {
        "answers",
        "ecc",
        "retired-pages",
        "temperature",
        "clocks",
        "xid",
    }


@pytest.mark.parametrize(
    ("override", "failed"),
    [
        ({"ecc_uncorrected": 3}, "ecc"),
        ({"retired_pending": True}, "retired-pages"),
        ({"temperature_c": 88}, "temperature"),
        ({"sm_clock_mhz": 0}, "clocks"),
        ({"lost": True}, "answers"),
    ],
)
def test_each_fault_fails_its_check(override: dict[str, object], failed: str) -> None:
    nvml = Nvml(FakeNvml(gpus(1, **override)))
    nvml.init()
    report = active_check(nvml, 0, NO_MATMUL)
    assert not report.ok
    assert [c.name for c in report.checks if not c.ok] == [failed]


def test_unsupported_readings_are_not_failures() -> None:
    nvml = Nvml(FakeNvml(gpus(1, ecc_uncorrected=None, retired_pending=None, slowdown_temp_c=None)))
    nvml.init()
    report = active_check(nvml, 0, NO_MATMUL)
    assert report.ok
    assert "not supported" in {c.name: c.detail for c in report.checks}["ecc"]


def test_critical_xid_fails_and_harmless_xid_does_not() -> None:
    fake = FakeNvml(gpus(2))
    nvml = Nvml(fake)
    nvml.init()
    watch = XidWatch(nvml, [0, 1])
    fake.gpus[1].xids.extend([13, 79])
    events = watch.poll()
    assert [(e.index, e.xid) for e in events] == [(1, 13), (1, 79)]
    assert active_check(nvml, 1, NO_MATMUL, [13]).ok  # XID 13: an application error
    assert not active_check(nvml, 1, NO_MATMUL, [13, 79]).ok  # XID 79: fell off the bus
    watch.close()


def test_matmul_is_skipped_without_cuda() -> None:
    nvml = Nvml(FakeNvml(gpus(1)))
    nvml.init()
    report = active_check(nvml, 0, HealthPolicy(matmul=True, matmul_size=8))
    assert report.ok
    assert "skipped" in {c.name: c.detail for c in report.checks}["matmul"]


def test_local_provider_lists_fake_gpus() -> None:
    provider = LocalProvider(Nvml(FakeNvml(gpus(2))), NO_MATMUL)
    assert provider.capacity() == 2
    lines = provider.describe()
    assert lines[0].startswith("driver") and "gpu1" in lines[2]
    provider.close()
