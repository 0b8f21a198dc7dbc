"""What a CRIU image of vLLM would hold, per process and per kind of mapping, before and after ``file_back``.

    flock /tmp/coldstart-heavy.lock .venv/bin/python bench/vllm_memory.py [--size qwen3-0.6b] [--top 12]
        [-- more vLLM arguments, e.g. --enforce-eager]

Boots vLLM in its lean CPU configuration as a plain host process (no checkpointer: this reads
``/proc/PID/smaps``, which is what CRIU's dump walks), warms it up with one greedy chat, pauses it as the
snapshot manager does (``before_checkpoint``), and prints, for each process of the engine tree, the bytes a
dump would write by kind of mapping: ``Anonymous`` pages (private anonymous memory and the copied-on-write
pages of private file mappings) plus shared memory. Then it calls the adapter's ``file_back`` (KV cache
dropped, weights into content-addressed files) and prints the same again, with the largest mappings left.

Kinds: ``[heap]`` (brk: malloc's main arena), ``arenas`` (glibc's per-thread heaps: a read-write mapping
with its ``---p`` reserve above), ``stacks`` (a ``---p`` guard below), ``anon >=4M`` / ``anon <4M`` (other
anonymous mappings: malloc's mmapped chunks, pymalloc arenas, torch allocations), ``file: NAME`` (pages of
a library or data file written after mapping: relocations, ``.data``/``.bss``), ``weights`` (the files
``file_back`` wrote), ``shmem``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx

from coldstart.engine_adapters.base import EngineConfig
from coldstart.engine_adapters.registry import get_adapter
from coldstart.engine_adapters.vllm import LEAN_CPU_ARGS, LEAN_CPU_ENV
from coldstart.launcher.boot import config_for, wait_healthy
from coldstart.launcher.sandboxes.plain import PlainSandbox
from coldstart.launcher.tiny_model import make_model

REPO = Path(__file__).resolve().parents[1]
HEAD = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")
MIB = 1 << 20


@dataclass
class Region:
    start: int
    end: int
    perms: str
    path: str
    fields: dict[str, int]

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def anonymous(self) -> bool:
        return self.path == "" or self.path.startswith("[anon")


def regions(pid: int) -> list[Region]:
    out: list[Region] = []
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = HEAD.match(line)
        if head:
            out.append(Region(int(head[1], 16), int(head[2], 16), head[3], head[4].strip(), {}))
        elif out and line.endswith(" kB"):
            key, value = line.split(":", 1)
            out[-1].fields[key] = int(value.split()[0]) * 1024
    return out


def kind(maps: list[Region], i: int, weights_dir: str) -> str:
    m = maps[i]
    if weights_dir and m.path.startswith(weights_dir):
        return "weights"
    if m.path == "[heap]":
        return "[heap]"
    if m.path.startswith("[stack"):
        return "stacks"
    if m.fields.get("Shmem", 0) or m.path.startswith(("/dev/shm", "/SYSV", "/memfd")):
        return "shmem"
    if m.anonymous:
        before = maps[i - 1] if i else None
        if before and before.end == m.start and before.perms == "---p" and before.anonymous:
            return "stacks"
        if m.start % (64 * MIB) == 0 and m.size <= 64 * MIB:  # glibc's arena heaps (file_backed.py)
            return "arenas"
        return "anon >=4M" if m.size >= 4 * MIB else "anon <4M"
    return "file: " + m.path.rsplit("/", 1)[-1]


def dumped(m: Region) -> int:
    """Bytes CRIU writes for this mapping: its anonymous pages, or the resident pages of shared memory."""
    return m.fields.get("Anonymous", 0) + (m.fields.get("Rss", 0) if m.fields.get("Shmem", 0) else 0)


def tree(root: int) -> list[int]:
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        for task in Path(f"/proc/{pid}/task").iterdir():
            children = (task / "children").read_text().split()
            todo += [int(c) for c in children]
    return pids


def report(title: str, pids: list[int], weights_dir: str, top: int) -> dict[int, dict[str, int]]:
    print(f"\n## {title}\n")
    per: dict[int, dict[str, int]] = {}
    biggest: list[tuple[int, int, Region, str]] = []
    for pid in pids:
        maps = regions(pid)
        sums: dict[str, int] = collections.Counter()
        for i, m in enumerate(maps):
            k = kind(maps, i, weights_dir)
            sums[k] += dumped(m)
            if k == "weights":
                sums["weights (mapped, not dumped)"] += m.fields.get("Rss", 0)
            biggest.append((dumped(m), pid, m, k))
        per[pid] = dict(sums)
        name = Path(f"/proc/{pid}/comm").read_text().strip()
        total = sum(v for k, v in sums.items() if not k.startswith("weights (mapped"))
        print(f"pid {pid} ({name}): would dump {total / MIB:,.0f} MiB")
        files = sum(v for k, v in sums.items() if k.startswith("file: "))
        for k, v in sorted(sums.items(), key=lambda kv: -kv[1]):
            if v >= MIB and (not k.startswith("file: ") or v >= 4 * MIB):
                print(f"  {k:40s} {v / MIB:9,.1f} MiB")
        print(f"  {'(all library/data file pages written)':40s} {files / MIB:9,.1f} MiB")
    print(f"\nlargest mappings by dumped bytes (top {top}):")
    for size, pid, m, k in sorted(biggest, key=lambda t: -t[0])[:top]:
        print(
            f"  pid {pid} {m.start:#x}-{m.end:#x} {m.perms} {m.size / MIB:8.1f} MiB mapped, "
            f"{size / MIB:8.1f} MiB dumped, rss {m.fields.get('Rss', 0) / MIB:8.1f}  {k}"
        )
    return per


async def main(args: argparse.Namespace) -> None:
    model_dir = make_model(REPO / ".cache" / "models" / args.size, args.size)
    adapter = get_adapter("vllm")
    engine_args = LEAN_CPU_ARGS
    if args.size == "qwen3-0.6b":  # as bench/startup.py: 128 MiB of KV cache for 512 tokens
        engine_args = tuple("134217728" if a == "67108864" else a for a in engine_args)
    engine_args = (*engine_args, *args.vllm_args)
    config = EngineConfig(model=str(model_dir), engine_args=engine_args, env=dict(LEAN_CPU_ENV))
    sandbox = PlainSandbox("vllm-memory")
    spec = adapter.launch_spec(config_for(sandbox, config))
    import dataclasses

    await sandbox.start(dataclasses.replace(spec, env={**spec.env, **config.env}))
    work = Path(tempfile.mkdtemp(prefix="coldstart-vllm-memory-"))
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=600) as http:
            await wait_healthy(sandbox, adapter, http, timeout_s=600)
            model = adapter.upstream_model_name(config)
            for path, body in adapter.warmup_requests(config):
                (await http.post(f"{sandbox.base_url}{path}", json=body)).raise_for_status()
            pids = tree(sandbox.host_pids()[0])
            report("warmed up, running", pids, "", args.top)
            await adapter.before_checkpoint(http, sandbox.base_url)
            weights = await adapter.file_back(http, sandbox.base_url, work)  # type: ignore[attr-defined]
            print(f"\nfile_back: {weights['bytes'] / MIB:,.0f} MiB into {len(weights['files'])} files,")
            print(f"  KV cache dropped {weights['kv_cache_bytes'] / MIB:,.0f} MiB; files (MiB):")
            for name, size in sorted(weights["files"].items(), key=lambda kv: -kv[1]):
                print(f"  {name[:16]} {size / MIB:9,.1f}")
            print(f"  tables left unpacked: {weights.get('unpacked_tables')}")
            report("paused, after file_back (what the dump holds)", pids, str(work), args.top)
            del model
    finally:
        await sandbox.stop(10.0)
        for f in work.iterdir():
            f.unlink()
        work.rmdir()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="qwen3-0.6b", choices=["tiny", "qwen3-0.6b"])
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("vllm_args", nargs="*", help="after --: more vLLM arguments")
    asyncio.run(main(parser.parse_args()))
    sys.exit(0)
