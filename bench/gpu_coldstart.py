#!/usr/bin/env python3
"""GPU cold boot vs CUDA restore of the example engine on one NVIDIA GPU, side by side in one run.

    python3 bench/gpu_coldstart.py [--runs 5] [--cold-runs 3] [--kv-tokens 32768] [--out DIR]
                                   [--criu /path/to/criu [--criu-libdir DIR]] [--model DIR]

The engine is ``recipes/examples/tiny_engine.py --device cuda`` serving the Qwen3-0.6B architecture with
random bf16 weights made on the spot (``coldstart.launcher.tiny_model.make_model(path, "qwen3-0.6b")``)
and a static KV cache of ``--kv-tokens`` tokens allocated at boot. Time is measured to the first streamed
token of a chat request (whole answers would hide the restore behind decoding).

Paths measured (median of several in this one run, ratio to the cold boot):
- cold boot: spawn -> imports, weights onto the GPU, KV cache -> /health -> first token;
- CUDA restore in place, engine hooks run (weights to pinned host memory, KV cache freed, allocator
  emptied before the checkpoint; KV cache re-created and weights back after): from
  ``cuCheckpointProcessRestore`` to the first token (restore + unlock + after-restore hooks + first token);
- the same without hooks (weights and KV cache stay in device memory and are copied out and back);
- with ``--criu``: the full path. After the CUDA checkpoint ``criu dump`` saves the process (its host
  memory now holds the device state) and ends it; each run is ``criu restore`` -> CUDA restore onto the
  GPU by UUID -> unlock -> after-restore hooks -> first token. Without ``--criu`` this path is reported as
  not measured (CRIU is not installed on the GPU machine; a CRIU built elsewhere can be carried).

Also: device bytes the CUDA checkpoint copies (NVML, per process) and the process's anonymous memory
after it (what a CPU image must hold), with and without dropping the KV cache; the canary (a greedy
completion recorded before the first checkpoint) after every restore; restore by GPU UUID (an explicit
gpuPairs entry). Everything that fails is reported with its one-line reason instead of a traceback, and
the table says what was not measured. Results also go to ``OUT/gpu_coldstart.json``.

On the H200 (the device tool), prepare ``.carry/`` here with ``sh bench/pack_gpu_carry.sh``, then one call
with ``carry: [".carry"]`` and ``timeout_s: 600``::

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/whl/*.whl &&
    PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 bench/gpu_coldstart.py --out $OUT 2>&1 | tee $OUT/log.txt

``--criu auto`` (the default) uses ``.carry/criu/criu`` (or a ``criu`` on PATH), with ``.carry/criu`` as
``--libdir`` when it holds CRIU's ``cuda_plugin.so``, and puts ``.carry/bin`` (``cuda-checkpoint`` = our
CLI) on PATH. The repo need not be installed (the GPU machine has torch, transformers, cuda-bindings,
nvidia-ml-py and httpx; starlette and uvicorn travel as wheels): the ``coldstart`` package is then made
importable from a temporary folder of links to the repo's top-level folders.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("launcher", "engine_adapters", "snapshot_hooks", "imagefs", "pool", "recipes")
ENGINE_SCRIPT = REPO / "recipes" / "examples" / "tiny_engine.py"
CANARY_PROMPT = "The capital of France is"
# --fake-gpu (a plumbing check on a machine without a GPU): the engine on CPU, the driver and NVML simulated.
FAKE: dict[str, Any] = {}
CHAT = [{"role": "user", "content": "Say hello in five words."}]


def bootstrap() -> dict[str, str]:
    """Make ``import coldstart`` work; returns the environment child processes need for it too."""
    try:
        import coldstart.launcher  # noqa: F401

        return {}
    except ImportError:
        pass
    shim = Path(tempfile.mkdtemp(prefix="coldstart-shim-"))
    pkg = shim / "coldstart"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for folder in FOLDERS:
        (pkg / folder).symlink_to(REPO / folder)
    sys.path.insert(0, str(shim))
    # Exported, not only passed to the engine: CRIU's CUDA plugin runs `cuda-checkpoint` (our CLI) too.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": os.environ["PYTHONPATH"]}


CHILD_ENV = bootstrap()

import httpx  # noqa: E402

from coldstart.launcher.checkpointers.cuda import process_tree  # noqa: E402
from coldstart.launcher.gpu.driver import CudaCheckpointAPI, CudaProcessState  # noqa: E402
from coldstart.launcher.gpu.fake import FakeGpuHost  # noqa: E402
from coldstart.launcher.errors import ColdstartError  # noqa: E402
from coldstart.launcher.gpu.inventory import gpu_processes, read_inventory  # noqa: E402
from coldstart.launcher.process import free_port  # noqa: E402
from coldstart.snapshot_hooks.client import run_after_restore, run_before_checkpoint  # noqa: E402

# -- the engine ----------------------------------------------------------------------------------------


class Engine:
    """One tiny_engine process on CUDA: owned here (SIGTERM, grace, SIGKILL, reap)."""

    def __init__(self, model: Path, workdir: Path, kv_tokens: int, name: str, quiet: bool = False) -> None:
        self.model, self.kv_tokens, self.name = model, kv_tokens, name
        self.port = free_port()
        self.control_port = self.port + 1
        self.log_path = workdir / f"engine-{self.port}.log"
        self.quiet = quiet  # CRIU refuses to restore a log file that grew: use /dev/null when dumping
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self.t_spawn = 0.0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def control_url(self) -> str:
        return f"http://127.0.0.1:{self.control_port}"

    def start(self) -> None:
        device = "cpu" if FAKE else "cuda"
        argv = [sys.executable, str(ENGINE_SCRIPT), "--model", str(self.model), "--device", device]
        argv += ["--port", str(self.port), "--max-cache-len", str(self.kv_tokens)]
        argv += ["--served-model-name", self.name]
        env = {
            **os.environ,
            **CHILD_ENV,
            "HF_HUB_OFFLINE": "1",
            "COLDSTART_CONTROL_HOST": "127.0.0.1",
            "COLDSTART_CONTROL_PORT": str(self.control_port),
        }
        out = open(os.devnull if self.quiet else self.log_path, "wb")  # noqa: SIM115 -- handed to the child
        self.t_spawn = time.perf_counter()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        out.close()
        self.pid = self.proc.pid
        if FAKE:
            host: FakeGpuHost = FAKE["host"]
            host.add_process(self.pid, gpus=[host.gpus[0].uuid], device_bytes=3 << 30)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_healthy(self, timeout_s: float = 300) -> float:
        deadline = time.perf_counter() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.perf_counter() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"engine exited with {self.proc.returncode}:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.base_url}/health").status_code == 200:
                        return time.perf_counter()
                time.sleep(0.01)
        raise RuntimeError(f"engine not healthy after {timeout_s:g} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        elif self.proc is None and self.pid:
            kill_and_reap(self.pid)


def first_token(base_url: str, name: str, timeout_s: float = 120) -> float:
    """Seconds until the first SSE ``data:`` line of a streamed greedy chat completion."""
    body = {"model": name, "messages": CHAT, "max_tokens": 8, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    with httpx.Client(timeout=timeout_s) as client:
        with client.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"chat answered {response.status_code}: {response.read()[:200]!r}")
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data:"):
                    elapsed = time.perf_counter() - t0
                    for _ in lines:  # drain: the engine serves one sequence at a time
                        pass
                    return elapsed
    raise RuntimeError("stream ended without a data line")


def canary(base_url: str, name: str) -> str:
    body = {"model": name, "prompt": CANARY_PROMPT, "max_tokens": 16, "temperature": 0}
    with httpx.Client(timeout=120) as client:
        response = client.post(f"{base_url}/v1/completions", json=body)
    response.raise_for_status()
    return str(response.json()["choices"][0]["text"])


def anon_bytes(pid: int) -> int:
    """Anonymous memory of ``pid`` (what a CPU checkpointer writes), from smaps_rollup."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) * 1024
    return 0


