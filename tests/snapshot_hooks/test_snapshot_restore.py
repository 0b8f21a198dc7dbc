"""The example engine checkpointed and restored by a real checkpointer (CRIU, gVisor runsc).

Runs once ``coldstart.launcher.checkpointers.criu`` / ``.runsc`` exist and the tool works here (the CPU
snapshot issue); skips with the reason otherwise. What it proves, from the engines' own reports:
- the image was taken with the weights off the device and the KV cache freed: a restored process, before
  its after-restore hooks run, reports exactly that (measured live from its tensors), and the report it
  recorded at the end of its before-checkpoint hooks says the same;
- after restore + after-restore hooks, the greedy answer equals the one recorded before the checkpoint;
- two replicas restored side by side from the one image sample differently at temperature 1.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from pathlib import Path
from typing import Any

import httpx
import pytest

from coldstart.engine_adapters.base import EngineConfig
from coldstart.engine_adapters.custom import CustomAdapter
from coldstart.launcher.checkpointers.base import Checkpointer
from coldstart.launcher.errors import CheckpointerUnavailable
from coldstart.launcher.sandboxes.base import Sandbox

from .conftest import tiny_engine_args

pytestmark = pytest.mark.slow
CHAT = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 12}


def _checkpointer(name: str) -> Checkpointer:
    try:
        module = importlib.import_module(f"coldstart.launcher.checkpointers.{name}")
    except ModuleNotFoundError:
        pytest.skip(f"checkpointer {name!r} is not in coldstart.launcher.checkpointers yet")
    classes = [
        c
        for _, c in inspect.getmembers(module, inspect.isclass)
        if issubclass(c, Checkpointer) and not inspect.isabstract(c) and getattr(c, "name", None) == name
    ]
    if not classes:
        pytest.skip(f"no {name!r} Checkpointer class in {module.__name__}")
    checkpointer = classes[0]()
    try:
        checkpointer.probe()
    except CheckpointerUnavailable as exc:
        pytest.skip(f"{name} unavailable here: {exc}")
    return checkpointer


async def _wait_healthy(adapter: CustomAdapter, sandbox: Sandbox, timeout: float = 300.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    async with httpx.AsyncClient() as client:  # closed before any checkpoint: no pooled connection
        while asyncio.get_running_loop().time() < deadline:
            if sandbox.exit_code() is not None:
                raise AssertionError(f"engine exited {sandbox.exit_code()}:\n{sandbox.log_tail(40)}")
            if await adapter.is_healthy(client, sandbox.base_url):
                return
            await asyncio.sleep(0.2)
    raise AssertionError(f"engine not healthy:\n{sandbox.log_tail(40)}")


async def _chat(sandbox: Sandbox, temperature: float, max_tokens: int = 12) -> str:
    body = {**CHAT, "temperature": temperature, "max_tokens": max_tokens}
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{sandbox.base_url}/v1/chat/completions", json=body, timeout=120)
    response.raise_for_status()
    return str(response.json()["choices"][0]["message"]["content"])


async def _report(sandbox: Sandbox) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{sandbox.base_url}/coldstart/state", timeout=30)
    return response.json()  # type: ignore[no-any-return]


async def _hooks(adapter: CustomAdapter, phase: str, sandbox: Sandbox) -> None:
    async with httpx.AsyncClient() as client:
        await getattr(adapter, phase)(client, sandbox.base_url)


@pytest.mark.parametrize("name", ["criu", "runsc"])
def test_restored_replicas_answer_alike_greedy_and_differ_when_sampling(
    name: str, tiny_model: Path, tmp_path: Path
) -> None:
    checkpointer = _checkpointer(name)
    adapter = CustomAdapter()

    async def scenario() -> None:
        sandboxes: list[Sandbox] = []
        try:
            first = checkpointer.new_sandbox(tmp_path / "r0", "r0")
            sandboxes.append(first)
            config = EngineConfig(
                model=str(tiny_model),
                engine_args=tiny_engine_args(),
                host=first.bind_host,
                port=first.bind_port,
            )
            await first.start(adapter.launch_spec(config))
            await _wait_healthy(adapter, first)
            canary = await _chat(first, temperature=0)
            serving = await _report(first)
            await _hooks(adapter, "before_checkpoint", first)
            image = tmp_path / "image"
            image.mkdir()
            await checkpointer.checkpoint(first, image, leave_running=False)
            await first.stop()

            restored = [await checkpointer.restore(image, tmp_path / f"r{i}", f"r{i}") for i in (1, 2)]
            sandboxes += restored
            for replica in restored:
                await _wait_healthy(adapter, replica, 60)
                # Live, from the restored process's own tensors, before any after-restore hook ran:
                # this is the state the image was taken in.
                live = await _report(replica)
                assert live["hooks_state"] == "checkpoint_ready"
                assert live["weights"]["location"] == "host" and live["weights"]["module_bytes"] == 0
                assert live["kv_cache"]["allocated"] is False and live["kv_cache"]["bytes_allocated"] == 0
                recorded = live["at_last_checkpoint"]
                assert recorded["weights"]["module_bytes"] == 0 and not recorded["kv_cache"]["allocated"]
                await _hooks(adapter, "after_restore", replica)
                back = await _report(replica)
                assert back["weights"] == serving["weights"] and back["kv_cache"] == serving["kv_cache"]
                assert await _chat(replica, temperature=0) == canary

            reports = [await _report(r) for r in restored]
            assert reports[0]["identity"]["rng_seed"] != reports[1]["identity"]["rng_seed"]
            samples = [[await _chat(r, temperature=1.0, max_tokens=16) for _ in range(2)] for r in restored]
            assert samples[0] != samples[1]
        finally:
            for sandbox in sandboxes:
                await sandbox.stop()

    asyncio.run(scenario())
