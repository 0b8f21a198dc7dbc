"""A test engine on a different web stack (stdlib ``http.server``) whose hooks fail on request.

``FAULTY_FAIL=before``: the second before-checkpoint hook raises; ``FAULTY_FAIL=after``: the after-restore
hook raises. ``GET /health`` and ``GET /coldstart/state`` report where its (pretend) weights are.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from coldstart import snapshot_hooks as hooks

FAIL = os.environ.get("FAULTY_FAIL", "")
weights = {"location": "device"}


@hooks.before_checkpoint
def offload() -> None:
    weights["location"] = "host"


@hooks.before_checkpoint(timeout_s=5)
def check_idle() -> None:
    if FAIL == "before":
        raise RuntimeError("simulated: engine not idle")


@hooks.after_restore
def reload() -> None:
    if FAIL == "after":
        raise RuntimeError("simulated: weights lost")
    weights["location"] = "device"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        body = json.dumps(
            {"status": "ok", "weights": weights["location"], "hooks": hooks.state().value}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    hooks.serve()
    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
