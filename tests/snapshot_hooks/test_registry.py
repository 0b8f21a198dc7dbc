"""Hook registry: order, sync/async, timeouts, failures naming the hook, rollback, state guards."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from coldstart import snapshot_hooks
from coldstart.snapshot_hooks import EngineState, HookRegistry, Phase
from coldstart.snapshot_hooks.errors import HookRegistrationError, HookStateError


def _registry(calls: list[str]) -> HookRegistry:
    reg = HookRegistry()

    def rec(name: str, is_async: bool = False):  # noqa: ANN202
        if is_async:

            async def fn() -> None:
                await asyncio.sleep(0)
                calls.append(name)
        else:

            def fn() -> None:
                calls.append(name)

        fn.__name__ = name
        return fn

    snapshot_hooks.before_checkpoint(rec("b1"), registry=reg)
    snapshot_hooks.before_checkpoint(timeout_s=5, registry=reg)(rec("b2", is_async=True))
    snapshot_hooks.before_checkpoint(rec("b3"), registry=reg)
    snapshot_hooks.after_restore(rec("a1", is_async=True), registry=reg)
    snapshot_hooks.after_restore(rec("a2"), registry=reg)
    snapshot_hooks.after_restore(rec("a3"), registry=reg)
    return reg


def test_before_in_registration_order_after_in_reverse() -> None:
    calls: list[str] = []
    reg = _registry(calls)
    before = reg.run_before_checkpoint()
    assert before.ok and before.state == "checkpoint_ready" and reg.state is EngineState.CHECKPOINT_READY
    assert calls == ["b1", "b2", "b3"]
    calls.clear()
    after = reg.run_after_restore()
    assert after.ok and reg.state is EngineState.SERVING
    assert calls == ["a3", "a2", "a1"]
    # the built-in refresh runs first, then the user's hooks, each timed
    assert [h.name for h in after.hooks] == ["coldstart.refresh_process_state", "a3", "a2", "a1"]


def test_bare_and_parametrised_decorators_keep_the_function() -> None:
    reg = HookRegistry()

    @snapshot_hooks.before_checkpoint(registry=reg, name="renamed", timeout_s=3)
    def hook() -> int:
        return 7

    assert hook() == 7
    [registered] = reg.hooks(Phase.BEFORE_CHECKPOINT)
    assert (registered.name, registered.timeout_s) == ("renamed", 3.0)
    with pytest.raises(HookRegistrationError, match="timeout_s must be > 0"):
        snapshot_hooks.after_restore(timeout_s=0, registry=reg)(hook)
    with pytest.raises(HookRegistrationError, match="not callable"):
        snapshot_hooks.after_restore(42, registry=reg)  # type: ignore[call-overload]


def test_failing_before_hook_names_itself_stops_and_rolls_back() -> None:
    calls: list[str] = []
    reg = _registry(calls)

    def explode() -> None:
        raise RuntimeError("GPU on fire")

    reg._hooks[Phase.BEFORE_CHECKPOINT].insert(
        1, snapshot_hooks.registry.Hook("explode", explode, Phase.BEFORE_CHECKPOINT, 5)
    )
    result = reg.run_before_checkpoint()
    assert not result.ok and result.failed_hook == "explode"
    assert result.error == "before_checkpoint hook 'explode' failed: RuntimeError: GPU on fire"
    # b2, b3 never ran; every after hook ran (reverse) to put the engine back; no reseed on a rollback
    assert calls == ["b1", "a3", "a2", "a1"]
    assert result.rolled_back and result.state == "serving" and reg.state is EngineState.SERVING
    # still serving: a later checkpoint attempt is allowed
    with pytest.raises(HookStateError, match="cannot run after_restore in state serving"):
        reg.run_after_restore()


def test_failing_rollback_leaves_engine_broken() -> None:
    reg = HookRegistry()
    reg.register(Phase.BEFORE_CHECKPOINT, lambda: 1 / 0, name="divide")
    reg.register(Phase.AFTER_RESTORE, lambda: [][1], name="index")
    result = reg.run_before_checkpoint()
    assert not result.ok and not result.rolled_back
    assert "after_restore hook 'index' failed: IndexError" in (result.rollback_error or "")
    assert reg.state is EngineState.BROKEN


def test_failing_after_hook_breaks_the_engine_for_good() -> None:
    reg = HookRegistry()
    reg.register(Phase.AFTER_RESTORE, lambda: None, name="fine")

    async def reload() -> None:
        raise OSError("weights file gone")

    reg.register(Phase.AFTER_RESTORE, reload, name="reload")
    assert reg.run_before_checkpoint().ok
    result = reg.run_after_restore()
    assert not result.ok and result.failed_hook == "reload" and result.state == "broken"
    assert result.error == "after_restore hook 'reload' failed: OSError: weights file gone"
    with pytest.raises(HookStateError, match="in state broken"):
        reg.run_before_checkpoint()
    with pytest.raises(HookStateError, match="in state broken"):
        reg.run_after_restore()


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_timeout_names_the_hook(is_async: bool) -> None:
    reg = HookRegistry()
    release = threading.Event()
    if is_async:

        async def slow() -> None:
            await asyncio.sleep(30)
    else:

        def slow() -> None:
            release.wait(30)

    reg.register(Phase.BEFORE_CHECKPOINT, slow, timeout_s=0.2, name="slow")
    result = reg.run_before_checkpoint()
    release.set()
    assert not result.ok and result.failed_hook == "slow"
    assert result.error == "before_checkpoint hook 'slow' timed out after 0.2 s"
    assert reg.state is EngineState.SERVING  # nothing to roll back, engine still serving


def test_async_hooks_run_on_the_attached_engine_loop() -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    seen: list[asyncio.AbstractEventLoop] = []
    reg = HookRegistry()

    async def on_engine_loop() -> None:
        seen.append(asyncio.get_running_loop())

    reg.register(Phase.BEFORE_CHECKPOINT, on_engine_loop)
    reg.attach_loop(loop)
    try:
        assert reg.run_before_checkpoint().ok
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
    assert seen == [loop]


def test_phases_do_not_overlap() -> None:
    reg = HookRegistry()
    entered, release = threading.Event(), threading.Event()

    def blocking() -> None:
        entered.set()
        release.wait(10)

    reg.register(Phase.BEFORE_CHECKPOINT, blocking)
    worker = threading.Thread(target=reg.run_before_checkpoint)
    worker.start()
    entered.wait(10)
    with pytest.raises(HookStateError, match="another phase is running"):
        reg.run_before_checkpoint()
    release.set()
    worker.join()
    assert reg.state is EngineState.CHECKPOINT_READY


def test_after_restore_reseeds_rngs_from_fresh_entropy() -> None:
    reg = HookRegistry()
    draws = []
    for _ in range(2):
        random.seed(1234)  # two "replicas" with identical RNG state, as after restoring one image
        reg.run_before_checkpoint()
        reg.run_after_restore()
        draws.append(random.random())
    assert draws[0] != draws[1]
    assert snapshot_hooks.process_identity().refreshes >= 2
    assert snapshot_hooks.process_identity().started_at > 0
