"""Errors of the GPU layer (CUDA checkpoint driver API, NVML): one line each, naming what to do.

    ColdstartError (launcher/errors.py)
    └── GpuError                  base of everything below
        ├── NoNvidiaDriver        libcuda / libnvidia-ml not found: no NVIDIA driver on this host
        ├── CheckpointUnsupported the driver (or cuda-bindings) has no CUDA checkpoint API
        ├── CudaCallFailed        a driver call returned an error; carries call, pid and CUresult name
        │   └── LockTimeout       lock timed out; the process was left RUNNING (snapshot aborted)
        ├── CudaStateError        a process was not in the state a step expects
        ├── GpuRefused            a setup we refuse: tensor parallel > 1, old driver, other GPU model, ...
        └── GpuNotFound           a GPU UUID that this host does not have

Foreign errors (``cuda.bindings`` raising ``RuntimeError`` without a driver, ``pynvml.NVMLError``) are
mapped only in ``cuda_checkpoint.py`` and ``gpu_inventory.py``. Kept apart from ``errors.py`` so the
GPU layer can land without touching the CPU launcher's error tree; both share ``ColdstartError``.
"""

from __future__ import annotations

from coldstart.launcher.errors import ColdstartError


class GpuError(ColdstartError):
    pass


class NoNvidiaDriver(GpuError):
    pass


class CheckpointUnsupported(GpuError):
    pass


class CudaCallFailed(GpuError):
    def __init__(self, message: str, *, call: str, pid: int | None, result: str) -> None:
        super().__init__(message)
        self.call = call
        self.pid = pid
        self.result = result  # CUresult name, e.g. CUDA_ERROR_ILLEGAL_STATE


class LockTimeout(CudaCallFailed):
    pass


class CudaStateError(GpuError):
    pass


class GpuRefused(GpuError):
    pass


class GpuNotFound(GpuError):
    pass
