"""Hook registration and the two phases that run them.

Semantics (the launcher relies on these):
- ``before_checkpoint`` hooks run in registration order, ``after_restore`` hooks in reverse registration
  order (what was set up last is undone first, as with ``contextlib.ExitStack``).
- Each hook has a timeout. A sync hook runs in its own thread (it cannot be killed: on timeout it is
  reported and left to finish); an async hook runs on the engine's event loop when ``serve`` was given one
  (or called from inside it), else on a private loop, and is cancelled on timeout.
- A failing before-checkpoint hook stops the phase and *rolls back*: every after-restore hook runs, so the
  engine goes back to serving and the launcher aborts the checkpoint. After-restore hooks must therefore be
  idempotent (safe when their counterpart never ran); the torch helpers are.
- A failing after-restore hook leaves the engine ``BROKEN``: the launcher discards the replica.
- ``refresh_process_state`` (fresh RNG seeds, temp names, host identity) runs before the user's
  after-restore hooks, so they already see fresh randomness.

States: SERVING --before ok--> CHECKPOINT_READY --after ok--> SERVING; a failed after -> BROKEN (final);
a failed before with a clean rollback -> SERVING, else BROKEN. A phase asked for in the wrong state is
refused with ``HookStateError`` and changes nothing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import inspect
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from coldstart.snapshot_hooks.errors import HookFailed, HookRegistrationError, HookStateError, HookTimeout
from coldstart.snapshot_hooks.process_state import refresh_process_state

DEFAULT_TIMEOUT_S = 60.0
HookFn = Callable[[], Any]


class Phase(enum.Enum):
    BEFORE_CHECKPOINT = "before_checkpoint"
    AFTER_RESTORE = "after_restore"


class EngineState(enum.Enum):
    SERVING = "serving"
    RUNNING_HOOKS = "running_hooks"
    CHECKPOINT_READY = "checkpoint_ready"
    BROKEN = "broken"


@dataclass(frozen=True)
class Hook:
    name: str
    fn: HookFn
    phase: Phase
    timeout_s: float


@dataclass
class HookRun:
    name: str
    seconds: float
    error: str | None = None


@dataclass
class PhaseResult:
    """What one phase did; sent to the launcher as JSON by the control channel."""

    phase: str
    ok: bool
    state: str
    hooks: list[HookRun] = field(default_factory=list)
    error: str | None = None
    failed_hook: str | None = None
    rolled_back: bool = False
    rollback_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class HookRegistry:
    """The hooks of one engine process. Module-level decorators use ``default_registry``."""

    def __init__(self, *, refresh_on_restore: bool = True) -> None:
        self._hooks: dict[Phase, list[Hook]] = {Phase.BEFORE_CHECKPOINT: [], Phase.AFTER_RESTORE: []}
        self._refresh_on_restore = refresh_on_restore
        self._state = EngineState.SERVING
        self._lock = threading.Lock()  # one phase at a time
        self._loop: asyncio.AbstractEventLoop | None = None
        self.last_result: PhaseResult | None = None

    # -- registration ----------------------------------------------------------------------------------
    def register(
        self, phase: Phase, fn: HookFn, *, timeout_s: float = DEFAULT_TIMEOUT_S, name: str | None = None
    ) -> HookFn:
        if not callable(fn):
            raise HookRegistrationError(f"{phase.value}: {fn!r} is not callable; decorate a function")
        if not timeout_s > 0:
            raise HookRegistrationError(f"{phase.value} hook {name or fn!r}: timeout_s must be > 0")
        label = name or getattr(fn, "__name__", None) or repr(fn)
        self._hooks[phase].append(Hook(label, fn, phase, float(timeout_s)))
        return fn

    def hooks(self, phase: Phase) -> list[Hook]:
        return list(self._hooks[phase])

    def attach_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Run async hooks on ``loop`` (the engine's own event loop) instead of a private one."""
        self._loop = loop

    @property
    def state(self) -> EngineState:
        return self._state

    # -- phases ----------------------------------------------------------------------------------------
    def run_before_checkpoint(self) -> PhaseResult:
        with self._phase(Phase.BEFORE_CHECKPOINT, allowed=EngineState.SERVING) as result:
            try:
                self._run_all(Phase.BEFORE_CHECKPOINT, self._hooks[Phase.BEFORE_CHECKPOINT], result)
            except HookFailed as exc:
                result.ok, result.error, result.failed_hook = False, str(exc), exc.hook
                rollback = PhaseResult(Phase.AFTER_RESTORE.value, True, "")
                try:
                    self._run_all(Phase.AFTER_RESTORE, self._after_hooks(refresh=False), rollback)
                except HookFailed as rollback_exc:
                    result.rollback_error = str(rollback_exc)
                    self._state = EngineState.BROKEN
                else:
                    result.rolled_back = True
                    self._state = EngineState.SERVING
            else:
                self._state = EngineState.CHECKPOINT_READY
        return result

    def run_after_restore(self) -> PhaseResult:
        with self._phase(Phase.AFTER_RESTORE, allowed=EngineState.CHECKPOINT_READY) as result:
            try:
                self._run_all(
                    Phase.AFTER_RESTORE, self._after_hooks(refresh=self._refresh_on_restore), result
                )
            except HookFailed as exc:
                result.ok, result.error, result.failed_hook = False, str(exc), exc.hook
                self._state = EngineState.BROKEN
            else:
                self._state = EngineState.SERVING
        return result

    def _after_hooks(self, *, refresh: bool) -> list[Hook]:
        hooks = list(reversed(self._hooks[Phase.AFTER_RESTORE]))
        if refresh:
            builtin = Hook(
                "coldstart.refresh_process_state", refresh_process_state, Phase.AFTER_RESTORE, 10.0
            )
            hooks.insert(0, builtin)
        return hooks

    class _PhaseScope:
        def __init__(self, registry: HookRegistry, phase: Phase, allowed: EngineState) -> None:
            self.registry, self.phase, self.allowed = registry, phase, allowed

        def __enter__(self) -> PhaseResult:
            reg = self.registry
            if not reg._lock.acquire(blocking=False):
                raise HookStateError(f"cannot run {self.phase.value}: another phase is running")
            if reg._state is not self.allowed:
                state = reg._state
                reg._lock.release()
                raise HookStateError(
                    f"cannot run {self.phase.value} in state {state.value} (needs {self.allowed.value})"
                )
            reg._state = EngineState.RUNNING_HOOKS
            self.result = PhaseResult(self.phase.value, True, "")
            return self.result

        def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
            reg = self.registry
            if reg._state is EngineState.RUNNING_HOOKS:  # an unexpected error escaped: be safe
                reg._state = EngineState.BROKEN
            self.result.state = reg._state.value
            reg.last_result = self.result
            reg._lock.release()

    def _phase(self, phase: Phase, *, allowed: EngineState) -> HookRegistry._PhaseScope:
        return HookRegistry._PhaseScope(self, phase, allowed)

    # -- running one hook ------------------------------------------------------------------------------
    def _run_all(self, phase: Phase, hooks: list[Hook], result: PhaseResult) -> None:
        for hook in hooks:
            started = time.monotonic()
            try:
                self._run_one(hook, phase)
            except HookFailed as exc:
                result.hooks.append(HookRun(hook.name, time.monotonic() - started, str(exc)))
                raise
            result.hooks.append(HookRun(hook.name, time.monotonic() - started))

    def _run_one(self, hook: Hook, phase: Phase) -> None:
        where = f"{phase.value} hook {hook.name!r}"
        if inspect.iscoroutinefunction(hook.fn):
            self._run_async(hook, where)
            return
        box: dict[str, BaseException] = {}

        def target() -> None:
            try:
                value = hook.fn()
                if inspect.isawaitable(value):  # a sync function that returned a coroutine
                    asyncio.run(_await(value))
            except BaseException as exc:  # noqa: BLE001 - reported to the launcher, never swallowed
                box["exc"] = exc

        thread = threading.Thread(target=target, name=f"hook {hook.name}", daemon=True)
        thread.start()
        thread.join(hook.timeout_s)
        if thread.is_alive():
            raise HookTimeout(phase.value, hook.name, f"{where} timed out after {hook.timeout_s:g} s")
        if "exc" in box:
            raise HookFailed(phase.value, hook.name, f"{where} failed: {_describe(box['exc'])}") from box[
                "exc"
            ]

    def _run_async(self, hook: Hook, where: str) -> None:
        phase = hook.phase.value
        loop = self._loop
        if loop is not None and loop.is_running():
            future = asyncio.run_coroutine_threadsafe(hook.fn(), loop)
            try:
                future.result(hook.timeout_s)
            except concurrent.futures.TimeoutError as exc:
                future.cancel()
                raise HookTimeout(phase, hook.name, f"{where} timed out after {hook.timeout_s:g} s") from exc
            except BaseException as exc:  # noqa: BLE001
                raise HookFailed(phase, hook.name, f"{where} failed: {_describe(exc)}") from exc
            return
        try:
            asyncio.run(asyncio.wait_for(hook.fn(), hook.timeout_s))
        except TimeoutError as exc:
            raise HookTimeout(phase, hook.name, f"{where} timed out after {hook.timeout_s:g} s") from exc
        except BaseException as exc:  # noqa: BLE001
            raise HookFailed(phase, hook.name, f"{where} failed: {_describe(exc)}") from exc


async def _await(value: Any) -> Any:
    return await value


def _describe(exc: BaseException) -> str:
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()
    return text[-1] if text else type(exc).__name__


default_registry = HookRegistry()
