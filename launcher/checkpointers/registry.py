"""Checkpointers by name: ``--snapshot criu|runsc|cuda|auto|off``.

``auto`` is the first that probes as working here, in order of preference: ``cuda`` (CUDA driver API + CRIU,
only where an NVIDIA driver is), ``criu`` (host processes: fastest cold boot and restore on this machine),
``runsc`` (gVisor: stronger isolation, ~4x slower cold boot here). ``coldstart doctor`` shows the probes.
"""

from __future__ import annotations

from collections.abc import Callable

from coldstart.launcher.checkpointers.base import Checkpointer, CheckpointerInfo
from coldstart.launcher.config import CheckpointerName
from coldstart.launcher.errors import CheckpointerUnavailable, UsageError


def _criu() -> Checkpointer:
    from coldstart.launcher.checkpointers.criu import CriuCheckpointer

    return CriuCheckpointer()


def _runsc() -> Checkpointer:
    from coldstart.launcher.checkpointers.runsc import RunscCheckpointer

    return RunscCheckpointer()


def _cuda() -> Checkpointer:
    from coldstart.launcher.checkpointers.cuda import CudaCheckpointer

    return CudaCheckpointer(_criu())


# Keyed by the one list of names (config.CheckpointerName; a StrEnum, so plain strings look up too).
CHECKPOINTERS: dict[str, Callable[[], Checkpointer]] = {
    CheckpointerName.CUDA: _cuda,
    CheckpointerName.CRIU: _criu,
    CheckpointerName.RUNSC: _runsc,
}
AUTO_ORDER = (CheckpointerName.CUDA, CheckpointerName.CRIU, CheckpointerName.RUNSC)
SPECIAL = (CheckpointerName.AUTO, CheckpointerName.OFF)


def get_checkpointer(name: str) -> Checkpointer:
    """A checkpointer by name (not probed yet); ``auto`` probes and returns the best working one."""
    if name == CheckpointerName.AUTO:
        return best_available()
    factory = CHECKPOINTERS.get(name)
    if factory is None:
        valid = ", ".join([*CHECKPOINTERS, *SPECIAL])
        raise UsageError(f"unknown checkpointer {name!r}: valid are {valid}")
    return factory()


def probe_all() -> dict[str, CheckpointerInfo | CheckpointerUnavailable]:
    """Every checkpointer's probe result: its info, or why it does not work here."""
    results: dict[str, CheckpointerInfo | CheckpointerUnavailable] = {}
    for name in AUTO_ORDER:
        try:
            results[name] = CHECKPOINTERS[name]().probe()
        except CheckpointerUnavailable as exc:
            results[name] = exc
    return results


def best_available() -> Checkpointer:
    reasons = []
    for name in AUTO_ORDER:
        checkpointer = CHECKPOINTERS[name]()
        try:
            checkpointer.probe()
        except CheckpointerUnavailable as exc:
            reasons.append(f"{name}: {exc}")
            continue
        return checkpointer
    raise CheckpointerUnavailable(
        "no checkpointer works here (" + "; ".join(reasons) + "); use --snapshot off"
    )
