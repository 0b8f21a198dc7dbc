"""Checkpointers: save a running engine's process tree into a folder and restore it as a new sandbox.

Registered by name in ``coldstart.launcher.checkpointers.registry`` (``runsc``, ``criu``; ``cuda`` composes
with either). ``--snapshot off`` uses no checkpointer and a ``PlainSandbox``.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from coldstart.launcher.sandboxes.base import Sandbox


@dataclass(frozen=True)
class CheckpointerInfo:
    """What ``probe()`` found: version (part of the snapshot identity) and optional capabilities."""

    name: str
    version: str
    capabilities: frozenset[str] = field(default_factory=frozenset)


class Checkpointer(abc.ABC):
    name: ClassVar[str]
    # CRIU's plugin folder (``--libdir``), given explicitly to every CRIU this checkpointer runs; None:
    # CRIU's default. The CUDA checkpointer sets an empty one on its CRIU (no ``cuda_plugin.so``).
    plugin_dir: Path | None = None

    @abc.abstractmethod
    def probe(self) -> CheckpointerInfo:
        """Find the tool, its version and flags. Raise ``CheckpointerUnavailable`` with the fix."""

    @abc.abstractmethod
    def new_sandbox(self, workdir: Path, replica_id: str) -> Sandbox:
        """A sandbox this checkpointer can later checkpoint; ``workdir`` is private scratch space."""

    @abc.abstractmethod
    async def checkpoint(self, sandbox: Sandbox, image_dir: Path, *, leave_running: bool) -> None:
        """Write the sandbox's process tree into ``image_dir`` (empty, already created).

        The engine must hold no established or TIME_WAIT TCP connections; the caller drains them.
        With ``leave_running`` the engine keeps serving afterwards (used for the first replica).
        """

    @abc.abstractmethod
    async def restore(self, image_dir: Path, workdir: Path, replica_id: str) -> Sandbox:
        """A new running sandbox restored from ``image_dir``; does not modify ``image_dir``."""

    async def restore_onto(
        self, image_dir: Path, workdir: Path, replica_id: str, target_gpu: str | None
    ) -> Sandbox:
        """``restore`` onto the GPU with UUID ``target_gpu`` (the pool unit's). Checkpointers that do not
        place GPU state (CRIU, runsc: the engine finds its GPU at first use) ignore it."""
        return await self.restore(image_dir, workdir, replica_id)

    def check_engine_args(self, engine_args: Sequence[str]) -> None:
        """Refuse engine arguments this checkpointer cannot snapshot (``GpuRefused`` / ``UsageError``,
        naming the fix). Called for the checkpointer actually picked, ``--snapshot auto`` included."""
