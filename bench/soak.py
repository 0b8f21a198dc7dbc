"""Soak: one ``coldstart-serve --snapshot criu`` for several minutes under valid and invalid requests, client
disconnects, engine SIGKILL and SIGSTOP, and scale-to-zero bursts; then the launcher is SIGKILLed and started
again. Prints the counts the issue asks for (goals in the last column).

    sudo .venv/bin/python bench/soak.py --minutes 5

Needs root and CRIU (``coldstart doctor``). The model is the tests' tiny one unless ``--model`` names another.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from coldstart.launcher.process import process_tree, running  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SERVE = [sys.executable, "-m", "coldstart.launcher.cli.serve"]


@dataclass
class Counts:
    sent: int = 0
    correct: int = 0
    openai_error: int = 0
    unanswered: int = 0  # no answer at all (connection dropped, hang past the client timeout)
    wrong: int = 0  # an answer that is neither a correct one nor an OpenAI-shaped error
    disconnects: int = 0  # requests the client abandoned on purpose (not counted above)
    by_kind: dict[str, int] = field(default_factory=dict)
    unanswered_examples: list[str] = field(default_factory=list)


def engines(launcher: int) -> list[int]:
    """Host PIDs of the engines (the deepest process running transformers_entry in each tree)."""
    found = []
    for pid in process_tree(launcher)[1:]:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith((b"python", b"python3")) and any(b"transformers_entry" in a for a in argv):
            found.append(pid)
    # An unshare parent names transformers_entry too; keep those with no such descendant.
    return [p for p in found if not any(c in found for c in process_tree(p)[1:])]


class Launcher:
    def __init__(self, args: list[str], log: Path, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log
        self._log = open(log, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [*SERVE, *args, "--port", str(port)], stdout=self._log, stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def health(self, client: httpx.AsyncClient) -> dict[str, Any] | None:
        try:
            answer: dict[str, Any] = (await client.get(f"{self.url}/health", timeout=5)).json()
            return answer
        except (httpx.HTTPError, ValueError):
            return None

    async def wait_ready(self, client: httpx.AsyncClient, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"coldstart-serve exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            if (h := await self.health(client)) and h["ready"]:
                return
            await asyncio.sleep(0.2)
        raise SystemExit(f"no ready replica after {timeout} s:\n{self.log()[-3000:]}")


class Soak:
    def __init__(self, launcher: Launcher, model: str, max_replicas: int, body_limit: int) -> None:
        self.launcher = launcher
        self.model = model
        self.max_replicas = max_replicas
        self.body_limit = body_limit
        self.counts = Counts()
        self.peak_live = 0
        self.detect_s: list[float] = []
        self.chaos_targets: set[str] = set()
        self.bursts = 0
        self.paused = asyncio.Event()  # set while a burst waits for scale to zero
        self.stop = asyncio.Event()

    # ------------------------------------------------------------------ requests
    def _chat(self, **extra: object) -> dict[str, object]:
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            **extra,
        }

    def _invalid(self) -> tuple[str, bytes]:
        kinds = [
            ("max_tokens=-1", json.dumps(self._chat(max_tokens=-1)).encode()),
            ("not json", b"abc"),
            ("no messages", json.dumps({"model": self.model}).encode()),
            ("unknown field", json.dumps(self._chat(no_such_field=1)).encode()),
            ("not utf-8", b"\xff\xfe\x00"),
            ("deep json", b"[" * 100_000 + b"]" * 100_000),
            ("too large", json.dumps(self._chat(pad="x" * (self.body_limit + 1))).encode()),
        ]
        return random.choice(kinds)

    def _classify(self, kind: str, response: httpx.Response, stream_text: str | None = None) -> None:
        c = self.counts
        c.by_kind[kind] = c.by_kind.get(kind, 0) + 1
        try:
            body = json.loads(
                stream_text if stream_text is not None and response.status_code >= 400 else response.text
            )
        except ValueError:
            body = None
        if response.status_code == 200:
            if stream_text is not None:
                ok = "data: [DONE]" in stream_text or '"finish_reason"' in stream_text
                if '"error"' in stream_text:
                    c.openai_error += 1  # an error event mid-stream (replica lost): shaped
                    return
            else:
                ok = isinstance(body, dict) and bool(body.get("choices"))
            if ok:
                c.correct += 1
            else:
                c.wrong += 1
            return
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and {"message", "type", "code"} <= set(error):
            c.openai_error += 1
        else:
            c.wrong += 1

    async def _one(self, client: httpx.AsyncClient) -> None:
        url = f"{self.launcher.url}/v1/chat/completions"
        roll = random.random()
        self.counts.sent += 1
        try:
            if roll < 0.45:
                self._classify("valid", await client.post(url, json=self._chat(), timeout=120))
            elif roll < 0.6:
                async with client.stream("POST", url, json=self._chat(stream=True), timeout=120) as r:
                    text = (await r.aread()).decode(errors="replace")
                self._classify("valid stream", r, text)
            elif roll < 0.85:
                kind, raw = self._invalid()
                headers = {"content-type": "application/json"}
                self._classify(kind, await client.post(url, content=raw, headers=headers, timeout=120))
            elif roll < 0.93:  # a streaming client that goes away after the first chunk
                async with client.stream(
                    "POST", url, json=self._chat(stream=True, max_tokens=64), timeout=120
                ) as r:
                    async for _ in r.aiter_raw():
                        break
                self.counts.disconnects += 1
                self.counts.sent -= 1
            else:  # a non-streaming client that gives up after 0.3 s
                self.counts.sent -= 1
                self.counts.disconnects += 1
                try:
                    await client.post(
                        url, json=self._chat(max_tokens=64), timeout=httpx.Timeout(120, read=0.3)
                    )
                except httpx.ReadTimeout:
                    pass
        except httpx.HTTPError as exc:
            self.counts.unanswered += 1
            if len(self.counts.unanswered_examples) < 5:
                self.counts.unanswered_examples.append(repr(exc))

    async def worker(self) -> None:
        async with httpx.AsyncClient() as client:
            while not self.stop.is_set():
                if self.paused.is_set():
                    await asyncio.sleep(0.1)
                    continue
                await self._one(client)

    # ------------------------------------------------------------------ observation and chaos
    async def monitor(self) -> None:
        async with httpx.AsyncClient() as client:
            while not self.stop.is_set():
                if (h := await self.launcher.health(client)) is not None:
                    self.peak_live = max(self.peak_live, len(h["replicas"]))
                await asyncio.sleep(0.1)

    async def _ready_ids(self, client: httpx.AsyncClient) -> list[str]:
        h = await self.launcher.health(client)
        return [r["id"] for r in h["replicas"] if r["state"] == "ready"] if h else []

    async def chaos(self, period: float) -> None:
        actions = ["sigstop", "sigkill", "burst"]
        step = 0
        async with httpx.AsyncClient() as client:
            while not self.stop.is_set():
                try:
                    await asyncio.wait_for(self.stop.wait(), period)
                    return
                except TimeoutError:
                    pass
                action = actions[step % len(actions)]
                step += 1
                if action == "burst":
                    await self._burst(client)
                    continue
                before = set(await self._ready_ids(client))
                pids = engines(self.launcher.proc.pid)
                if not before or not pids:
                    continue
                pid = random.choice(pids)
                os.kill(pid, signal.SIGKILL if action == "sigkill" else signal.SIGSTOP)
                t0 = time.monotonic()
                gone: set[str] = set()
                while not gone and time.monotonic() - t0 < 60:  # which replica it was: the one that fails
                    await asyncio.sleep(0.05)
                    gone = before - set(await self._ready_ids(client))
                took = time.monotonic() - t0
                self.chaos_targets |= gone
                if action == "sigstop":
                    self.detect_s.append(took)
                print(
                    f"  chaos: {action} engine pid {pid} -> {sorted(gone)} out after {took:.2f}s", flush=True
                )

    async def _burst(self, client: httpx.AsyncClient) -> None:
        """Pause the load, wait for scale to zero, then 50 requests at once."""
        self.paused.set()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 120:
            h = await self.launcher.health(client)
            if h is not None and not h["replicas"]:
                break
            await asyncio.sleep(0.2)
        else:
            print("  chaos: burst skipped (no scale to zero within 120 s)", flush=True)
            self.paused.clear()
            return
        self.bursts += 1
        print("  chaos: scaled to zero; burst of 50", flush=True)
        async with httpx.AsyncClient() as burst:
            await asyncio.gather(*(self._one(burst) for _ in range(50)))
        self.paused.clear()


def failed_by_bad_requests(log: str, chaos_targets: set[str]) -> int:
    failed = set(re.findall(r"replica (r\d+) (?:ready|draining) -> failed", log))
    return len(failed - chaos_targets)


def restores(log: str) -> int:
    return len(re.findall(r"replica r\d+ restoring -> ready", log))


async def after_sigkill(launcher: Launcher, args: list[str], log: Path, port: int) -> dict[str, int | str]:
    """SIGKILL the launcher, count what is left, start a new one, count what is left after its start."""
    tree = process_tree(launcher.proc.pid)[1:]
    pid = launcher.proc.pid
    launcher.proc.send_signal(signal.SIGKILL)
    launcher.proc.wait()
    deadline = time.monotonic() + 10
    while any(running(p) for p in tree) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    left_procs = sum(running(p) for p in tree)
    left = sorted(p.name for p in Path("/run/netns").glob(f"cs-{pid}-*"))
    second = Launcher(args, log, port)
    async with httpx.AsyncClient() as client:
        await second.wait_ready(client)
    after_netns = len(list(Path("/run/netns").glob(f"cs-{pid}-*")))
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    veths = sum(f"csh{name.rsplit('-', 1)[1]}@" in links for name in left)
    removed = len(re.findall(rf"removed what a dead launcher left: .*{pid}", second.log()))
    second.proc.send_signal(signal.SIGTERM)
    second.proc.wait(120)
    left_after_stop = sum(running(p) for p in process_tree(second.proc.pid)[1:]) + len(
        list(Path("/run/netns").glob(f"cs-{second.proc.pid}-*"))
    )
    mounts = Path("/proc/self/mounts").read_text().count(str(log.parent))
    return {
        "processes alive 10 s after SIGKILL": left_procs,
        "netns the killed launcher could not delete": len(left),
        "of those, netns left after the next start": after_netns,
        "of those, veths left after the next start": veths,
        "mounts under the work dir": mounts,
        "things the next start said it removed": removed,
        "left after the next launcher's SIGTERM": left_after_stop,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--model", default=None, help="model path (default: the tests' tiny model)")
    parser.add_argument("--max-replicas", type=int, default=2)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--chaos-every", type=float, default=20.0, help="seconds between chaos actions")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    random.seed(args.seed)
    if args.model is None:
        from coldstart.launcher.tiny_model import make_model

        args.model = str(make_model(REPO / ".cache" / "models" / "tiny", "tiny"))
    tmp = Path(tempfile.mkdtemp(prefix="coldstart-soak-"))
    body_limit = 1 << 20
    serve_args = [
        "transformers", args.model, "--snapshot", "criu", "--snapshot-dir", str(tmp / "snapshots"),
        "--work-dir", str(tmp / "run"), "--max-replicas", str(args.max_replicas), "--target-concurrency", "2",
        "--idle-timeout", "4", "--max-body-size", str(body_limit),
    ]  # fmt: skip
    from coldstart.launcher.process import free_port

    port = free_port()
    log = tmp / "serve.log"
    launcher = Launcher(serve_args, log, port)
    async with httpx.AsyncClient() as client:
        await launcher.wait_ready(client)
    print(f"soak: {args.minutes} min against {launcher.url} (log {log})", flush=True)
    soak = Soak(launcher, args.model, args.max_replicas, body_limit)
    tasks = [asyncio.create_task(soak.worker()) for _ in range(args.workers)]
    tasks += [asyncio.create_task(soak.monitor()), asyncio.create_task(soak.chaos(args.chaos_every))]
    await asyncio.sleep(args.minutes * 60)
    soak.stop.set()
    soak.paused.clear()
    await asyncio.gather(*tasks)
    text = launcher.log()
    leftovers = await after_sigkill(launcher, serve_args, log, port)
    c = soak.counts
    detect = (
        f"{max(soak.detect_s):.2f} (n={len(soak.detect_s)}, "
        f"mean {sum(soak.detect_s) / len(soak.detect_s):.2f})"
        if soak.detect_s
        else "n/a"
    )
    rows = [
        ("requests sent", c.sent, ""),
        ("answered correctly", c.correct, ""),
        ("answered with an OpenAI-shaped error", c.openai_error, ""),
        ("unanswered", c.unanswered, "0"),
        ("answered, neither correct nor OpenAI-shaped", c.wrong, "0"),
        ("client disconnects (on purpose)", c.disconnects, ""),
        ("replicas killed by bad requests", failed_by_bad_requests(text, soak.chaos_targets), "0"),
        ("time to detect a hung engine, max s", detect, "<= 10"),
        ("peak live replicas / --max-replicas", f"{soak.peak_live} / {args.max_replicas}", "<= max"),
        ("scale-to-zero bursts (50 requests each)", soak.bursts, ""),
        ("restores during the soak", restores(text), ""),
        *[(k, v, "" if "removed" in k or "could not" in k else "0") for k, v in leftovers.items()],
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n| {'count':<{width}} | value | goal |\n|{'-' * (width + 2)}|-------|------|")
    for name, value, goal in rows:
        print(f"| {name:<{width}} | {value} | {goal} |")
    if c.unanswered_examples:
        print("unanswered, e.g.:", *c.unanswered_examples, sep="\n  ")
    print("requests by kind:", json.dumps(c.by_kind, sort_keys=True))


if __name__ == "__main__":
    asyncio.run(main())
