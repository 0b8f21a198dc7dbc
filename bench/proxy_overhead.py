"""Proxy overhead: the same requests straight to an OpenAI-shaped upstream and through coldstart-serve.

    .venv/bin/python bench/proxy_overhead.py [--requests 2000] [--streams 1000]

The upstream is ``bench/fake_openai.py`` (canned answers: what is measured is the proxy's own cost). Two
instances of it run: one reached directly, one as the engine of ``coldstart-serve custom`` (the whole
launcher path: proxy, replica manager, routing). Prints one table, direct vs proxied side by side:
sequential latency p50/p99 (and the proxy's added latency), requests/s at a concurrency, and N concurrent
streaming connections held open and completed through the proxy. Goal: p50 added latency <= 1 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
BODY = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def free_port() -> int:
    from coldstart.launcher.process import free_port as _free_port

    return _free_port()


def wait_ready(url: str, key: str | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, timeout=1)
            if r.status_code == 200 and (key is None or r.json().get(key)):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} not ready after {timeout} s")


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def sequential(url: str, n: int) -> list[float]:
    async with httpx.AsyncClient(trust_env=False) as client:
        for _ in range(50):  # warm the connection and both servers
            await client.post(url, json=BODY)
        times = []
        for _ in range(n):
            t = time.perf_counter()
            r = await client.post(url, json=BODY)
            times.append(time.perf_counter() - t)
            assert r.status_code == 200, r.text
    return times


async def throughput(url: str, concurrency: int, seconds: float) -> float:
    done = 0
    deadline = time.monotonic() + seconds

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal done
        while time.monotonic() < deadline:
            r = await client.post(url, json=BODY)
            assert r.status_code == 200
            done += 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(trust_env=False, limits=limits) as client:
        started = time.monotonic()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return done / (time.monotonic() - started)


async def streams(url: str, n: int, chunks: int, interval: float) -> tuple[int, float, float]:
    """n concurrent SSE streams held ``chunks * interval`` seconds each; returns (completed, s, max open)."""
    body = {**BODY, "stream": True, "chunks": chunks, "interval": interval}
    open_now = peak = 0
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)

    async def one(client: httpx.AsyncClient) -> bool:
        nonlocal open_now, peak
        async with client.stream("POST", url, json=body) as r:
            open_now += 1
            peak = max(peak, open_now)
            seen = 0
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    seen += 1
            open_now -= 1
        return r.status_code == 200 and seen == chunks

    async with httpx.AsyncClient(trust_env=False, limits=limits, timeout=120) as client:
        t = time.monotonic()
        results = await asyncio.gather(*(one(client) for _ in range(n)), return_exceptions=True)
        return sum(1 for x in results if x is True), time.monotonic() - t, peak


def start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)  # noqa: SIM115


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000, help="sequential requests per side")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0, help="throughput run length per side")
    parser.add_argument("--streams", type=int, default=1000, help="concurrent streaming connections")
    args = parser.parse_args()

    logs = Path(os.environ.get("TMPDIR", "/tmp")) / "coldstart-bench-proxy"
    logs.mkdir(parents=True, exist_ok=True)
    up_port, proxy_port = free_port(), free_port()
    upstream = start(
        [sys.executable, str(HERE / "fake_openai.py"), "--port", str(up_port)], logs / "upstream.log"
    )
    proxy = start(
        [
            sys.executable,
            "-m",
            "coldstart.launcher.cli.serve",
            "custom",
            "fake",
            "--port",
            str(proxy_port),
            "--snapshot",
            "off",
            "--max-queue",
            "4096",
            "--log-level",
            "warning",
            "--",
            sys.executable,
            str(HERE / "fake_openai.py"),
            "--host",
            "{host}",
            "--port",
            "{port}",
        ],
        logs / "proxy.log",
    )
    try:
        direct_url = f"http://127.0.0.1:{up_port}/v1/chat/completions"
        proxied_url = f"http://127.0.0.1:{proxy_port}/v1/chat/completions"
        wait_ready(f"http://127.0.0.1:{up_port}/health")
        wait_ready(f"http://127.0.0.1:{proxy_port}/health", key="ready")

        rows = []
        lat = {
            name: asyncio.run(sequential(url, args.requests))
            for name, url in (("direct", direct_url), ("proxy", proxied_url))
        }
        rps = {
            name: asyncio.run(throughput(url, args.concurrency, args.seconds))
            for name, url in (("direct", direct_url), ("proxy", proxied_url))
        }
        for name in ("direct", "proxy"):
            rows.append((name, statistics.median(lat[name]) * 1e3, pct(lat[name], 0.99) * 1e3, rps[name]))
        completed, took, peak = asyncio.run(streams(proxied_url, args.streams, chunks=20, interval=0.1))

        print(
            f"\nproxy overhead: {args.requests} sequential requests, {args.concurrency} concurrent for "
            f"{args.seconds:.0f} s, one host (2 cores shared by client, proxy and upstream)\n"
        )
        print(f"{'path':<8} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>9}")
        for name, p50, p99, r in rows:
            print(f"{name:<8} {p50:>8.3f} {p99:>8.3f} {r:>9.0f}")
        added50 = rows[1][1] - rows[0][1]
        added99 = rows[1][2] - rows[0][2]
        print(f"{'added':<8} {added50:>8.3f} {added99:>8.3f} {rows[1][3] / rows[0][3]:>8.2f}x")
        print(
            f"\nstreaming: {completed}/{args.streams} concurrent SSE streams completed through the proxy "
            f"(20 chunks, 0.1 s apart; peak {peak} open at once) in {took:.1f} s"
        )
        print(f"goal p50 added <= 1 ms: {'met' if added50 <= 1.0 else 'NOT met'}")
        return 0
    finally:
        for p in (proxy, upstream):
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(30)


if __name__ == "__main__":
    sys.exit(main())