def nvml() -> Any:
    return FAKE["host"].nvml if FAKE else None


def device_bytes(pid: int) -> int:
    proc = gpu_processes(nvml()).get(pid)
    return proc.used_bytes if proc else 0


def kill_and_reap(pid: int) -> None:
    """For processes that are not our Popen children (restored by CRIU; we are their subreaper)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    deadline = time.perf_counter() + 10
    while Path(f"/proc/{pid}").exists() and time.perf_counter() < deadline:
        time.sleep(0.01)


def set_child_subreaper() -> None:
    """Processes CRIU restores with -d are re-parented to us, so we can reap them."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


# -- results -------------------------------------------------------------------------------------------


@dataclass
class Results:
    env: dict[str, Any] = field(default_factory=dict)
    cold: list[dict[str, float]] = field(default_factory=list)
    modes: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    bytes: dict[str, dict[str, int]] = field(default_factory=dict)
    canary: str | None = None
    canary_checks: list[bool] = field(default_factory=list)
    uuid_restore: str = "not tried"
    errors: list[str] = field(default_factory=list)
    not_measured: list[str] = field(default_factory=list)


def note_error(results: Results, what: str, exc: BaseException) -> None:
    line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    results.errors.append(f"{what}: {type(exc).__name__}: {line}")
    print(f"!! {what}: {type(exc).__name__}: {exc}", flush=True)
    if not isinstance(exc, ColdstartError):
        traceback.print_exc()


