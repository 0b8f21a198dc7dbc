"""``coldstart demo``: the README's first command, end to end on a CPU machine with no model hub.

Makes a tiny random Qwen3-architecture model (local tokenizer with a chat template), serves it with
``coldstart-serve vllm MODEL`` -- the real vLLM, from the venv ``.ci/setup`` installs (CPU build, lean
configuration for small machines) -- through the real CLI in a child process, asks one chat question
through the proxy with the ``openai`` client and prints the answer and the boot time. Then it waits for
the proxy to scale to zero and asks again: with a working checkpointer the new replica is restored from
the snapshot the first one left, and the demo prints how long that took. Everything is stopped at the end.
Where no vLLM is installed, it says so and serves with ``transformers`` instead (``--engine`` picks).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from coldstart.engine_adapters.vllm import LEAN_CPU_ARGS, LEAN_CPU_ENV
from coldstart.launcher.config import CheckpointerName
from coldstart.launcher.process import free_port


def _default_model_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "coldstart" / "models" / "tiny"


def _health(url: str) -> dict:
    try:
        return httpx.get(f"{url}/health", timeout=2).json()
    except httpx.HTTPError:
        return {}


def _wait(serve: subprocess.Popen[bytes], url: str, done, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not done(_health(url)):
        if serve.poll() is not None:
            raise RuntimeError(f"coldstart-serve exited with status {serve.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="coldstart demo",
        description="Make a tiny local model, serve it behind the coldstart proxy, ask it a question; let it "
        "scale to zero and ask again (restored from a snapshot where a checkpointer works).",
    )
    parser.add_argument(
        "--model-dir", type=Path, default=_default_model_dir(), help="where the model is kept"
    )
    parser.add_argument("--question", default="What is the capital of France?")
    parser.add_argument(
        "--snapshot",
        default="auto",
        choices=[n for n in CheckpointerName if n != CheckpointerName.CUDA],
        help="passed to coldstart-serve (default: auto)",
    )
    parser.add_argument(
        "--engine",
        default="auto",
        choices=["auto", "vllm", "transformers"],
        help="auto: vLLM where it is installed (bash .ci/setup), else transformers",
    )
    args = parser.parse_args(argv)

    from openai import OpenAI

    from coldstart.launcher.tiny_model import make_model

    engine = args.engine
    if engine != "transformers":
        from coldstart.engine_adapters.errors import EngineNotInstalled
        from coldstart.engine_adapters.registry import get_adapter

        try:
            get_adapter("vllm").check_installed()
            engine = "vllm"
        except EngineNotInstalled as exc:
            if engine == "vllm":
                print(f"coldstart demo: {exc}", file=sys.stderr)
                return 1
            print(f"0/4 vLLM is not installed ({exc}); serving with transformers instead")
            engine = "transformers"
    # vLLM on a small CPU machine: engine core in one process beside the API server, a 64 MB KV cache.
    engine_args = list(LEAN_CPU_ARGS) if engine == "vllm" else []
    env = {**os.environ, **LEAN_CPU_ENV} if engine == "vllm" else None

    print(f"1/4 making a tiny Qwen3-architecture model in {args.model_dir} (random weights, local tokenizer)")
    model = make_model(args.model_dir, "tiny")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "coldstart.launcher.cli.serve",
        engine,
        str(model),
        "--port",
        str(port),
        "--served-model-name",
        "tiny-qwen3",
        "--snapshot",
        args.snapshot,
        "--idle-timeout",
        "2",
        *engine_args,
    ]
    lean = " ".join(f"{k}={v}" for k, v in LEAN_CPU_ENV.items()) + " " if engine == "vllm" else ""
    print(f"2/4 {lean}{' '.join(['coldstart-serve', *command[3:]])}")
    started = time.monotonic()
    serve = subprocess.Popen(command, env=env)
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

    def ask() -> str:
        reply = client.chat.completions.create(
            model="tiny-qwen3",
            messages=[{"role": "user", "content": args.question}],
            max_tokens=16,
            temperature=0,
        )
        return reply.choices[0].message.content or ""

    try:
        _wait(serve, url, lambda h: h.get("ready"), "a ready replica", timeout=900)
        boot_s = time.monotonic() - started
        how = [r["how"] for r in _health(url)["replicas"]]
        answer = ask()
        print(f"3/4 asked through the proxy with the openai client: {args.question!r}")
        print(f"    answer (random weights, so nonsense): {answer!r}")
        print(f"    first replica ready {boot_s:.2f} s after launch ({', '.join(how)})")

        _wait(serve, url, lambda h: h.get("replicas") == [], "scale to zero", timeout=60)
        print("4/4 idle for 2 s: scaled to zero; asking again (the request is held while a replica starts)")
        asked = time.monotonic()
        again = ask()
        how = [r["how"] for r in _health(url)["replicas"]]
        print(
            f"    same greedy answer: {again == answer}; answered {time.monotonic() - asked:.2f} s after the "
            f"request, by a replica started by {', '.join(how)}"
        )
        return 0
    except RuntimeError as exc:
        print(f"coldstart demo: {exc}", file=sys.stderr)
        return 1
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
