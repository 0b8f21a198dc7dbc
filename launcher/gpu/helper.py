"""Bounded CUDA checkpoint calls: the driver API runs in a child process that can be killed.

Why: ``cuCheckpointProcessCheckpoint``, ``...Restore`` and ``...Unlock`` take no timeout, and a thread stuck
in one (a GPU fault, a driver bug, a target in an odd state) cannot be cancelled from
``asyncio.to_thread``: the launcher could neither give up on the step nor shut down. So the calls run in
one long-lived helper process (``python -m coldstart.launcher.gpu.helper``), started on first use so that
importing cuda-bindings and ``cuInit`` are paid once (~0.3 s), and each call is one JSON line each way with
a deadline. A missed deadline kills the helper (SIGKILL) and raises ``CudaCallTimeout``; the next call
starts a fresh helper. What the abandoned call did to its target is unknown: callers treat it like any
failed step (the CUDA checkpointer resumes or stops the engine; it never leaves one locked).

Errors raised in the helper (``GpuError`` subclasses, already one line) cross as their class name and
fields and are raised again here as the same class, so callers cannot tell the helper is there.

The helper ends when its stdin closes (the launcher exited or called ``close``). ``--fake-host SPEC``
runs it over ``FakeGpuHost.from_spec`` instead of the real driver, for tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from coldstart.launcher import errors
from coldstart.launcher.errors import CudaCallTimeout, GpuError
from coldstart.launcher.gpu.driver import CudaCheckpointAPI, CudaProcessState


@dataclass(frozen=True)
class CallBounds:
    """Seconds each call may take before the helper is killed. Checkpoint and restore copy device memory
    to and from host memory (a few GB/s), so they get minutes; queries get seconds."""

    start_s: float = 60.0  # helper start: Python, cuda-bindings import
    query_s: float = 15.0  # GetState, GetRestoreThreadId, driver version
    lock_extra_s: float = 15.0  # beyond the lock's own timeout (the driver enforces that one)
    checkpoint_s: float = 300.0
    restore_s: float = 300.0
    unlock_s: float = 60.0


class HelperCudaAPI(CudaCheckpointAPI):
    """``CudaCheckpointAPI`` whose calls run in a helper process, each bounded by ``CallBounds``."""

    def __init__(self, bounds: CallBounds | None = None, *, fake_host_spec: str | None = None) -> None:
        super().__init__(driver=None)
        self.bounds = bounds or CallBounds()
        self._fake_spec = fake_host_spec
        self._proc: subprocess.Popen[bytes] | None = None
        self._buf = b""
        self._lock = threading.Lock()  # one request in flight per helper

    # -- the forwarded calls -------------------------------------------------------------------------

    def state(self, pid: int) -> CudaProcessState:
        return CudaProcessState(int(self._request("state", self.bounds.query_s, pid=pid)))

    def restore_thread_id(self, pid: int) -> int:
        return int(self._request("restore_thread_id", self.bounds.query_s, pid=pid))

    def lock(self, pid: int, timeout_s: float | None = None) -> None:
        bound = (timeout_s or 0.0) + self.bounds.lock_extra_s if timeout_s else self.bounds.checkpoint_s
        self._request("lock", bound, pid=pid, timeout_s=timeout_s)

    def checkpoint(self, pid: int) -> None:
        self._request("checkpoint", self.bounds.checkpoint_s, pid=pid)

    def restore(
        self, pid: int, gpu_pairs: Mapping[str, str] | None = None, *, explicit: bool = False
    ) -> None:
        pairs = dict(gpu_pairs) if gpu_pairs else None
        self._request("restore", self.bounds.restore_s, pid=pid, gpu_pairs=pairs, explicit=explicit)

    def unlock(self, pid: int) -> None:
        self._request("unlock", self.bounds.unlock_s, pid=pid)

    def driver_version(self) -> int:
        return int(self._request("driver_version", self.bounds.query_s))

    def require_checkpoint_api(self) -> None:
        self._request("require_checkpoint_api", self.bounds.query_s)

    def start(self) -> None:
        """Start the helper now (it starts on the first call otherwise), so a restore does not pay for it."""
        self._request("ping", self.bounds.start_s)

    def close(self) -> None:
        with self._lock:
            self._stop_helper(kill=False)

    # -- the channel ---------------------------------------------------------------------------------

    def _request(self, op: str, bound_s: float, **kwargs: Any) -> Any:
        with self._lock:
            deadline = time.monotonic() + bound_s
            if self._proc is None or self._proc.poll() is not None:
                self._spawn()
                deadline += self.bounds.start_s
            proc = self._proc
            if proc is None or proc.stdin is None:
                raise GpuError("the CUDA helper process did not start")
            try:
                proc.stdin.write(json.dumps({"op": op, **kwargs}).encode() + b"\n")
                proc.stdin.flush()
                line = self._read_line(deadline)
            except (OSError, ValueError) as exc:
                self._stop_helper(kill=True)
                raise GpuError(f"the CUDA helper process failed during {op}: {exc}") from exc
            if line is None:
                self._stop_helper(kill=True)
                raise CudaCallTimeout(_timeout_message(op, kwargs.get("pid"), bound_s))
            reply = json.loads(line)
        if "error" in reply:
            raise _rebuild(reply["error"])
        return reply.get("ok")

    def _spawn(self) -> None:
        argv = [sys.executable, "-m", "coldstart.launcher.gpu.helper"]
        if self._fake_spec is not None:
            argv += ["--fake-host", self._fake_spec]
        self._buf = b""
        self._proc = subprocess.Popen(  # noqa: S603 -- our own module
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, start_new_session=True
        )

    def _read_line(self, deadline: float) -> bytes | None:
        """One reply line, or None when the deadline passes first."""
        proc = self._proc
        if proc is None or proc.stdout is None:
            raise OSError("no helper process")
        fd = proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                code = proc.wait()
                raise OSError(f"the helper exited with status {code}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def _stop_helper(self, *, kill: bool) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()
        if kill:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._stop_helper(kill=True)


def _timeout_message(op: str, pid: int | None, bound_s: float) -> str:
    target = f" of pid {pid}" if pid is not None else ""
    return (
        f"CUDA {op}{target} did not return within {bound_s:g} s; the helper running it was killed "
        "(see dmesg for NVIDIA Xid errors)"
    )


def _rebuild(error: dict[str, Any]) -> GpuError:
    cls = getattr(errors, str(error.get("type")), None)
    message = str(error.get("message", "CUDA helper error"))
    if not (isinstance(cls, type) and issubclass(cls, GpuError)):
        return GpuError(message)
    if issubclass(cls, errors.CudaCallFailed):
        return cls(
            message, call=str(error.get("call")), pid=error.get("pid"), result=str(error.get("result"))
        )
    return cls(message)


# -- the helper process ----------------------------------------------------------------------------------


def _serve(api: CudaCheckpointAPI, requests: Any, out: Any) -> None:
    for raw in requests:
        if not raw.strip():
            continue
        request = json.loads(raw)
        op = request.pop("op")
        try:
            reply: dict[str, Any] = {"ok": _dispatch(api, op, request)}
        except GpuError as exc:
            reply = {"error": {"type": type(exc).__name__, "message": str(exc), **_fields(exc)}}
        except Exception as exc:  # noqa: BLE001 -- crosses the pipe as one line instead of killing the helper
            reply = {"error": {"type": "GpuError", "message": f"{op} failed in the CUDA helper: {exc!r}"}}
        out.write(json.dumps(reply) + "\n")
        out.flush()


def _dispatch(api: CudaCheckpointAPI, op: str, req: dict[str, Any]) -> Any:
    match op:
        case "ping":
            return "pong"
        case "state":
            return int(api.state(req["pid"]))
        case "restore_thread_id":
            return api.restore_thread_id(req["pid"])
        case "lock":
            return api.lock(req["pid"], req.get("timeout_s"))
        case "checkpoint":
            return api.checkpoint(req["pid"])
        case "restore":
            return api.restore(req["pid"], req.get("gpu_pairs"), explicit=bool(req.get("explicit")))
        case "unlock":
            return api.unlock(req["pid"])
        case "driver_version":
            return api.driver_version()
        case "require_checkpoint_api":
            return api.require_checkpoint_api()
    raise GpuError(f"unknown CUDA helper request {op!r}")


def _fields(exc: GpuError) -> dict[str, Any]:
    if isinstance(exc, errors.CudaCallFailed):
        return {"call": exc.call, "pid": exc.pid, "result": exc.result}
    return {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m coldstart.launcher.gpu.helper", description=__doc__)
    p.add_argument("--fake-host", default=None, help="JSON spec of a simulated GPU host (tests)")
    args = p.parse_args(argv)
    out = os.fdopen(os.dup(1), "w")  # replies only: anything else written to fd 1 goes to stderr
    os.dup2(2, 1)
    driver = None
    if args.fake_host is not None:
        from coldstart.launcher.gpu.fake import FakeGpuHost

        driver = FakeGpuHost.from_spec(args.fake_host).driver
    _serve(CudaCheckpointAPI(driver), sys.stdin, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
