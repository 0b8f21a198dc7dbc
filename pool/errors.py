"""Errors of ``coldstart.pool``: one line each, what failed and what to do.

Foreign errors (NVML, OR-Tools, file I/O of traces) are mapped here, at one boundary each
(``nvml.py`` for NVML, ``sizing.py`` for GLOP, ``trace.py`` for trace files), with ``raise ... from exc``.

Tree::

    PoolError
    ├── NoDriverError              no NVIDIA driver / NVML library on this host
    ├── NvmlError                  any other NVML call failure (GPU lost, not permitted, ...)
    ├── IllegalTransitionError     a unit was asked to move between states the lifecycle forbids
    ├── UnknownProviderError       a provider name not in the registry (lists the valid names)
    ├── CapacityError              the provider has no more units to hand out (supply cap reached)
    ├── AcquireTimeoutError        no healthy idle unit became available in time
    ├── PoolClosedError            acquire/release on a pool that was closed
    ├── SizingError                the buffer LP could not give a plan
    │   ├── InfeasibleSizingError  supply caps cannot cover the forecast spike at this confidence
    │   └── SolverError            GLOP failed or returned a status other than optimal
    └── ConfigError                bad parameters, instance-type files or trace files
"""

from __future__ import annotations


class PoolError(Exception):
    """Base of every error ``coldstart.pool`` raises on purpose."""


class NoDriverError(PoolError):
    """NVML cannot be loaded: this host has no NVIDIA driver (or no GPUs it can see)."""


class NvmlError(PoolError):
    """An NVML call failed for a reason other than a missing driver."""


class IllegalTransitionError(PoolError):
    """A unit state change the lifecycle does not allow."""


class UnknownProviderError(PoolError):
    """A provider name that is not registered."""


class CapacityError(PoolError):
    """The provider cannot hand out another unit (supply cap or all local GPUs in use)."""


class AcquireTimeoutError(PoolError):
    """No healthy unit became idle within the caller's timeout."""


class PoolClosedError(PoolError):
    """The pool was closed."""


class SizingError(PoolError):
    """The buffer-sizing linear program gave no usable plan."""


class InfeasibleSizingError(SizingError):
    """The supply caps cannot cover the forecast spike at the asked confidence."""


class SolverError(SizingError):
    """GLOP failed or did not reach an optimal solution."""


class ConfigError(PoolError):
    """Invalid parameters, instance-type catalogue or trace file."""
