"""``coldstart demo``: the README's first command, end to end on a CPU machine with no model hub.

Makes a tiny random Qwen3-architecture model (local tokenizer with a chat template), serves it with
``coldstart-serve transformers MODEL`` (the real CLI, in a child process), asks one chat question through
the proxy with the ``openai`` client, prints the answer and the boot time, and stops everything.
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

from coldstart.launcher.process import free_port


def _default_model_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "coldstart" / "models" / "tiny"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="coldstart demo",
        description="Make a tiny local model, serve it behind the coldstart proxy, ask it one question.",
    )
    parser.add_argument(
        "--model-dir", type=Path, default=_default_model_dir(), help="where the model is kept"
    )
    parser.add_argument("--question", default="What is the capital of France?")
    parser.add_argument(
        "--snapshot",
        default="off",
        choices=["auto", "criu", "runsc", "off"],
        help="passed to coldstart-serve (default: off)",
    )
    args = parser.parse_args(argv)

    from openai import OpenAI

    from coldstart.launcher.tiny_model import make_model

    print(f"1/3 making a tiny Qwen3-architecture model in {args.model_dir} (random weights, local tokenizer)")
    model = make_model(args.model_dir, "tiny")

    port = free_port()
    command = [
        sys.executable,
        "-m",
        "coldstart.launcher.cli_serve",
        "transformers",
        str(model),
        "--port",
        str(port),
        "--served-model-name",
        "tiny-qwen3",
        "--snapshot",
        args.snapshot,
    ]
    print(f"2/3 {' '.join(['coldstart-serve', *command[3:]])}")
    started = time.monotonic()
    serve = subprocess.Popen(command)
    try:
        url = f"http://127.0.0.1:{port}"
        while True:
            if serve.poll() is not None:
                print(
                    f"coldstart demo: coldstart-serve exited with status {serve.returncode}", file=sys.stderr
                )
                return 1
            try:
                if httpx.get(f"{url}/health", timeout=2).json()["ready"]:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        boot_s = time.monotonic() - started
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        asked = time.monotonic()
        reply = client.chat.completions.create(
            model="tiny-qwen3",
            messages=[{"role": "user", "content": args.question}],
            max_tokens=16,
            temperature=0,
        )
        answer_s = time.monotonic() - asked
        print(f"3/3 asked through the proxy with the openai client: {args.question!r}")
        print(f"answer (random weights, so nonsense): {reply.choices[0].message.content!r}")
        print(f"boot time: {boot_s:.2f} s to a ready replica; answer in {answer_s:.2f} s")
        return 0
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
