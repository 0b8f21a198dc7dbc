"""The GPU layer's errors live in the launcher's one tree (``coldstart.launcher.errors``); re-exported here
so GPU modules read ``from coldstart.launcher.gpu.errors import ...`` as before."""

from coldstart.launcher.errors import (
    CheckpointUnsupported,
    CudaCallFailed,
    CudaCallTimeout,
    CudaStateError,
    GpuError,
    GpuNotFound,
    GpuRefused,
    LockTimeout,
    NoNvidiaDriver,
)

__all__ = [
    "CheckpointUnsupported",
    "CudaCallFailed",
    "CudaCallTimeout",
    "CudaStateError",
    "GpuError",
    "GpuNotFound",
    "GpuRefused",
    "LockTimeout",
    "NoNvidiaDriver",
]
