"""Swapping models on one unit: by restore (coldstart), by cold boot (``--snapshot off``, what llama-swap
does), side by side in one run.

    .venv/bin/python bench/swap.py [--trace cycle|zipf] [--requests 12] [--engines vllm,transformers,custom]

Three deployments on one CPU slot (``units = 1``) behind one ``coldstart-serve --config``: the real vLLM
(lean CPU configuration), ``transformers serve`` and the example custom engine, each on a tiny local model.
A trace of requests, one at a time, cycles through them (or draws them Zipf-like, s = 1.2, fixed seed), so
nearly every request finds another model on the slot: a swap. For each request: time to first token (the
first non-empty streamed chunk of a greedy 1-token chat) from the client's side. Rows:

- coldstart, swap by restore: the model's first request cold-boots it and snapshots it (CRIU); every later
  one evicts the idle model on the slot and restores this one;
- plain restore: the same model restored onto a free slot (every model scaled to zero first): what a swap
  is measured against (goal: swap <= plain restore + 0.3 s);
- swap by cold boot: the same trace with ``snapshot = "off"`` (goal for vLLM: restore >= 20x faster);
- sleep mode: vLLM's CPU build refuses ``--enable-sleep-mode`` ("Sleep mode is not supported on current
  platform"), so there is no row on this machine.

Host RAM held by the models that are not serving: the resident memory of every engine process under the
launcher but the serving one's, sampled after each answer (coldstart stops idle models: 0 bytes).
"""

from __future__ import annotations

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path

import httpx  # noqa: E402

from coldstart.engine_adapters.vllm import LEAN_CPU_ARGS, LEAN_CPU_ENV  # noqa: E402
from coldstart.launcher.tiny_model import make_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SERVE = [sys.executable, "-m", "coldstart.launcher.cli.serve"]
PROMPT = [{"role": "user", "content": "Name a colour."}]


def deployments_file(path: Path, model: Path, engines: list[str], snapshot: str, idle_timeout: float) -> None:
    tables = []
    common = (
        f'snapshot = "{snapshot}"\ninitial_replicas = 0\nidle_timeout = {idle_timeout}\nboot_timeout = 900\n'
    )
    if "vllm" in engines:
        env = ", ".join(f'{k} = "{v}"' for k, v in LEAN_CPU_ENV.items())
        args = json.dumps(list(LEAN_CPU_ARGS))
        head = f'[models.vllm]\nengine = "vllm"\nmodel = "{model}"\n'
        tables.append(f"{head}engine_args = {args}\nenv = {{ {env} }}\n{common}")
    if "transformers" in engines:
        tables.append(f'[models.transformers]\nengine = "transformers"\nmodel = "{model}"\n{common}')
    if "custom" in engines:
        tables.append(f'[models.custom]\nrecipe = "tiny-engine"\nmodel = "{model}"\n{common}')
    path.write_text("[server]\nunits = 1\nmin_residency = 0\n\n" + "\n".join(tables))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Launcher:
    def __init__(self, config: Path, work: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(work / "serve.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                *SERVE,
                "--config",
                str(config),
                "--port",
                str(self.port),
                "--work-dir",
                str(work / "run"),
                "--snapshot-dir",
                str(work / "snapshots"),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.url}/health", timeout=2)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"coldstart-serve did not come up; log: {work / 'serve.log'}")

    def health(self) -> dict:  # type: ignore[type-arg]
        return httpx.get(f"{self.url}/health", timeout=5).json()  # type: ignore[no-any-return]

    def ttft(self, model: str) -> float:
        body = {"model": model, "messages": PROMPT, "max_tokens": 1, "temperature": 0, "stream": True}
        started = time.monotonic()
        with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body, timeout=900) as response:
            if response.status_code != 200:
                raise RuntimeError(f"{model}: {response.status_code} {response.read()[:300]!r}")
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    return time.monotonic() - started
        raise RuntimeError(f"{model}: stream ended without a token")

    def idle_ram(self, serving: str) -> int:
        """Resident bytes (measured when each replica became ready) held by replicas of other models."""
        deployments = self.health()["deployments"]
        return sum(
            r["memory_bytes"] for name, d in deployments.items() if name != serving for r in d["replicas"]
        )

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)
        self.log.close()


def trace(kind: str, models: list[str], n: int) -> list[str]:
    if kind == "cycle":
        return [models[i % len(models)] for i in range(n)]
    rng = random.Random(7)
    weights = [1 / (rank + 1) ** 1.2 for rank in range(len(models))]
    out: list[str] = []
    while len(out) < n:
        pick = rng.choices(models, weights)[0]
        if not out or pick != out[-1]:  # a request for the model already on the slot is no swap
            out.append(pick)
    return out