# -- phases --------------------------------------------------------------------------------------------


def cold_boots(args: argparse.Namespace, model: Path, workdir: Path, results: Results) -> None:
    for i in range(args.cold_runs):
        engine = Engine(model, workdir, args.kv_tokens, "tiny")
        try:
            engine.start()
            healthy = engine.wait_healthy()
            ttft = first_token(engine.base_url, engine.name)
            total = time.perf_counter() - engine.t_spawn
            results.cold.append(
                {"health_s": healthy - engine.t_spawn, "first_token_s": total, "ttft_s": ttft}
            )
            print(
                f"cold boot {i + 1}: first token after {total:.2f} s "
                f"(healthy {healthy - engine.t_spawn:.2f} s)"
            )
        finally:
            engine.stop()


def cuda_in_place(
    args: argparse.Namespace, api: CudaCheckpointAPI, model: Path, workdir: Path, results: Results
) -> None:
    engine = Engine(model, workdir, args.kv_tokens, "tiny")
    try:
        engine.start()
        engine.wait_healthy()
        for _ in range(2):
            first_token(engine.base_url, engine.name)
        results.canary = canary(engine.base_url, engine.name)
        inventory = read_inventory(nvml())
        gpu_uuid = inventory.gpus[0].uuid
        pids = [p for p in process_tree(engine.pid) if api.is_cuda_process(p)]
        if pids != [engine.pid]:
            raise RuntimeError(f"expected one CUDA process (the engine {engine.pid}), found {pids}")
        for mode, drop in (("hooks", True), ("no_hooks", False)):
            runs = results.modes.setdefault(mode, [])
            for i in range(args.runs):
                # The first restore of the run tries an explicit {uuid: uuid} pair: restore by GPU UUID.
                explicit = mode == "hooks" and i == 0
                run = cuda_cycle(api, engine, gpu_uuid, drop, explicit, results)
                runs.append(run)
                results.bytes.setdefault(
                    mode, {"device_bytes": run["device_bytes"], "anon_bytes": run["anon_bytes"]}
                )
                print(
                    f"{mode} {i + 1}: restore -> first token {run['restore_to_first_token_s']:.3f} s "
                    f"(restore {run['restore_s']:.3f}, unlock {run['unlock_s']:.3f}, "
                    f"hooks {run['hooks_s']:.3f}, "
                    f"ttft {run['ttft_s']:.3f}); checkpoint {run['checkpoint_s']:.3f} s, "
                    f"device {run['device_bytes'] / 2**30:.2f} GiB, anon {run['anon_bytes'] / 2**30:.2f} GiB",
                    flush=True,
                )
    finally:
        engine.stop()


