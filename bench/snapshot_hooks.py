"""What the example engine's hooks buy in a CPU snapshot: image bytes and restore time, with and without.

    .venv/bin/python bench/snapshot_hooks.py [--size qwen3-0.6b|tiny] [--max-cache-len 4096] [--runs 3]

The example engine (recipes/examples/tiny_engine.py, bf16 weights, static KV cache allocated up front) is
booted in a CRIU sandbox (the launcher's checkpointer), warmed up, then checkpointed either as it is or
after its before-checkpoint hooks (weights offloaded, KV cache freed); each image is restored ``--runs``
times: restore, after-restore hooks, first streamed token of the greedy canary (which must match).
On CPU the weights are offloaded zero-copy (nothing moves), so the difference is the freed KV cache.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from coldstart.engine_adapters.base import EngineConfig
from coldstart.engine_adapters.custom import CustomAdapter
from coldstart.launcher.checkpointers.criu import CriuCheckpointer
from coldstart.launcher.sandboxes.base import Sandbox
from coldstart.launcher.tiny_model import make_model

REPO = Path(__file__).resolve().parents[1]
ENGINE = REPO / "recipes" / "examples" / "tiny_engine.py"
CANARY = {
    "messages": [{"role": "user", "content": "The capital of France is"}],
    "max_tokens": 8,
    "temperature": 0,
}


async def wait_healthy(adapter: CustomAdapter, sandbox: Sandbox, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if sandbox.exit_code() is not None:
                raise RuntimeError(f"engine exited:\n{sandbox.log_tail(30)}")
            if await adapter.is_healthy(client, sandbox.base_url):
                return
            await asyncio.sleep(0.05)
    raise RuntimeError("engine not healthy")


async def first_token(sandbox: Sandbox) -> tuple[float, str]:
    """Seconds to the first streamed token, and the whole greedy answer."""
    started = time.monotonic()
    first = None
    text = []
    async with httpx.AsyncClient() as client:
        body = {**CANARY, "stream": True}
        async with client.stream(
            "POST", f"{sandbox.base_url}/v1/chat/completions", json=body, timeout=120
        ) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    first = first or time.monotonic()
                    text.append(json.loads(line[6:])["choices"][0]["delta"].get("content") or "")
    return (first or time.monotonic()) - started, "".join(text)


async def hooks(adapter: CustomAdapter, phase: str, sandbox: Sandbox) -> float:
    started = time.monotonic()
    async with httpx.AsyncClient() as client:
        await getattr(adapter, phase)(client, sandbox.base_url)
    return time.monotonic() - started


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


async def one_mode(model: Path, use_hooks: bool, cache_len: int, runs: int, work: Path) -> dict[str, float]:
    ckpt = CriuCheckpointer()
    adapter = CustomAdapter()
    tag = "hooks" if use_hooks else "plain"
    sandbox = ckpt.new_sandbox(work / f"{tag}-boot", f"{tag}0")
    args = (
        "{python}", str(ENGINE), "--model", "{model}", "--host", "{host}", "--port", "{port}",
        "--dtype", "bfloat16", "--max-cache-len", str(cache_len),
    )  # fmt: skip
    config = EngineConfig(model=str(model), engine_args=args, host=sandbox.bind_host, port=sandbox.bind_port)
    out: dict[str, float] = {}
    t0 = time.monotonic()
    await sandbox.start(adapter.launch_spec(config))
    await wait_healthy(adapter, sandbox)
    out["cold boot -> healthy (s)"] = time.monotonic() - t0
    _, canary = await first_token(sandbox)
    async with httpx.AsyncClient() as client:
        state = (await client.get(f"{sandbox.base_url}/coldstart/state")).json()
    out["KV cache (MB)"] = state["kv_cache"]["bytes_when_allocated"] / 1e6
    out["engine RSS at checkpoint (MB)"] = state["memory"]["rss_bytes"] / 1e6
    out["before_checkpoint hooks (s)"] = (
        await hooks(adapter, "before_checkpoint", sandbox) if use_hooks else 0.0
    )
    image = work / f"{tag}-image"
    image.mkdir()
    t0 = time.monotonic()
    await ckpt.checkpoint(sandbox, image, leave_running=False)
    out["criu dump (s)"] = time.monotonic() - t0
    await sandbox.stop()
    out["image (MB)"] = du(image) / 1e6
    restores, afters, ttfts = [], [], []
    for i in range(runs):
        t0 = time.monotonic()
        replica = await ckpt.restore(image, work / f"{tag}-r{i}", f"{tag}{i + 1}")
        try:
            await wait_healthy(adapter, replica, 60)
            restores.append(time.monotonic() - t0)
            afters.append(await hooks(adapter, "after_restore", replica) if use_hooks else 0.0)
            ttft, answer = await first_token(replica)
            if answer != canary:
                raise RuntimeError(f"canary mismatch after restore: {answer!r} != {canary!r}")
            ttfts.append(time.monotonic() - t0)
        finally:
            await replica.stop()
    out["restore -> healthy (s, median)"] = statistics.median(restores)
    out["after_restore hooks (s, median)"] = statistics.median(afters)
    out["restore -> first token (s, median)"] = statistics.median(ttfts)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="qwen3-0.6b", choices=["tiny", "qwen3-0.6b"])
    parser.add_argument("--max-cache-len", type=int, default=4096)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    model = make_model(REPO / ".cache" / "models" / args.size, args.size)
    with tempfile.TemporaryDirectory(prefix="bench-hooks-") as tmp:
        plain = asyncio.run(one_mode(model, False, args.max_cache_len, args.runs, Path(tmp)))
        hooked = asyncio.run(one_mode(model, True, args.max_cache_len, args.runs, Path(tmp)))
    print(f"example engine, {args.size} bf16 on CPU, static KV cache {args.max_cache_len} tokens, CRIU,")
    print(f"{args.runs} restores per image (medians); every restored canary matched the cold one")
    print(f"| {'metric':<36} | {'no hooks':>10} | {'hooks':>10} | {'hooks/no':>8} |")
    print(f"|{'-' * 38}|{'-' * 12}|{'-' * 12}|{'-' * 10}|")
    for key in plain:
        a, b = plain[key], hooked[key]
        ratio = f"{b / a:.2f}" if a else "-"
        print(f"| {key:<36} | {a:>10.2f} | {b:>10.2f} | {ratio:>8} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
