"""``coldstart-cuda-checkpoint`` (NVIDIA-compatible arguments), the NVML inventory, ``gpu_fingerprint`` and
the GPU rows of ``coldstart doctor``: against a fake GPU host, and against the real pynvml/cuda-bindings
on this machine, which has no NVIDIA driver."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys

import pytest

from coldstart.launcher.cli import cuda_checkpoint as cli
from coldstart.launcher.errors import GpuNotFound, NoNvidiaDriver
from coldstart.launcher.gpu.doctor import _kernel_row, gpu_checks, gvisor_reason
from coldstart.launcher.gpu.driver import CudaCheckpointAPI
from coldstart.launcher.gpu.fake import CUprocessState, FakeGpuHost
from coldstart.launcher.gpu.inventory import gpu_fingerprint, gpu_processes, read_inventory

PID = 777

# These use the real cuda-bindings/pynvml and expect no NVIDIA driver (as on CI and the dev box).
no_driver = pytest.mark.skipif(
    bool(ctypes.util.find_library("cuda") or ctypes.util.find_library("nvidia-ml")),
    reason="an NVIDIA driver is installed here; the no-driver error mapping is tested where there is none",
)


@pytest.fixture
def host() -> FakeGpuHost:
    h = FakeGpuHost.with_gpus("NVIDIA H200", count=2, driver_version="580.65.06")
    h.add_process(PID, gpus=[h.gpus[0].uuid], device_bytes=5 << 30)
    return h


def cuda_cli(host: FakeGpuHost, *argv: str) -> int:
    return cli.main(list(argv), api=CudaCheckpointAPI(host.driver))


# -- the command -----------------------------------------------------------------------------------


def test_get_state_prints_nvidia_words(host: FakeGpuHost, capsys: pytest.CaptureFixture[str]) -> None:
    assert cuda_cli(host, "--get-state", "--pid", str(PID)) == 0
    assert capsys.readouterr().out == "running\n"


def test_toggle_twice_round_trips(host: FakeGpuHost) -> None:
    assert cuda_cli(host, "--toggle", "--pid", str(PID)) == 0
    assert host.state(PID) == "checkpointed"
    assert cuda_cli(host, "--toggle", "-p", str(PID)) == 0
    assert host.state(PID) == "running"
    assert host.transitions(PID) == ["lock", "checkpoint", "restore", "unlock"]


def test_actions_one_by_one_with_device_map(host: FakeGpuHost, capsys: pytest.CaptureFixture[str]) -> None:
    old, new = host.gpus[0].uuid, host.gpus[1].uuid
    assert cuda_cli(host, "--action", "lock", "--pid", str(PID), "--timeout", "2000") == 0
    assert cuda_cli(host, "--action", "checkpoint", "--pid", str(PID)) == 0
    assert cuda_cli(host, "--get-state", "--pid", str(PID)) == 0
    assert cuda_cli(host, "--action", "restore", "--pid", str(PID), "--device-map", f"{old}={new}") == 0
    assert cuda_cli(host, "--action", "unlock", "--pid", str(PID)) == 0
    assert cuda_cli(host, "--get-restore-tid", "--pid", str(PID)) == 0
    assert capsys.readouterr().out.split() == ["checkpointed", str(PID + 1)]
    assert host.processes[PID].gpus == [new]


def test_toggle_lock_timeout_is_one_line_and_leaves_it_running(
    host: FakeGpuHost, capsys: pytest.CaptureFixture[str]
) -> None:
    host.processes[PID].busy = True
    assert cuda_cli(host, "--toggle", "--pid", str(PID), "--timeout", "100") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "timed out" in err
    assert host.state(PID) == "running"


def test_toggle_checkpoint_failure_unlocks(host: FakeGpuHost, capsys: pytest.CaptureFixture[str]) -> None:
    host.fail("checkpoint", "CUDA_ERROR_NOT_SUPPORTED")
    assert cuda_cli(host, "--toggle", "--pid", str(PID)) == 1
    assert "UVM" in capsys.readouterr().err
    assert host.state(PID) == "running"


def test_toggle_refuses_locked(host: FakeGpuHost, capsys: pytest.CaptureFixture[str]) -> None:
    host.processes[PID].state = CUprocessState.CU_PROCESS_STATE_LOCKED
    assert cuda_cli(host, "--toggle", "--pid", str(PID)) == 1
    assert "cannot toggle CUDA process 777 in state locked" in capsys.readouterr().err


def test_wrong_state_action(host: FakeGpuHost, capsys: pytest.CaptureFixture[str]) -> None:
    assert cuda_cli(host, "--action", "unlock", "--pid", str(PID)) == 1
    assert "cannot unlock CUDA process 777 in state running" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--get-state"],
        ["--pid", "5"],
        ["--action", "freeze", "--pid", "5"],
        ["--toggle", "--get-state", "--pid", "5"],
        ["--toggle", "--pid", "0"],
        ["--toggle", "--pid", "5", "--timeout", "-1"],
        ["--action", "restore", "--pid", "5", "--device-map", "GPU-a"],
    ],
)
def test_usage_errors_exit_2(host: FakeGpuHost, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cuda_cli(host, *argv) == 2
    assert capsys.readouterr().err.startswith("coldstart-cuda-checkpoint: ")
    assert host.transitions() == []


def test_help_lists_the_flags_criu_probes(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["-h"]) == 0
    out = capsys.readouterr().out
    for flag in ("--get-state", "--action", "--toggle", "--get-restore-tid", "--timeout", "--device-map"):
        assert flag in out


@no_driver
def test_real_command_without_driver() -> None:
    """As runsc or CRIU would run it, here where there is no NVIDIA driver."""
    proc = subprocess.run(
        [sys.executable, "-m", "coldstart.launcher.cli.cuda_checkpoint", "--toggle", "--pid", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "coldstart-cuda-checkpoint: no NVIDIA driver on this host (libcuda.so.1 not found): "
        "install the NVIDIA driver >= 570"
    ]


# -- NVML inventory and fingerprint ----------------------------------------------------------------


def test_inventory(host: FakeGpuHost) -> None:
    host.gpus[1].persistence_mode = False
    inventory = read_inventory(host.nvml)
    assert inventory.driver_version == "580.65.06" and inventory.driver_major == 580
    assert [g.name for g in inventory.gpus] == ["NVIDIA H200", "NVIDIA H200"]
    assert [g.persistence_mode for g in inventory.gpus] == [True, False]
    assert inventory.gpus[0].memory_used == 5 << 30
    assert inventory.by_uuid(host.gpus[1].uuid).index == 1
    with pytest.raises(GpuNotFound, match="not on this host"):
        inventory.by_uuid("GPU-nope")


def test_gpu_processes(host: FakeGpuHost) -> None:
    procs = gpu_processes(host.nvml)
    assert procs[PID].gpus == (host.gpus[0].uuid,) and procs[PID].used_bytes == 5 << 30
    host.processes[PID].state = CUprocessState.CU_PROCESS_STATE_CHECKPOINTED
    assert gpu_processes(host.nvml) == {}  # a checkpointed process holds no GPU


def test_fingerprint(host: FakeGpuHost) -> None:
    assert gpu_fingerprint(host.nvml) == {"gpu_model": "NVIDIA H200", "gpu_driver_version": "580.65.06"}
    host.gpus[1].name = "NVIDIA H100 80GB HBM3"
    assert gpu_fingerprint(host.nvml)["gpu_model"] == "NVIDIA H100 80GB HBM3,NVIDIA H200"


@no_driver
def test_fingerprint_without_driver_is_empty() -> None:
    assert gpu_fingerprint() == {}  # the real pynvml, no driver here
    assert gpu_fingerprint(FakeGpuHost.with_gpus(driver_installed=False).nvml) == {}


@no_driver
def test_real_pynvml_without_driver_is_one_line_error() -> None:
    with pytest.raises(NoNvidiaDriver) as info:
        read_inventory()
    assert str(info.value).startswith("no NVIDIA driver on this host (libnvidia-ml.so.1 not found)")
    assert type(info.value.__cause__).__name__ == "NVMLError_LibraryNotFound"


# -- doctor rows -----------------------------------------------------------------------------------


def rows(host: FakeGpuHost) -> dict[str, tuple[str, str]]:
    return {c.name: (c.status, c.detail) for c in gpu_checks(host.nvml, host.driver)}


def test_doctor_on_a_good_host(host: FakeGpuHost) -> None:
    got = rows(host)
    assert got["nvidia driver"] == ("ok", "580.65.06")
    assert got["gpus"][0] == "ok" and got["gpus"][1].count("NVIDIA H200 141 GiB") == 2
    assert got["cuda checkpoint"] == ("ok", "driver 580.65.06 (CUDA 12.8): restore onto another GPU by UUID")
    assert got["persistence mode"] == ("ok", "on")


def test_doctor_r570_and_persistence_off(host: FakeGpuHost) -> None:
    host.driver_version = "570.86.10"
    host.gpus[0].persistence_mode = False
    got = rows(host)
    assert got["cuda checkpoint"][0] == "ok" and "same GPU only" in got["cuda checkpoint"][1]
    assert got["persistence mode"][0] == "warn" and "nvidia-smi -pm 1" in got["persistence mode"][1]


@pytest.mark.parametrize(("version", "status"), [("555.42.02", "warn"), ("535.183.01", "fail")])
def test_doctor_old_drivers(host: FakeGpuHost, version: str, status: str) -> None:
    host.driver_version = version
    assert rows(host)["cuda checkpoint"][0] == status


def test_doctor_bindings_without_checkpoint_api(host: FakeGpuHost) -> None:
    host.has_checkpoint_api = False
    status, detail = rows(host)["cuda checkpoint"]
    assert status == "fail" and "cuda-bindings has no cuCheckpointProcess" in detail


@no_driver
def test_doctor_without_driver_here() -> None:
    checks = gpu_checks()  # the real pynvml and cuda-bindings on this machine
    assert [(c.name, c.status) for c in checks] == [
        ("nvidia driver", "fail"),
        ("gpus", "skip"),
        ("cuda checkpoint", "skip"),
        ("persistence mode", "skip"),
    ]
    assert checks[0].detail.startswith("no NVIDIA driver on this host")
    assert all("\n" not in c.detail for c in checks)


@pytest.mark.parametrize(
    ("release", "dmesg", "found"),
    [
        ("4.4.0", "", "kernel 4.4.0"),
        ("4.19.0-gvisor", "", "kernel 4.19.0-gvisor"),
        ("6.18.44-fc-v310-gpu", "[    0.000000] Starting gVisor...\n", "dmesg 'Starting gVisor...'"),
        (
            "4.4.0",
            "[    0.000000] Starting gVisor...\n[    0.1] Daemonizing children...",
            "kernel 4.4.0, dmesg",
        ),
    ],
)
def test_gvisor_is_named_in_one_line(release: str, dmesg: str, found: str) -> None:
    reason = gvisor_reason(release, dmesg)
    assert reason is not None and found in reason and "CRIU cannot checkpoint here" in reason
    assert "\n" not in reason
    assert _kernel_row(release, dmesg).status == "fail"


@pytest.mark.parametrize("release", ["6.18.44-fc-v310-gpu", "6.1.0-27-amd64", "4.4.0-210-generic"])
def test_real_kernels_are_not_gvisor(release: str) -> None:
    assert gvisor_reason(release, "[    0.000000] Linux version 6.1.0\n") is None
    assert _kernel_row(release, "").status == "ok"


def test_this_host_is_not_gvisor() -> None:
    """This dev box and CI run a real kernel (CRIU works here): the probe must not cry wolf."""
    assert gvisor_reason() is None


def test_doctor_has_a_kernel_row(host: FakeGpuHost) -> None:
    assert rows(host)["kernel"][0] == "ok"