def cuda_cycle(
    api: CudaCheckpointAPI, engine: Engine, gpu_uuid: str, drop: bool, explicit: bool, results: Results
) -> dict[str, Any]:
    pid = engine.pid
    run: dict[str, Any] = {}
    t = time.perf_counter()
    if drop:
        asyncio.run(run_before_checkpoint(engine.control_url, 300))
    run["before_hooks_s"] = time.perf_counter() - t
    run["device_bytes"] = device_bytes(pid)
    t = time.perf_counter()
    api.lock(pid, 30)
    run["lock_s"] = time.perf_counter() - t
    t = time.perf_counter()
    api.checkpoint(pid)
    run["checkpoint_s"] = time.perf_counter() - t
    api.expect(pid, CudaProcessState.CHECKPOINTED, "measure")
    run["anon_bytes"] = anon_bytes(pid)
    run["device_bytes_while_checkpointed"] = device_bytes(pid)
    t0 = time.perf_counter()
    restore_by_uuid(api, pid, gpu_uuid, explicit, results)
    run["restore_s"] = time.perf_counter() - t0
    t = time.perf_counter()
    api.unlock(pid)
    run["unlock_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if drop:
        asyncio.run(run_after_restore(engine.control_url, 300))
    run["hooks_s"] = time.perf_counter() - t
    run["ttft_s"] = first_token(engine.base_url, engine.name)
    run["restore_to_first_token_s"] = time.perf_counter() - t0
    same = canary(engine.base_url, engine.name) == results.canary
    results.canary_checks.append(same)
    run["canary_identical"] = same
    return run


def restore_by_uuid(
    api: CudaCheckpointAPI, pid: int, gpu_uuid: str, explicit: bool, results: Results
) -> None:
    if not explicit:
        api.restore(pid, {gpu_uuid: gpu_uuid})
        return
    try:
        api.restore(pid, {gpu_uuid: gpu_uuid}, explicit=True)
        results.uuid_restore = f"ok: gpuPairs {{{gpu_uuid} -> {gpu_uuid}}} accepted"
    except ColdstartError as exc:
        results.uuid_restore = f"explicit gpuPairs refused ({exc}); restored in place without pairs"
        api.restore(pid, None)


def criu_path(
    args: argparse.Namespace, api: CudaCheckpointAPI, model: Path, workdir: Path, results: Results
) -> None:
    """criu dump after the CUDA checkpoint, then criu restore -> CUDA restore by UUID -> first token."""
    set_child_subreaper()
    criu = [args.criu] + (["--libdir", args.criu_libdir] if args.criu_libdir else [])
    image = workdir / "criu-image"
    image.mkdir()
    engine = Engine(model, workdir, args.kv_tokens, "tiny", quiet=True)
    runs = results.modes.setdefault("criu", [])
    try:
        engine.start()
        engine.wait_healthy()
        for _ in range(2):
            first_token(engine.base_url, engine.name)
        reference = canary(engine.base_url, engine.name)
        if results.canary is None:
            results.canary = reference
        gpu_uuid = read_inventory(nvml()).gpus[0].uuid
        asyncio.run(run_before_checkpoint(engine.control_url, 300))
        api.lock(engine.pid, 30)
        api.checkpoint(engine.pid)
        t = time.perf_counter()
        dump = subprocess.run(
            [*criu, "dump", "-t", str(engine.pid), "-D", str(image), "-o", "dump.log", "-v2"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        dump_s = time.perf_counter() - t
        if dump.returncode != 0:
            api.restore(engine.pid)
            api.unlock(engine.pid)
            raise RuntimeError(f"criu dump failed ({dump.returncode}): {_log_tail(image / 'dump.log')}")
        engine.proc.wait(30)  # type: ignore[union-attr]  -- criu ended it after the dump
        image_bytes = sum(f.stat().st_size for f in image.iterdir() if f.is_file())
        results.bytes["criu_image"] = {"image_bytes": image_bytes}
        print(f"criu dump {dump_s:.2f} s, image {image_bytes / 2**30:.2f} GiB", flush=True)
        for i in range(args.runs):
            pidfile = image / f"restored-{i}.pid"
            t0 = time.perf_counter()
            restore = subprocess.run(
                [
                    *criu,
                    "restore",
                    "-D",
                    str(image),
                    "-d",
                    "--pidfile",
                    str(pidfile),
                    "-o",
                    f"restore-{i}.log",
                ],
                capture_output=True,
                text=True,
                timeout=300,
            )
            if restore.returncode != 0:
                raise RuntimeError(f"criu restore failed: {_log_tail(image / f'restore-{i}.log')}")
            criu_s = time.perf_counter() - t0
            pid = int(pidfile.read_text())
            try:
                state = api.state(pid)
                if state is CudaProcessState.CHECKPOINTED:
                    restore_by_uuid(api, pid, gpu_uuid, i == 0, results)
                    api.unlock(pid)
                cuda_s = time.perf_counter() - t0 - criu_s
                restored = Engine(model, workdir, args.kv_tokens, "tiny")
                restored.port, restored.control_port = engine.port, engine.control_port
                asyncio.run(run_after_restore(restored.control_url, 300))
                ttft = first_token(restored.base_url, restored.name)
                total = time.perf_counter() - t0
                same = canary(restored.base_url, restored.name) == reference
                results.canary_checks.append(same)
                runs.append(
                    {
                        "criu_restore_s": criu_s,
                        "cuda_restore_unlock_s": cuda_s,
                        "ttft_s": ttft,
                        "restore_to_first_token_s": total,
                        "canary_identical": same,
                        "cuda_state_after_criu": state.label,
                    }
                )
                print(f"criu {i + 1}: restore -> first token {total:.3f} s (criu {criu_s:.3f})", flush=True)
            finally:
                kill_and_reap(pid)
    finally:
        engine.stop()


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- report --------------------------------------------------------------------------------------------


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def report(results: Results) -> str:
    cold = median([r["first_token_s"] for r in results.cold])
    lines = ["SIMULATED DRIVER (--fake-gpu): a plumbing check on CPU, not a measurement"] if FAKE else []
    lines.append(
        f"GPU: {results.env.get('gpu')}  driver {results.env.get('driver')}  torch {results.env.get('torch')}"
    )
    lines.append(
        f"model: Qwen3-0.6B architecture, random bf16; KV cache {results.env.get('kv_tokens')} tokens "
        f"({results.env.get('kv_bytes', 0) / 2**30:.2f} GiB)"
    )
    lines.append("")
    lines.append(f"| {'path':<58} | {'median s':>9} | {'runs':>4} | {'vs cold boot':>12} |")
    lines.append(f"|{'-' * 60}|{'-' * 11}|{'-' * 6}|{'-' * 14}|")

    def row(label: str, values: list[float]) -> None:
        m = median(values)
        if m is None:
            lines.append(f"| {label:<58} | {'-':>9} | {0:>4} | {'not measured':>12} |")
            return
        if label.startswith("cold"):
            ratio = "1.0x"
        elif label.startswith(" ") or label.startswith("checkpoint") or not cold:
            ratio = ""  # a part of a path, or not a way to start a replica: no ratio
        else:
            ratio = f"{cold / m:.1f}x faster"
        lines.append(f"| {label:<58} | {m:>9.3f} | {len(values):>4} | {ratio:>12} |")

    row("cold boot -> first token", [r["first_token_s"] for r in results.cold])
    hooks = results.modes.get("hooks", [])
    plain = results.modes.get("no_hooks", [])
    criu = results.modes.get("criu", [])
    row(
        "CUDA restore in place + hooks (KV dropped) -> first token",
        [r["restore_to_first_token_s"] for r in hooks],
    )
    row("  of which cuCheckpointProcessRestore", [r["restore_s"] for r in hooks])
    row("  of which after-restore hooks (KV, weights back)", [r["hooks_s"] for r in hooks])
    row(
        "CUDA restore in place, no hooks (KV kept) -> first token",
        [r["restore_to_first_token_s"] for r in plain],
    )
    row("  of which cuCheckpointProcessRestore", [r["restore_s"] for r in plain])
    row("CRIU restore + CUDA restore by UUID -> first token", [r["restore_to_first_token_s"] for r in criu])
    row("  of which criu restore", [r["criu_restore_s"] for r in criu])
    row("checkpoint (lock + checkpoint), hooks", [r["lock_s"] + r["checkpoint_s"] for r in hooks])
    row("checkpoint (lock + checkpoint), no hooks", [r["lock_s"] + r["checkpoint_s"] for r in plain])
    lines.append("")
    lines.append(f"| {'checkpoint bytes':<58} | {'device GiB':>10} | {'host anon GiB':>13} |")
    lines.append(f"|{'-' * 60}|{'-' * 12}|{'-' * 15}|")
    for mode, label in (
        ("hooks", "KV cache dropped, weights in host memory"),
        ("no_hooks", "everything on device"),
    ):
        b = results.bytes.get(mode)
        if b:
            lines.append(
                f"| {label:<58} | {b['device_bytes'] / 2**30:>10.2f} | {b['anon_bytes'] / 2**30:>13.2f} |"
            )
        else:
            lines.append(f"| {label:<58} | {'-':>10} | {'-':>13} |")
    if "criu_image" in results.bytes:
        lines.append(
            f"| {'CRIU image (KV dropped)':<58} | {'':>10} | "
            f"{results.bytes['criu_image']['image_bytes'] / 2**30:>13.2f} |"
        )
    lines.append("")
    checks = results.canary_checks
    lines.append(f"canary identical after restore: {sum(checks)}/{len(checks)} ({results.canary!r})")
    lines.append(f"restore by GPU UUID: {results.uuid_restore}")
    for item in results.not_measured:
        lines.append(f"not measured: {item}")
    for item in results.errors:
        lines.append(f"error: {item}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="restores per path")
    p.add_argument("--cold-runs", type=int, default=3, help="cold boots")
    p.add_argument("--kv-tokens", type=int, default=32768, help="static KV cache length of the engine")
    p.add_argument("--model", type=Path, default=None, help="model folder (made if absent)")
    p.add_argument(
        "--criu", default="auto", help="criu (>= 4.2) for the full path: auto (.carry, PATH) | none | PATH"
    )
    p.add_argument(
        "--criu-libdir", default="auto", help="criu --libdir with cuda_plugin.so: auto | none | DIR"
    )
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    p.add_argument("--fake-gpu", action="store_true", help="plumbing check without a GPU: tiny model on CPU")
    args = p.parse_args(argv)
    resolve_criu(args)
    if args.fake_gpu:
        FAKE["host"] = FakeGpuHost.with_gpus("NVIDIA H200 (simulated)", driver_version="580.65.06")
    args.out.mkdir(parents=True, exist_ok=True)
    results = Results()
    workdir = Path(tempfile.mkdtemp(prefix="gpu-coldstart-"))
    try:
        run_all(args, workdir, results)
    finally:
        text = report(results)
        print("\n" + text)
        (args.out / "gpu_coldstart.txt").write_text(text + "\n")
        (args.out / "gpu_coldstart.json").write_text(json.dumps(results.__dict__, indent=2, default=str))
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if results.cold and (results.modes.get("hooks") or results.modes.get("no_hooks")) else 1


def resolve_criu(args: argparse.Namespace) -> None:
    carry = REPO / ".carry"
    if args.criu == "auto":
        carried = carry / "criu" / "criu"
        args.criu = str(carried) if carried.exists() else shutil.which("criu")
    elif args.criu == "none":
        args.criu = None
    if args.criu_libdir == "auto":
        plugin = carry / "criu" / "cuda_plugin.so"
        args.criu_libdir = str(plugin.parent) if plugin.exists() else None
    elif args.criu_libdir == "none":
        args.criu_libdir = None
    if (carry / "bin").is_dir():  # cuda-checkpoint -> our CLI, for CRIU's CUDA plugin
        os.environ["PATH"] = f"{carry / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"


def run_all(args: argparse.Namespace, workdir: Path, results: Results) -> None:
    try:
        inventory = read_inventory(nvml())
        gpu = inventory.gpus[0]
        results.env.update(
            gpu=f"{gpu.name} {gpu.uuid}", driver=inventory.driver_version, persistence=gpu.persistence_mode
        )
    except (ColdstartError, IndexError) as exc:
        note_error(results, "NVML", exc)
        results.not_measured.append("everything: no usable NVIDIA GPU")
        return
    import torch

    results.env.update(torch=torch.__version__, kv_tokens=args.kv_tokens)
    from coldstart.launcher.tiny_model import SIZES, make_model

    shape = SIZES["qwen3-0.6b"]
    results.env["kv_bytes"] = (
        2
        * int(shape["num_hidden_layers"])
        * int(shape["num_key_value_heads"])
        * int(shape["head_dim"])  # type: ignore[call-overload]
        * args.kv_tokens
        * 2
    )
    t = time.perf_counter()
    size = "tiny" if FAKE else "qwen3-0.6b"
    model = make_model(args.model or workdir / size, size)
    print(f"model ready in {time.perf_counter() - t:.1f} s: {model}", flush=True)
    try:
        cold_boots(args, model, workdir, results)
    except Exception as exc:  # noqa: BLE001 -- reported in the table, the other paths still run
        note_error(results, "cold boot", exc)
    api = CudaCheckpointAPI(FAKE["host"].driver if FAKE else None)
    try:
        api.require_checkpoint_api()
        cuda_in_place(args, api, model, workdir, results)
    except Exception as exc:  # noqa: BLE001
        note_error(results, "CUDA checkpoint in place", exc)
    if args.criu:
        try:
            criu_path(args, api, model, workdir, results)
        except Exception as exc:  # noqa: BLE001
            note_error(results, "CRIU + CUDA", exc)
    else:
        results.not_measured.append(
            "CRIU dump/restore of the CUDA-checkpointed engine (no criu: none carried in .carry/criu; "
            "the in-place rows time the CUDA half of a restore, the CPU half was measured on the CPU box)"
        )


if __name__ == "__main__":
    sys.exit(main())
