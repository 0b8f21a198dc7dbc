"""State a restored process shares with every other replica restored from the same snapshot, and how to
make it its own again. No torch import here: torch and NumPy are reseeded only if the engine imported them.

Two replicas restored from one image start with byte-identical memory: the same Python/NumPy/torch RNG
state (they would sample the same tokens at temperature 1), the same ``tempfile`` name generator (whose
pid check does not help: CRIU restores the same pid inside each replica's PID namespace), and the
hostname/boot id read at boot. ``refresh_process_state`` runs first on every after-restore.
"""

from __future__ import annotations

import os
import random
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ProcessIdentity:
    """What the process knows about where and when it runs, re-read after each restore."""

    hostname: str
    boot_id: str
    pid: int
    started_at: float  # wall-clock time of this refresh (boot, or the latest restore)
    rng_seed: int  # the seed the RNGs got from fresh entropy
    refreshes: int  # 0 at boot, +1 per after-restore

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def fresh_seed() -> int:
    """64 bits from the kernel's entropy pool: differs between replicas restored from one image."""
    return int.from_bytes(os.urandom(8), "little")


def reseed_rngs(seed: int | None = None) -> int:
    """Reseed Python's ``random``, NumPy's global RNG and torch's CPU and CUDA generators; returns the seed.

    Generators the engine created itself (``numpy.random.default_rng()``, ``torch.Generator``) are its own
    business: reseed them in an after-restore hook with the returned seed.
    """
    seed = fresh_seed() if seed is None else seed
    random.seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(seed % 2**32)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)  # also seeds every CUDA device (lazily if CUDA is not initialised)
    return seed


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


_identity: ProcessIdentity | None = None


def process_identity() -> ProcessIdentity:
    """The latest identity (read at first use, refreshed by ``refresh_process_state``)."""
    global _identity
    if _identity is None:
        _identity = ProcessIdentity(socket.gethostname(), _boot_id(), os.getpid(), time.time(), 0, 0)
    return _identity


def refresh_process_state() -> ProcessIdentity:
    """Make a restored process its own: fresh RNG seeds, fresh temp names, host identity and clock re-read."""
    global _identity
    previous = process_identity()
    seed = reseed_rngs()
    # tempfile's name generator re-seeds only when the pid changes; restored replicas keep the pid.
    tempfile._name_sequence = None  # type: ignore[attr-defined]
    _identity = ProcessIdentity(
        socket.gethostname(), _boot_id(), os.getpid(), time.time(), seed, previous.refreshes + 1
    )
    return _identity