def run_trace(
    launcher: Launcher, requests: list[str]
) -> tuple[dict[str, list[float]], dict[str, float], int]:
    """TTFT of every swap per model (first requests, the cold boots, apart), and the most idle RAM seen."""
    swaps: dict[str, list[float]] = {}
    first: dict[str, float] = {}
    idle_ram = 0
    for model in requests:
        took = launcher.ttft(model)
        if model in first:
            swaps.setdefault(model, []).append(took)
        else:
            first[model] = took
        idle_ram = max(idle_ram, launcher.idle_ram(model))
        print(f"  {model:<13} {took:7.2f} s", flush=True)
    return swaps, first, idle_ram


def plain_restores(
    launcher: Launcher, models: list[str], idle_timeout: float, runs: int
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for _ in range(runs):
        for model in models:
            deadline = time.monotonic() + idle_timeout + 30
            while launcher.health()["units"]["held"] and time.monotonic() < deadline:
                time.sleep(0.2)  # scaled to zero: the slot is free
            out.setdefault(model, []).append(launcher.ttft(model))
    return out


def p99(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, round(0.99 * (len(values) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", choices=("cycle", "zipf"), default="cycle")
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--engines", default="vllm,transformers,custom")
    parser.add_argument("--cold-requests", type=int, default=6, help="requests in the swap-by-cold-boot run")
    args = parser.parse_args()
    engines = [e for e in args.engines.split(",") if e]
    model = make_model(ROOT / ".cache" / "models" / "tiny", "tiny")
    requests = trace(args.trace, engines, args.requests)
    results: dict[str, dict[str, list[float]]] = {}
    idle_timeout = 4.0
    with tempfile.TemporaryDirectory(prefix="bench-swap-") as tmp:
        work = Path(tmp)
        deployments_file(work / "restore.toml", model, engines, "criu", idle_timeout)
        print(f"swap by restore, trace {args.trace}: {' '.join(requests)}", flush=True)
        launcher = Launcher(work / "restore.toml", work)
        try:
            swaps, first, idle_ram = run_trace(launcher, requests)
            print("plain restores (slot free)", flush=True)
            plain = plain_restores(launcher, engines, idle_timeout, runs=2)
        finally:
            launcher.stop()
        results["restore"], results["first"], results["plain"] = (
            swaps,
            {m: [t] for m, t in first.items()},
            plain,
        )
        cold_work = work / "cold"
        cold_work.mkdir()
        deployments_file(cold_work / "cold.toml", model, engines, "off", idle_timeout)
        cold_requests = trace(args.trace, engines, args.cold_requests)
        print(f"swap by cold boot (--snapshot off): {' '.join(cold_requests)}", flush=True)
        launcher = Launcher(cold_work / "cold.toml", cold_work)
        try:
            cold_swaps, cold_first, cold_idle = run_trace(launcher, cold_requests)
        finally:
            launcher.stop()
        for m, t in cold_first.items():
            cold_swaps.setdefault(m, []).insert(0, t)
        results["cold"] = cold_swaps

    print()
    print(f"time to first token (s), one CPU slot, trace {args.trace}, {len(requests)} requests")
    head = ("model", "swap by restore", "plain restore", "swap by cold boot", "speed-up")
    print(f"{head[0]:<13} {head[1]:>22} {head[2]:>14} {head[3]:>22} {head[4]:>9}")
    print(f"{'':<13} {'median':>10} {'p99':>11} {'median':>14} {'median':>10} {'p99':>11} {'':>9}")
    for m in engines:
        r, p, c = results["restore"].get(m, []), results["plain"].get(m, []), results["cold"].get(m, [])
        med = statistics.median(r) if r else float("nan")
        cmed = statistics.median(c) if c else float("nan")
        print(
            f"{m:<13} {med:>10.2f} {p99(r) if r else float('nan'):>11.2f} "
            f"{statistics.median(p) if p else float('nan'):>14.2f} {cmed:>10.2f} "
            f"{p99(c) if c else float('nan'):>11.2f} {cmed / med if r and c else float('nan'):>8.1f}x"
        )
    print(
        f"host RAM held by models not serving: swap by restore {idle_ram / 2**20:.0f} MiB, "
        f"swap by cold boot {cold_idle / 2**20:.0f} MiB; vLLM sleep mode: n/a on CPU (refused by vLLM)"
    )
    print(
        "first request of each model (cold boot + snapshot): "
        + ", ".join(f"{m} {t[0]:.1f} s" for m, t in results["first"].items())
    )


if __name__ == "__main__":
    main()
