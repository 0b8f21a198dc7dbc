#!/usr/bin/env python3
"""GPU cold boot vs CUDA restore on one NVIDIA GPU, side by side in one run, built to run once and report.

    python3 bench/gpu_coldstart.py [--deadline-s 280] [--runs 3] [--cold-runs 2] [--kv-tokens 32768]
                                   [--out DIR] [--phases preflight,cold,inplace,launcher,criu] [--fake-gpu]

On the device machine (one command; prepare ``.carry/`` here first with ``sh bench/pack_gpu_carry.sh``)::

    sh bench/gpu_run.sh        # run tool: carry [".carry"], timeout_s 360 (deadline 280 s inside)

Model: the Qwen3-0.6B architecture with random bf16 weights made on the spot (``tiny_model.make_model``;
every token id decodes to text, so the first streamed chunk is the first token). Engines: the example
engine ``recipes/examples/tiny_engine.py --device cuda`` (snapshot hooks: weights to host memory and KV
cache dropped before the checkpoint, back after the restore) and ``transformers serve`` (the real Hugging
Face model code, no hooks). All times are to the first streamed chunk that carries a token.

Phases, each one saving ``OUT/gpu_coldstart.json`` when it ends (a run killed later still reports):
- ``preflight``: every import the run needs, gVisor (CRIU cannot work there: said in one line and the CRIU
  phases are skipped), ``criu check``, ``uname -r``, driver/CUDA/cuda-bindings versions, persistence mode,
  ``/dev/nvidia*``, the CUDA helper process started (``cuInit``: the driver stays initialised the same way
  for every cold boot and restore that follows; persistence mode is recorded, never changed);
- ``cold``: the example engine spawned -> first token, page cache warm (the model was just written) and
  once after dropping the page cache;
- ``inplace``: the CUDA half of a restore in place (lock, checkpoint, restore by GPU UUID, unlock), with
  and without the engine's hooks: device bytes, host memory, restore -> first token, canary token ids;
- ``launcher``: coldstart itself (``SnapshotManager`` + ``--snapshot cuda``: CRIU sandbox, CUDA checkpoint,
  CRIU dump with no CRIU plugin, verify, CRIU restore, CUDA restore onto the GPU by UUID, unlock, hooks,
  canary) for the example engine and for ``transformers serve``: cold boot in the sandbox -> first token,
  snapshot size, two replicas restored one after the other -> first token, phases, same greedy token ids,
  GPU memory before the checkpoint / at it / after the restore;
- ``criu``: bare ``criu dump``/``criu restore`` of the example engine around the CUDA calls: the image
  without hooks (its size) and restores with the page cache warm and dropped.

Bounded: an overall ``--deadline-s`` (a phase that would not fit is skipped and says so; SIGALRM at the
deadline ends the run, the results so far are written), every CUDA driver call in a helper process with its
own bound, every engine and CRIU process owned and stopped. At most 7 files land in OUT: gpu_coldstart.json,
gpu_coldstart.txt (the table), diagnostics.txt (versions, nvidia-smi -q, dmesg/Xid, /proc/PID/fd and
CUDA states at failures), engine-logs.txt, criu-logs.txt (logs, their ``Error`` lines, ``criu check``),
launcher-log.txt; the run command adds log.txt.

``--fake-gpu`` checks the plumbing on a machine without a GPU: the engine on CPU, the driver and NVML
simulated in-process, the launcher phase with the CRIU checkpointer alone. Its times mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import ctypes
import importlib
import json
import logging
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("launcher", "engine_adapters", "snapshot_hooks", "imagefs", "pool", "recipes")
ENGINE_SCRIPT = REPO / "recipes" / "examples" / "tiny_engine.py"
CANARY_PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Say hello in five words."}]
FAKE: dict[str, Any] = {}  # --fake-gpu: {"host": FakeGpuHost}
# Not /tmp: the CRIU sandbox gives each replica private tmpfs folders (criu_init.PRIVATE_TMPFS; /tmp was one
# of them once), and a model or import shim there would not exist for the engine. /var/tmp is never one.
SCRATCH = "/var/tmp" if os.path.isdir("/var/tmp") else None


def bootstrap() -> dict[str, str]:
    """Make ``import coldstart`` work without installing the repo; returns the env children need for it."""
    try:
        import coldstart.launcher  # noqa: F401

        return {}
    except ImportError:
        pass
    shim = Path(tempfile.mkdtemp(prefix="coldstart-shim-", dir=SCRATCH))
    atexit.register(shutil.rmtree, shim, True)
    pkg = shim / "coldstart"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for folder in FOLDERS:
        (pkg / folder).symlink_to(REPO / folder)
    sys.path.insert(0, str(shim))
    # Exported: engines and the CUDA helper process import coldstart too.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": os.environ["PYTHONPATH"]}


CHILD_ENV = bootstrap()

# Imports that every phase needs; the preflight phase checks the rest one by one and reports each.
import httpx  # noqa: E402

from coldstart.launcher.errors import ColdstartError  # noqa: E402
from coldstart.launcher.gpu.driver import CudaCheckpointAPI, CudaProcessState  # noqa: E402
from coldstart.launcher.gpu.fake import FakeGpuHost  # noqa: E402
from coldstart.launcher.gpu.helper import CallBounds, HelperCudaAPI  # noqa: E402
from coldstart.launcher.gpu.inventory import gpu_processes, read_inventory  # noqa: E402
from coldstart.launcher.process import free_port_pair, process_tree  # noqa: E402

# Imports the run needs (checked by preflight); missing ones mean a wrong carry, named in one line.
NEEDED_IMPORTS = (
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "cuda.bindings.driver",
    "pynvml",
    "httpx",
    "starlette",
    "uvicorn",
    "fastapi",
    "pydantic",
    "openai",
    "aiohttp",
    "prometheus_client",
    "rich",
    "psutil",
    "coldstart.launcher.server",
    "coldstart.launcher.checkpointers.cuda",
    "coldstart.engine_adapters.transformers",
    "transformers.cli.transformers",
)
OUT_FILES = ("diagnostics.txt", "engine-logs.txt", "criu-logs.txt", "launcher-log.txt")


class DeadlineReached(BaseException):
    """Raised by SIGALRM at the overall deadline; a BaseException so no phase's ``except`` eats it."""


# -- results and the files that come back -----------------------------------------------------------------


@dataclass
class Results:
    env: dict[str, Any] = field(default_factory=dict)
    preflight: dict[str, Any] = field(default_factory=dict)
    phases_done: list[str] = field(default_factory=list)
    cold: list[dict[str, Any]] = field(default_factory=list)
    modes: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    launcher: dict[str, dict[str, Any]] = field(default_factory=dict)
    bytes: dict[str, dict[str, int]] = field(default_factory=dict)
    canary: dict[str, Any] = field(default_factory=dict)
    canary_checks: list[dict[str, Any]] = field(default_factory=list)
    uuid_restore: str = "not tried"
    errors: list[str] = field(default_factory=list)
    not_measured: list[str] = field(default_factory=list)


class Run:
    """Where everything of this run goes: results (saved after every phase), OUT files, the deadline."""

    def __init__(self, out: Path, deadline_s: float) -> None:
        self.out = out
        self.results = Results()
        self.started = time.monotonic()
        self.deadline = self.started + deadline_s
        self.owned: list[Callable[[], None]] = []  # stop functions of everything still running

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def fits(self, seconds: float, what: str) -> bool:
        """True if ``seconds`` fit before the deadline; else records ``what`` as skipped."""
        if self.remaining() >= seconds:
            return True
        self.results.not_measured.append(f"{what}: skipped, {self.remaining():.0f} s left of the deadline")
        print(f"-- {what}: skipped (deadline)", flush=True)
        return False

    def append(self, name: str, title: str, text: str) -> None:
        """A section in one of the OUT_FILES (a fixed set: at most 8 files come back)."""
        if name not in OUT_FILES:
            raise ValueError(name)
        stamp = f"{time.monotonic() - self.started:7.1f}s"
        with open(self.out / name, "a", encoding="utf-8", errors="replace") as f:
            f.write(f"\n===== [{stamp}] {title}\n{text.rstrip()}\n")

    def save(self) -> None:
        tmp = self.out / "gpu_coldstart.json.tmp"
        tmp.write_text(json.dumps(asdict(self.results), indent=2, default=str))
        tmp.replace(self.out / "gpu_coldstart.json")
        (self.out / "gpu_coldstart.txt").write_text(report(self.results) + "\n")

    def error(self, what: str, exc: BaseException) -> None:
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        self.results.errors.append(f"{what}: {type(exc).__name__}: {line}")
        print(f"!! {what}: {type(exc).__name__}: {line}", flush=True)
        if not isinstance(exc, ColdstartError):
            self.append("diagnostics.txt", f"traceback: {what}", traceback.format_exc())

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        print(f"== phase {name} ({self.remaining():.0f} s left)", flush=True)
        try:
            yield
        except DeadlineReached:
            self.results.errors.append(f"{name}: overall deadline reached; later phases not run")
            raise
        except Exception as exc:  # noqa: BLE001 -- reported; the next phase still runs
            self.error(name, exc)
        finally:
            self.results.phases_done.append(f"{name} {time.monotonic() - t0:.1f}s")
            self.save()


def sh(argv: list[str], timeout: float = 20) -> str:
    """A diagnostic command's output (stdout+stderr), or why it could not run; never raises."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)  # noqa: S603
        return (done.stdout + done.stderr).strip() + (
            "" if done.returncode == 0 else f"\n(exit {done.returncode})"
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"({' '.join(argv)}: {exc})"


def dmesg_tail(lines: int = 40) -> str:
    text = sh(["dmesg", "--ctime"]) if shutil.which("dmesg") else "(no dmesg)"
    rows = text.splitlines()
    xid = [r for r in rows if "NVRM" in r or "Xid" in r]
    return "\n".join(["-- NVRM/Xid lines:", *xid[-20:], f"-- last {lines} lines:", *rows[-lines:]])


def failure_snapshot(run: Run, what: str, pids: list[int], api: CudaCheckpointAPI | None) -> None:
    """What a one-shot run needs to explain a failure: fds, CUDA states, GPU processes, dmesg."""
    parts = []
    for pid in pids:
        parts.append(f"-- pid {pid}: {_cmdline(pid)}")
        with contextlib.suppress(OSError):
            for fd in sorted(Path(f"/proc/{pid}/fd").iterdir(), key=lambda p: int(p.name)):
                with contextlib.suppress(OSError):
                    parts.append(f"   fd {fd.name} -> {os.readlink(fd)}")
        with contextlib.suppress(OSError):
            nv = [ln for ln in Path(f"/proc/{pid}/maps").read_text().splitlines() if "/dev/nvidia" in ln]
            parts += [f"   maps {ln}" for ln in nv[:20]]
        if api is not None:
            try:
                state = api.state(pid)
                parts.append(f"   cuCheckpointProcessGetState: {int(state)} ({state.label})")
            except ColdstartError as exc:
                parts.append(f"   cuCheckpointProcessGetState: {exc}")
    if not FAKE:
        parts.append("-- nvidia-smi:\n" + sh(["nvidia-smi"]))
        parts.append(dmesg_tail())
    run.append("diagnostics.txt", f"failure: {what}", "\n".join(parts))


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "(gone)"


# -- the engine and requests -------------------------------------------------------------------------------


class Engine:
    """One tiny_engine process: owned here (SIGTERM, grace, SIGKILL, reap)."""

    def __init__(self, run: Run, model: Path, workdir: Path, kv_tokens: int, quiet: bool = False) -> None:
        self.run, self.model, self.kv_tokens = run, model, kv_tokens
        self.port = free_port_pair()
        self.control_port = self.port + 1
        self.log_path = workdir / f"engine-{self.port}.log"
        self.quiet = quiet  # CRIU refuses to restore a log file that grew: /dev/null for a dumped engine
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
        argv += [
            "--port",
            str(self.port),
            "--max-cache-len",
            str(self.kv_tokens),
            "--served-model-name",
            "tiny",
        ]
        env = {
            **os.environ,
            **CHILD_ENV,
            "HF_HUB_OFFLINE": "1",
            "COLDSTART_CONTROL_HOST": "127.0.0.1",
            "COLDSTART_CONTROL_PORT": str(self.control_port),
        }
        out = open(os.devnull if self.quiet else self.log_path, "wb")  # noqa: SIM115 -- handed to the child
        self.t_spawn = time.perf_counter()
        self.proc = subprocess.Popen(  # noqa: S603
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        out.close()
        self.pid = self.proc.pid
        self.run.owned.append(self.stop)
        if FAKE:
            host: FakeGpuHost = FAKE["host"]
            host.add_process(self.pid, gpus=[host.gpus[0].uuid], device_bytes=3 << 30)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log: quiet engine)" if self.quiet else "(no log)"

    def wait_healthy(self, timeout_s: float = 240) -> float:
        deadline = time.perf_counter() + timeout_s
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while time.perf_counter() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"engine exited with {self.proc.returncode}: {self.log_tail(3)}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.base_url}/health").status_code == 200:
                        return time.perf_counter()
                time.sleep(0.01)
        raise RuntimeError(f"engine not healthy after {timeout_s:g} s: {self.log_tail(3)}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if not self.quiet and self.log_path.exists():
            self.run.append("engine-logs.txt", f"engine {self.pid} (port {self.port})", self.log_tail())
            self.log_path.unlink()
        with contextlib.suppress(ValueError):
            self.run.owned.remove(self.stop)


def first_token(base_url: str, model: str, timeout_s: float = 120) -> float:
    """Seconds until the first streamed chunk that carries a token: non-empty text, token ids or logprobs.

    Not the first ``data:`` line: an engine may send a role-only chunk first, and one whose ids decode to
    ``""`` sends no content chunk at all (then this raises rather than timing the whole answer)."""
    body = {"model": model, "messages": CHAT, "max_tokens": 8, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    with httpx.Client(timeout=timeout_s, trust_env=False) as client:
        with client.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"chat answered {response.status_code}: {response.read()[:200]!r}")
            lines = response.iter_lines()
            for line in lines:
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                if _carries_token(json.loads(line[5:])):
                    elapsed = time.perf_counter() - t0
                    for _ in lines:  # drain: the engine serves one sequence at a time
                        pass
                    return elapsed
    raise RuntimeError("the stream carried no token (ids that decode to empty text?): first token not timed")


def _carries_token(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        if delta.get("content") or choice.get("text") or choice.get("token_ids"):
            return True
        if (choice.get("logprobs") or {}).get("content"):
            return True
    return False


def canary(base_url: str, model: str, token_ids: bool = True) -> dict[str, Any]:
    """A greedy completion: its token ids where the engine reports them (tiny_engine, vLLM), and its text."""
    body: dict[str, Any] = {"model": model, "prompt": CANARY_PROMPT, "max_tokens": 16, "temperature": 0}
    if token_ids:
        body["return_token_ids"] = True  # vLLM's field; tiny_engine always answers token_ids
    with httpx.Client(timeout=120, trust_env=False) as client:
        response = client.post(f"{base_url}/v1/completions", json=body)
    response.raise_for_status()
    choice = response.json()["choices"][0]
    ids = choice.get("token_ids")
    return {"token_ids": list(ids) if ids is not None else None, "text": str(choice.get("text") or "")}


def same_answer(reference: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    """Compared by token ids when both have them, else by text; an empty answer proves nothing."""
    if reference.get("token_ids") is not None and got.get("token_ids") is not None:
        by, ok = "token_ids", reference["token_ids"] == got["token_ids"] and bool(got["token_ids"])
    else:
        by, ok = "text", reference.get("text") == got.get("text") and bool(got.get("text"))
    vacuous = not (got.get("token_ids") or got.get("text"))
    return {"by": by, "identical": ok and not vacuous, "vacuous": vacuous, "got": got}


def anon_bytes(pid: int) -> int:
    """Anonymous memory of ``pid`` (what a CPU checkpointer writes), from smaps_rollup."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) * 1024
    return 0


def nvml() -> Any:
    return FAKE["host"].nvml if FAKE else None


def gpu_memory(pid: int | None = None) -> dict[str, int]:
    """Device memory used on GPU 0 and by ``pid`` (NVML), in bytes."""
    try:
        inventory = read_inventory(nvml())
        used = {"gpu_used_bytes": inventory.gpus[0].memory_used if inventory.gpus else 0}
        if pid is not None:
            proc = gpu_processes(nvml()).get(pid)
            used["process_bytes"] = proc.used_bytes if proc else 0
        return used
    except (ColdstartError, IndexError):
        return {}


def drop_page_cache() -> bool:
    """Drop the page cache (root, a real kernel); False where that is not possible."""
    with contextlib.suppress(OSError):
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    return False


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


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


# -- phases ------------------------------------------------------------------------------------------------


def preflight(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    """Everything checkable in seconds; returns facts later phases use (gvisor, criu)."""
    from coldstart.launcher.gpu.doctor import gvisor_reason

    facts: dict[str, Any] = {"python": f"{platform.python_version()} {sys.executable}"}
    facts["uname"] = platform.release()
    facts["gvisor"] = gvisor_reason()
    if facts["gvisor"]:
        print(f"!! {facts['gvisor']}", flush=True)
    imports: dict[str, str] = {}
    for name in NEEDED_IMPORTS:
        try:
            module = importlib.import_module(name)
            top = name.split(".")[0]
            imports[name] = str(getattr(module, "__version__", "") or _dist_version(top) or "ok")
        except Exception as exc:  # noqa: BLE001 -- each missing one is reported
            imports[name] = f"MISSING: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    facts["imports"] = imports
    missing = [n for n, v in imports.items() if v.startswith("MISSING")]
    if missing:
        print(f"!! missing imports (carry them as cp312 wheels): {', '.join(missing)}", flush=True)
    core = {"torch", "transformers", "starlette", "uvicorn", "cuda.bindings.driver", "pynvml", "httpx"}
    if core & set(missing):
        run.results.preflight = facts
        raise RuntimeError(f"cannot run without {', '.join(sorted(core & set(missing)))}: fix the carry")
    facts["cuda_bindings"] = _dist_version("cuda-bindings")
    facts["nvidia_ml_py"] = _dist_version("nvidia-ml-py")
    facts["torch"] = _dist_version("torch")
    facts["transformers"] = _dist_version("transformers")
    facts["tools"] = {
        t: shutil.which(t) or "MISSING" for t in ("ip", "nsenter", "unshare", "setsid", "dmesg")
    }
    facts["criu"] = args.criu
    if args.criu:
        facts["criu_version"] = sh([args.criu, "--version"]).splitlines()[0:1]
        check = sh([args.criu, "check"], timeout=60)
        facts["criu_check"] = check.splitlines()[-1] if check else ""
        run.append("criu-logs.txt", f"{args.criu} check", check)
    if not FAKE:
        smi = sh(["nvidia-smi", "-q"], timeout=30)
        keep = [
            ln.strip()
            for ln in smi.splitlines()
            if any(
                k in ln
                for k in (
                    "Driver Version",
                    "CUDA Version",
                    "Product Name",
                    "Persistence Mode",
                    "GPU UUID",
                    "Addressing Mode",
                    "Virtualization Mode",
                )
            )
        ]
        facts["nvidia_smi"] = keep
        run.append("diagnostics.txt", "nvidia-smi -q", smi)
        facts["dev_nvidia"] = sorted(str(p) for p in Path("/dev").glob("nvidia*"))
    run.append(
        "diagnostics.txt",
        "environment",
        json.dumps(
            {
                **facts,
                "uname_a": platform.uname()._asdict(),
                "page_cache_droppable": os.access("/proc/sys/vm/drop_caches", os.W_OK),
            },
            indent=2,
            default=str,
        ),
    )
    return facts


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return ""


def start_driver(run: Run) -> CudaCheckpointAPI:
    """The CUDA API every phase uses. On a GPU: the bounded helper, started now and kept for the whole run
    (its ``cuInit`` keeps the driver initialised the same way for cold boots and restores alike)."""
    api: CudaCheckpointAPI
    if FAKE:
        api = CudaCheckpointAPI(FAKE["host"].driver)
    else:
        helper = HelperCudaAPI(CallBounds(checkpoint_s=120, restore_s=120, unlock_s=30))
        run.owned.append(helper.close)
        helper.start()
        api = helper
    api.require_checkpoint_api()
    inventory = read_inventory(nvml())
    gpu = inventory.gpus[0]
    run.results.env.update(
        gpu=f"{gpu.name} {gpu.uuid}",
        driver=inventory.driver_version,
        cuda_driver_api=api.driver_version(),
        persistence_mode="on" if gpu.persistence_mode else "off (recorded, not changed)",
        driver_initialised_by="coldstart CUDA helper (cuInit) alive for the whole run",
    )
    return api


def cold_boots(run: Run, args: argparse.Namespace, model: Path, workdir: Path, plan: list[str]) -> None:
    """One cold boot per entry of ``plan`` ("warm": page cache as it is; "dropped": dropped first)."""
    for i, cache in enumerate(plan):
        if not run.fits(60, f"cold boot {i + 1}"):
            return
        if cache == "dropped" and not drop_page_cache():
            run.results.not_measured.append("cold boot with the page cache dropped: cannot drop it here")
            continue
        engine = Engine(run, model, workdir, args.kv_tokens)
        try:
            engine.start()
            healthy = engine.wait_healthy()
            ttft = first_token(engine.base_url, "tiny")
            total = time.perf_counter() - engine.t_spawn
            run.results.cold.append(
                {
                    "page_cache": cache,
                    "health_s": healthy - engine.t_spawn,
                    "first_token_s": total,
                    "ttft_s": ttft,
                }
            )
            print(
                f"cold boot {i + 1} ({cache} cache): first token {total:.2f} s "
                f"(healthy {healthy - engine.t_spawn:.2f})"
            )
        finally:
            engine.stop()


def cuda_in_place(
    run: Run, args: argparse.Namespace, api: CudaCheckpointAPI, model: Path, workdir: Path
) -> None:
    engine = Engine(run, model, workdir, args.kv_tokens)
    try:
        engine.start()
        engine.wait_healthy()
        for _ in range(2):
            first_token(engine.base_url, "tiny")
        reference = canary(engine.base_url, "tiny")
        run.results.canary["tiny_engine"] = reference
        gpu_uuid = read_inventory(nvml()).gpus[0].uuid
        pids = [p for p in process_tree(engine.pid) if api.is_cuda_process(p)]
        if pids != [engine.pid]:
            raise RuntimeError(f"expected one CUDA process (the engine {engine.pid}), found {pids}")
        for mode, drop in (("hooks", True), ("no_hooks", False)):
            runs = run.results.modes.setdefault(mode, [])
            for i in range(args.runs):
                if not run.fits(30, f"in place {mode} {i + 1}"):
                    return
                try:
                    cycle = cuda_cycle(
                        run, api, engine, gpu_uuid, drop, explicit=(mode == "hooks" and i == 0)
                    )
                except Exception:
                    failure_snapshot(run, f"in place {mode} {i + 1}", [engine.pid], api)
                    raise
                cycle["canary"] = same_answer(reference, canary(engine.base_url, "tiny"))
                run.results.canary_checks.append({"where": f"in place {mode} {i + 1}", **cycle["canary"]})
                runs.append(cycle)
                run.results.bytes.setdefault(
                    mode, {"device_bytes": cycle["device_bytes"], "anon_bytes": cycle["anon_bytes"]}
                )
                print(
                    f"{mode} {i + 1}: restore -> first token {cycle['restore_to_first_token_s']:.3f} s "
                    f"(restore {cycle['restore_s']:.3f}, unlock {cycle['unlock_s']:.3f}, "
                    f"hooks {cycle['hooks_s']:.3f}, "
                    f"ttft {cycle['ttft_s']:.3f}); checkpoint {cycle['checkpoint_s']:.3f} s, device "
                    f"{cycle['device_bytes'] / 2**30:.2f} GiB, anon {cycle['anon_bytes'] / 2**30:.2f} GiB",
                    flush=True,
                )
    finally:
        engine.stop()


def cuda_cycle(
    run: Run, api: CudaCheckpointAPI, engine: Engine, gpu_uuid: str, drop: bool, explicit: bool
) -> dict[str, Any]:
    from coldstart.snapshot_hooks.client import run_after_restore, run_before_checkpoint

    pid = engine.pid
    cycle: dict[str, Any] = {"gpu_before": gpu_memory(pid)}
    t = time.perf_counter()
    if drop:
        asyncio.run(run_before_checkpoint(engine.control_url, 120))
    cycle["before_hooks_s"] = time.perf_counter() - t
    cycle["device_bytes"] = device_bytes(pid)
    t = time.perf_counter()
    api.lock(pid, 30)
    cycle["lock_s"] = time.perf_counter() - t
    t = time.perf_counter()
    try:
        api.checkpoint(pid)
    except BaseException:
        with contextlib.suppress(ColdstartError):
            api.unlock(pid)  # never leave it locked
        raise
    cycle["checkpoint_s"] = time.perf_counter() - t
    api.expect(pid, CudaProcessState.CHECKPOINTED, "measure")
    cycle["anon_bytes"] = anon_bytes(pid)
    cycle["gpu_at_checkpoint"] = gpu_memory(pid)
    t0 = time.perf_counter()
    restore_by_uuid(run, api, pid, gpu_uuid, explicit)
    cycle["restore_s"] = time.perf_counter() - t0
    t = time.perf_counter()
    api.unlock(pid)
    cycle["unlock_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if drop:
        cycle["after_restore_hooks"] = asyncio.run(run_after_restore(engine.control_url, 120))
    cycle["hooks_s"] = time.perf_counter() - t
    cycle["ttft_s"] = first_token(engine.base_url, "tiny")
    cycle["restore_to_first_token_s"] = time.perf_counter() - t0
    cycle["gpu_after_restore"] = gpu_memory(pid)
    return cycle


def device_bytes(pid: int) -> int:
    proc = gpu_processes(nvml()).get(pid)
    return proc.used_bytes if proc else 0


def restore_by_uuid(run: Run, api: CudaCheckpointAPI, pid: int, gpu_uuid: str, explicit: bool) -> None:
    if not explicit:
        api.restore(pid, {gpu_uuid: gpu_uuid})
        return
    try:
        api.restore(pid, {gpu_uuid: gpu_uuid}, explicit=True)
        run.results.uuid_restore = f"ok: gpuPairs {{{gpu_uuid} -> {gpu_uuid}}} accepted"
    except ColdstartError as exc:
        run.results.uuid_restore = f"explicit gpuPairs refused ({exc}); restored in place without pairs"
        api.restore(pid, None)


def launcher_path(run: Run, args: argparse.Namespace, model: Path, workdir: Path, engine: str) -> None:
    """coldstart itself: cold boot in the CRIU sandbox, snapshot, two replicas restored one by one."""
    try:
        asyncio.run(_launcher_path(run, args, model, workdir, engine))
    except Exception:
        failure_snapshot(run, f"launcher {engine}", [], None)  # nvidia-smi, dmesg/Xid
        raise
    finally:
        for log in sorted(workdir.glob(f"{engine}-*/**/criu*.log")):
            _criu_log(run, log, f"launcher {engine} {log.parent.name}/{log.name}")


async def _launcher_path(run: Run, args: argparse.Namespace, model: Path, workdir: Path, engine: str) -> None:
    from coldstart.engine_adapters.base import EngineConfig
    from coldstart.engine_adapters.registry import get_adapter
    from coldstart.launcher.boot import config_for, wait_healthy
    from coldstart.launcher.checkpointers.base import Checkpointer
    from coldstart.launcher.checkpointers.criu import CriuCheckpointer
    from coldstart.launcher.checkpointers.cuda import CudaCheckpointer
    from coldstart.launcher.snapshots.manager import SnapshotManager
    from coldstart.launcher.snapshots.store import SnapshotStore

    record: dict[str, Any] = {"engine": engine, "restores": []}
    run.results.launcher[engine] = record
    cpu = CriuCheckpointer(args.criu)
    checkpointer: Checkpointer = cpu if FAKE else CudaCheckpointer(cpu)
    record["checkpointer"] = checkpointer.probe().version
    if engine == "tiny_engine":
        adapter = get_adapter("custom")
        device = "cpu" if FAKE else "cuda"
        engine_args = (
            "{python}",
            str(ENGINE_SCRIPT),
            "--model",
            "{model}",
            "--device",
            device,
            "--host",
            "{host}",
            "--port",
            "{port}",
            "--max-cache-len",
            str(args.kv_tokens),
            "--served-model-name",
            "tiny",
        )
        config = EngineConfig(model=str(model), engine_args=engine_args, served_model_name="tiny")
    else:
        adapter = get_adapter("transformers")
        # No --device/--dtype: their defaults (auto) put the model on the GPU in the bf16 it was saved in,
        # and a flag the image's transformers release lacks would fail the boot.
        config = EngineConfig(model=str(model))
    name = config.public_model_name if engine == "tiny_engine" else adapter.upstream_model_name(config)
    ids = engine == "tiny_engine"  # transformers serve refuses unknown fields (422): text there
    manager = SnapshotManager(checkpointer, SnapshotStore(workdir / f"{engine}-store"), adapter, config)
    async with httpx.AsyncClient(trust_env=False, timeout=300) as http:
        # Cold boot -> first token in the same sandbox a restore gets (CRIU: PID + net namespaces).
        sandbox = checkpointer.new_sandbox(workdir / f"{engine}-cold", "cold")
        t0 = time.monotonic()
        try:
            await sandbox.start(adapter.launch_spec(config_for(sandbox, config)))
            await wait_healthy(sandbox, adapter, http, timeout_s=240)
            await asyncio.to_thread(first_token, sandbox.base_url, name)
            record["cold_first_token_s"] = time.monotonic() - t0
            print(
                f"{engine} launcher cold boot -> first token {record['cold_first_token_s']:.2f} s", flush=True
            )
        finally:
            run.append("launcher-log.txt", f"{engine} cold boot sandbox log", sandbox.log_tail(60))
            await sandbox.stop(5.0)
        # Snapshot: boot the original, hooks, CUDA checkpoint, CRIU dump (leave running), stop it.
        t0 = time.monotonic()
        original = await manager.boot_and_snapshot(adapter, config, http, workdir / f"{engine}-orig", "orig")
        try:
            record["boot_and_snapshot_s"] = time.monotonic() - t0
            record["gpu_original_after_snapshot"] = gpu_memory()
            reference = await asyncio.to_thread(canary, original.base_url, name, ids)
            record["canary_reference"] = reference
        finally:
            run.append("launcher-log.txt", f"{engine} original log", original.log_tail(60))
            await original.stop(5.0)
        snap = manager.store.lookup(manager.identity.key)
        if snap is None:
            raise RuntimeError("no snapshot was stored (see launcher-log.txt for snapshot_failed)")
        record["snapshot_bytes"] = snap.total_bytes
        record["snapshot_cuda_json"] = _read_json(snap.image_dir / "cuda.json")
        print(f"{engine} snapshot {snap.total_bytes / 2**30:.2f} GiB", flush=True)
        # Two replicas one after the other (the same greedy token ids), then one with the page cache
        # dropped (the snapshot read from disk, as on a host that did not just write it).
        plan = ["warm", "warm"] + ([] if FAKE or engine != "tiny_engine" else ["dropped"])
        for i, cache in enumerate(plan):
            if not run.fits(40, f"{engine} launcher restore {i + 1} ({cache} page cache)"):
                return
            if cache == "dropped" and not drop_page_cache():
                run.results.not_measured.append(
                    "launcher restore with the page cache dropped: cannot drop it"
                )
                continue
            gpu_before = gpu_memory()
            t0 = time.monotonic()
            replica = f"r{i}"
            restored = await manager.restore(adapter, config, http, workdir / f"{engine}-{replica}", replica)
            try:
                restored_s = time.monotonic() - t0
                ttft = await asyncio.to_thread(first_token, restored.base_url, name)
                total = time.monotonic() - t0
                answer = await asyncio.to_thread(canary, restored.base_url, name, ids)
                check = same_answer(reference, answer)
                run.results.canary_checks.append({"where": f"launcher {engine} replica {i + 1}", **check})
                timings = _manager_timings(manager, replica)
                cuda_timings = dict(getattr(checkpointer, "last_timings", {}) or {})
                record["restores"].append(
                    {
                        "restore_to_first_token_s": total,
                        "restore_s": restored_s,
                        "ttft_s": ttft,
                        "phases": timings,
                        "cuda_phases": cuda_timings,
                        "gpu_before": gpu_before,
                        "gpu_after_restore": gpu_memory(),
                        "canary": check,
                        "page_cache": cache,
                    }
                )
                print(
                    f"{engine} launcher restore {i + 1}: first token {total:.3f} s, phases "
                    f"{ {k: round(v, 3) for k, v in {**timings, **cuda_timings}.items()} }, same ids: "
                    f"{check['identical']} (by {check['by']})",
                    flush=True,
                )
            finally:
                run.append("launcher-log.txt", f"{engine} replica {i + 1} log", restored.log_tail(60))
                await restored.stop(5.0)


def _manager_timings(manager: Any, replica: str) -> dict[str, float]:
    by_replica = getattr(manager, "restore_timings", None)
    if isinstance(by_replica, dict) and replica in by_replica:
        return dict(by_replica[replica])
    return dict(getattr(manager, "last_timings", {}) or {})


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def criu_path(run: Run, args: argparse.Namespace, api: CudaCheckpointAPI, model: Path, workdir: Path) -> None:
    """Bare criu dump after the CUDA checkpoint (no hooks: the image holds weights and KV cache), then
    criu restore -> CUDA restore by UUID -> unlock -> first token, page cache warm and dropped."""
    from coldstart.launcher.checkpointers.cuda import NO_PLUGINS_DIR, device_handles

    set_child_subreaper()
    NO_PLUGINS_DIR.mkdir(parents=True, exist_ok=True)
    criu = [args.criu, "--libdir", str(NO_PLUGINS_DIR)]  # on purpose without CRIU's CUDA plugin
    image = workdir / "criu-image"
    image.mkdir()
    engine = Engine(run, model, workdir, args.kv_tokens, quiet=True)
    runs = run.results.modes.setdefault("criu", [])
    try:
        engine.start()
        engine.wait_healthy()
        first_token(engine.base_url, "tiny")
        reference = run.results.canary.get("tiny_engine") or canary(engine.base_url, "tiny")
        gpu_uuid = read_inventory(nvml()).gpus[0].uuid
        api.lock(engine.pid, 30)
        api.checkpoint(engine.pid)
        # The launcher refuses to dump a tree that still holds /dev/nvidia* (named in its error); here the
        # handles are only recorded, and CRIU is left to say what it makes of them.
        held = device_handles(process_tree(engine.pid))
        run.results.bytes["device_files_after_cuda_checkpoint"] = {"count": len(held)}
        if held:
            run.append("diagnostics.txt", "device files held after the CUDA checkpoint", "\n".join(held))
        t = time.perf_counter()
        dump = subprocess.run(  # noqa: S603
            [*criu, "dump", "-t", str(engine.pid), "-D", str(image), "-o", "dump.log", "-v4"],
            capture_output=True,
            text=True,
            timeout=min(180, max(10, run.remaining() - 30)),
        )
        dump_s = time.perf_counter() - t
        _criu_log(run, image / "dump.log", "criu dump")
        if dump.returncode != 0:
            failure_snapshot(run, "criu dump", [engine.pid], api)
            api.restore(engine.pid)
            api.unlock(engine.pid)
            raise RuntimeError(f"criu dump failed ({dump.returncode}): {_errors(image / 'dump.log')}")
        if engine.proc is not None:
            engine.proc.wait(30)  # criu ended it after the dump
        image_bytes = dir_bytes(image)
        run.results.bytes["criu_image_no_hooks"] = {"image_bytes": image_bytes}
        print(f"criu dump {dump_s:.2f} s, image (no hooks) {image_bytes / 2**30:.2f} GiB", flush=True)
        for i, cache in enumerate(["warm"] * args.runs + ([] if FAKE else ["dropped"])):
            if not run.fits(40, f"criu restore {i + 1}"):
                return
            if cache == "dropped" and not drop_page_cache():
                run.results.not_measured.append(
                    "criu restore with the page cache dropped: cannot drop it here"
                )
                continue
            runs.append(criu_restore_once(run, criu, api, image, engine, gpu_uuid, reference, i, cache))
    finally:
        engine.stop()


def criu_restore_once(
    run: Run,
    criu: list[str],
    api: CudaCheckpointAPI,
    image: Path,
    engine: Engine,
    gpu_uuid: str,
    reference: dict[str, Any],
    i: int,
    cache: str,
) -> dict[str, Any]:
    pidfile = image / f"restored-{i}.pid"
    t0 = time.perf_counter()
    restore = subprocess.run(  # noqa: S603
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
            "-v4",
        ],
        capture_output=True,
        text=True,
        timeout=min(120, max(10, run.remaining() - 20)),
    )
    _criu_log(run, image / f"restore-{i}.log", f"criu restore {i + 1}")
    if restore.returncode != 0:
        raise RuntimeError(f"criu restore failed: {_errors(image / f'restore-{i}.log')}")
    criu_s = time.perf_counter() - t0
    pid = int(pidfile.read_text())
    try:
        state = api.state(pid)
        t = time.perf_counter()
        if state is CudaProcessState.CHECKPOINTED:
            restore_by_uuid(run, api, pid, gpu_uuid, explicit=(i == 0))
        else:  # CRIU's CUDA plugin ran after all, or the dump missed the CUDA state
            raise RuntimeError(f"after criu restore the CUDA state is {state.label}, not checkpointed")
        cuda_restore_s = time.perf_counter() - t
        t = time.perf_counter()
        api.unlock(pid)
        unlock_s = time.perf_counter() - t
        ttft = first_token(engine.base_url, "tiny")
        total = time.perf_counter() - t0
        check = same_answer(reference, canary(engine.base_url, "tiny"))
        run.results.canary_checks.append({"where": f"criu restore {i + 1}", **check})
        print(
            f"criu {i + 1} ({cache} cache): restore -> first token {total:.3f} s (criu {criu_s:.3f}, "
            f"cuda restore {cuda_restore_s:.3f}, unlock {unlock_s:.3f})",
            flush=True,
        )
        return {
            "page_cache": cache,
            "criu_restore_s": criu_s,
            "cuda_restore_s": cuda_restore_s,
            "unlock_s": unlock_s,
            "ttft_s": ttft,
            "restore_to_first_token_s": total,
            "cuda_state_after_criu": state.label,
            "canary": check,
            "gpu_after_restore": gpu_memory(pid),
        }
    except Exception:
        failure_snapshot(run, f"criu restore {i + 1}", [pid], api)
        raise
    finally:
        kill_and_reap(pid)
        if FAKE:  # the simulated driver keeps the pid: as the image, it is CHECKPOINTED again
            from coldstart.launcher.gpu.fake import CUprocessState

            FAKE["host"].processes[pid].state = CUprocessState.CU_PROCESS_STATE_CHECKPOINTED


def _criu_log(run: Run, path: Path, title: str) -> None:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return
    errors = [ln for ln in lines if "Error" in ln or "Warn" in ln]
    run.append("criu-logs.txt", f"{title}: Error/Warn lines", "\n".join(errors[-60:]) or "(none)")
    run.append("criu-logs.txt", f"{title}: last 40 lines", "\n".join(lines[-40:]))


def _errors(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if "Error" in ln]
    except OSError:
        return "(no log)"
    return " | ".join(lines[-3:]) or "(no Error line)"


# -- report ------------------------------------------------------------------------------------------------


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def report(results: Results) -> str:
    warm_cold = [r["first_token_s"] for r in results.cold if r.get("page_cache") == "warm"]
    cold = median(warm_cold)
    env = results.env
    lines = ["SIMULATED DRIVER (--fake-gpu): a plumbing check on CPU, not a measurement"] if FAKE else []
    lines.append(
        f"GPU: {env.get('gpu')}  driver {env.get('driver')}  CUDA API {env.get('cuda_driver_api')}  "
        f"persistence {env.get('persistence_mode')}"
    )
    pre = results.preflight
    lines.append(
        f"kernel {pre.get('uname')}  gVisor: {pre.get('gvisor') or 'no'}  torch {pre.get('torch')}  "
        f"transformers {pre.get('transformers')}  cuda-bindings {pre.get('cuda_bindings')}  "
        f"criu check: {pre.get('criu_check', 'not run')}"
    )
    lines.append(
        f"model: Qwen3-0.6B architecture, random bf16; KV cache {env.get('kv_tokens')} tokens "
        f"({env.get('kv_bytes', 0) / 2**30:.2f} GiB); driver kept initialised by: "
        f"{env.get('driver_initialised_by', '-')}"
    )
    lines.append("")
    lines.append(
        f"| {'path (to the first streamed token)':<62} | {'median s':>9} | {'runs':>4} "
        f"| {'vs cold boot':>12} |"
    )
    lines.append(f"|{'-' * 64}|{'-' * 11}|{'-' * 6}|{'-' * 14}|")

    def row(label: str, values: list[float], ratio: bool = True, base: float | None = None) -> None:
        m = median(values)
        if m is None:
            lines.append(f"| {label:<62} | {'-':>9} | {0:>4} | {'not measured':>12} |")
            return
        base = base or cold
        text = (
            "1.0x"
            if label.startswith("cold boot, page cache warm")
            else (f"{base / m:.1f}x faster" if ratio and base and m else "")
        )
        lines.append(f"| {label:<62} | {m:>9.3f} | {len(values):>4} | {text:>12} |")

    row("cold boot, page cache warm (tiny_engine)", warm_cold)
    row(
        "cold boot, page cache dropped",
        [r["first_token_s"] for r in results.cold if r.get("page_cache") == "dropped"],
        False,
    )
    for engine, rec in results.launcher.items():
        if "cold_first_token_s" in rec:
            row(f"coldstart {engine}: cold boot in the CRIU sandbox", [rec["cold_first_token_s"]], False)
        rs = rec.get("restores", [])
        # Against the same engine's cold boot in the same sandbox (the tiny_engine host boot otherwise).
        row(
            f"coldstart {engine}: restore, page cache warm",
            [r["restore_to_first_token_s"] for r in rs if r.get("page_cache") == "warm"],
            base=rec.get("cold_first_token_s"),
        )
        row(
            f"coldstart {engine}: restore, page cache dropped",
            [r["restore_to_first_token_s"] for r in rs if r.get("page_cache") == "dropped"],
            base=rec.get("cold_first_token_s"),
        )
        warm = [r for r in rs if r.get("page_cache") == "warm"]
        for key in ("verify", "restore", "canary"):
            vals = [r["phases"][key] for r in warm if key in r.get("phases", {})]
            if vals:
                row(f"  of which launcher {key}", vals, False)
        for key in ("cpu_restore", "cuda_restore", "cuda_unlock"):
            vals = [r["cuda_phases"][key] for r in warm if key in r.get("cuda_phases", {})]
            if vals:
                row(f"  of which {key}", vals, False)
    hooks, plain, criu = (results.modes.get(k, []) for k in ("hooks", "no_hooks", "criu"))
    row("CUDA restore in place + hooks (KV dropped)", [r["restore_to_first_token_s"] for r in hooks])
    row("  of which cuCheckpointProcessRestore", [r["restore_s"] for r in hooks], False)
    row("  of which after-restore hooks (KV, weights back)", [r["hooks_s"] for r in hooks], False)
    row("CUDA restore in place, no hooks (KV kept)", [r["restore_to_first_token_s"] for r in plain])
    row(
        "bare CRIU + CUDA restore by UUID, no hooks, cache warm",
        [r["restore_to_first_token_s"] for r in criu if r["page_cache"] == "warm"],
    )
    row(
        "bare CRIU + CUDA restore, no hooks, cache dropped",
        [r["restore_to_first_token_s"] for r in criu if r["page_cache"] == "dropped"],
    )
    row("checkpoint (lock + checkpoint), hooks", [r["lock_s"] + r["checkpoint_s"] for r in hooks], False)
    row("checkpoint (lock + checkpoint), no hooks", [r["lock_s"] + r["checkpoint_s"] for r in plain], False)
    lines.append("")
    lines.append(f"| {'snapshot bytes':<62} | {'GiB':>9} |")
    lines.append(f"|{'-' * 64}|{'-' * 11}|")
    for engine, rec in results.launcher.items():
        if "snapshot_bytes" in rec:
            lines.append(
                f"| {'coldstart ' + engine + ' snapshot (engine hooks, if any)':<62} "
                f"| {rec['snapshot_bytes'] / 2**30:>9.2f} |"
            )
    for mode, label in (
        ("hooks", "device bytes copied by the CUDA checkpoint, hooks"),
        ("no_hooks", "device bytes copied by the CUDA checkpoint, no hooks"),
    ):
        b = results.bytes.get(mode)
        lines.append(f"| {label:<62} | {b['device_bytes'] / 2**30 if b else float('nan'):>9.2f} |")
    if "criu_image_no_hooks" in results.bytes:
        lines.append(
            f"| {'bare CRIU image, no hooks (weights + KV cache inside)':<62} | "
            f"{results.bytes['criu_image_no_hooks']['image_bytes'] / 2**30:>9.2f} |"
        )
    if env.get("weights_bytes"):
        lines.append(f"| {'model weights (safetensors)':<62} | {env['weights_bytes'] / 2**30:>9.2f} |")
    lines.append("")
    lines.append(
        f"| {'GPU memory of the engine (NVML), GiB':<62} | {'before':>7} | {'at ckpt':>7} | {'after':>7} |"
    )
    lines.append(f"|{'-' * 64}|{'-' * 9}|{'-' * 9}|{'-' * 9}|")
    for mode, label in (("hooks", "in place, hooks"), ("no_hooks", "in place, no hooks")):
        cycles = results.modes.get(mode) or [{}]
        c = cycles[-1]
        cells = [
            c.get(k, {}).get("process_bytes")
            for k in ("gpu_before", "gpu_at_checkpoint", "gpu_after_restore")
        ]
        text = " | ".join(f"{v / 2**30:>7.2f}" if isinstance(v, int) else f"{'-':>7}" for v in cells)
        lines.append(f"| {label:<62} | {text} |")
    lines += ["", *goals(results)]
    lines.append("")
    checks = results.canary_checks
    good = sum(1 for c in checks if c.get("identical"))
    lines.append(
        f"greedy answers identical after restore: {good}/{len(checks)} "
        f"(compared by: {sorted({c.get('by') for c in checks}) or '-'}; vacuous: "
        f"{sum(1 for c in checks if c.get('vacuous'))})"
    )
    lines.append(f"restore by GPU UUID: {results.uuid_restore}")
    lines.append(f"phases: {', '.join(results.phases_done)}")
    for item in results.not_measured:
        lines.append(f"not measured: {item}")
    for item in results.errors:
        lines.append(f"error: {item}")
    return "\n".join(lines)


def goals(results: Results) -> list[str]:
    """The issue's goals, checked on coldstart's own restore of the example engine (hooks on)."""
    rec = results.launcher.get("tiny_engine", {})
    restores = [
        r["restore_to_first_token_s"] for r in rec.get("restores", []) if r.get("page_cache") == "warm"
    ]
    restore = median(restores)
    cold = rec.get("cold_first_token_s")
    weights = results.env.get("weights_bytes")
    size = rec.get("snapshot_bytes")
    out = ["goals (coldstart restore of tiny_engine with hooks):"]
    if restore is None or not cold:
        return [*out, "  not measured"]
    out.append(
        f"  restore -> first token >= 10x faster than cold boot: {cold / restore:.1f}x "
        f"({'met' if cold / restore >= 10 else 'NOT met'})"
    )
    out.append(
        f"  restore -> first token <= 2.0 s: {restore:.2f} s ({'met' if restore <= 2.0 else 'NOT met'})"
    )
    if weights and size:
        limit = weights + 0.5e9
        out.append(
            f"  snapshot <= weights + 0.5 GB: {size / 1e9:.2f} GB vs {limit / 1e9:.2f} GB "
            f"({'met' if size <= limit else 'NOT met'})"
        )
    return out


# -- main --------------------------------------------------------------------------------------------------


PHASES = ("preflight", "cold", "inplace", "launcher", "criu")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument(
        "--deadline-s", type=float, default=280, help="stop starting work after this; results kept"
    )
    p.add_argument("--runs", type=int, default=3, help="restores per path")
    p.add_argument("--cold-runs", type=int, default=2, help="cold boots with a warm page cache")
    p.add_argument("--kv-tokens", type=int, default=32768, help="static KV cache length of the engine")
    p.add_argument("--model", type=Path, default=None, help="model folder (made if absent)")
    p.add_argument(
        "--criu", default="auto", help="criu >= 4.2: auto (.carry/criu/criu, then PATH) | none | PATH"
    )
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    p.add_argument(
        "--engines",
        default=None,
        help="launcher phase engines (tiny_engine,transformers; --fake-gpu: tiny_engine)",
    )
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    p.add_argument("--fake-gpu", action="store_true", help="plumbing check without a GPU: tiny model on CPU")
    args = p.parse_args(argv)
    phases = [x for x in args.phases.split(",") if x]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        p.error(f"unknown phases {unknown}: valid are {', '.join(PHASES)}")
    resolve_criu(args)
    if args.fake_gpu:
        FAKE["host"] = FakeGpuHost.with_gpus("NVIDIA H100 (simulated)", driver_version="580.159.04")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in (*OUT_FILES, "gpu_coldstart.json", "gpu_coldstart.txt"):
        (args.out / name).unlink(missing_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(message)s",
        filename=str(args.out / "launcher-log.txt"),
    )
    run = Run(args.out, args.deadline_s)

    def on_alarm(signum: int, frame: Any) -> None:
        raise DeadlineReached()

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(args.deadline_s) + 1)
    workdir = Path(tempfile.mkdtemp(prefix="gpu-coldstart-", dir=SCRATCH))
    try:
        run_all(run, args, phases, workdir)
    except DeadlineReached:
        print("!! overall deadline reached: stopping, results so far are saved", flush=True)
    finally:
        signal.alarm(0)
        for stop in reversed(list(run.owned)):
            with contextlib.suppress(Exception):
                stop()
        run.save()
        print("\n" + report(run.results), flush=True)
        shutil.rmtree(workdir, ignore_errors=True)
    r = run.results
    measured = r.cold and (r.modes.get("hooks") or any(x.get("restores") for x in r.launcher.values()))
    return 0 if measured and not r.errors else 1


def resolve_criu(args: argparse.Namespace) -> None:
    if args.criu == "auto":
        carried = REPO / ".carry" / "criu" / "criu"
        args.criu = str(carried) if carried.exists() else shutil.which("criu")
    elif args.criu == "none":
        args.criu = None
    carried_bin = REPO / ".carry" / "bin"
    if carried_bin.is_dir():  # tools the device image may lack (ip), found after the system's own
        os.environ["PATH"] = f"{os.environ.get('PATH', '')}{os.pathsep}{carried_bin}"


def run_all(run: Run, args: argparse.Namespace, phases: list[str], workdir: Path) -> None:
    res = run.results
    api: CudaCheckpointAPI | None = None
    with run.phase("preflight"):
        res.preflight = preflight(run, args)
        api = start_driver(run)
    if api is None:
        res.not_measured.append(
            "everything on the GPU: no usable NVIDIA GPU or CUDA checkpoint API (see errors)"
        )
        return
    from coldstart.launcher.tiny_model import SIZES, make_model

    size = "tiny" if FAKE else "qwen3-0.6b"
    shape = SIZES[size]
    res.env.update(kv_tokens=args.kv_tokens, model_size=size)
    res.env["kv_bytes"] = (
        2
        * int(shape["num_hidden_layers"])
        * int(shape["num_key_value_heads"])
        * int(  # type: ignore[call-overload]
            shape.get("head_dim") or int(shape["hidden_size"]) // int(shape["num_attention_heads"])  # type: ignore[call-overload]
        )
        * args.kv_tokens
        * 2
    )
    model: Path | None = None
    with run.phase("model"):
        t = time.perf_counter()
        model = make_model(args.model or workdir / size, size)
        res.env["model_make_s"] = round(time.perf_counter() - t, 1)
        res.env["weights_bytes"] = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        print(f"model ready in {res.env['model_make_s']} s: {model}", flush=True)
    if model is None:
        return
    gvisor = res.preflight.get("gvisor")
    if "cold" in phases:
        with run.phase("cold"):
            cold_boots(run, args, model, workdir, ["warm"] * args.cold_runs)
    if "inplace" in phases and run.fits(60, "CUDA in place"):
        with run.phase("inplace"):
            cuda_in_place(run, args, api, model, workdir)
    criu_ok = bool(args.criu) and not gvisor
    if not criu_ok:
        why = gvisor or "no criu (none carried in .carry/criu, none on PATH)"
        res.not_measured.append(f"launcher and bare CRIU paths: {why}")
    if "launcher" in phases and criu_ok:
        default = "tiny_engine" if FAKE else "tiny_engine,transformers"
        engines = [e for e in (args.engines or default).split(",") if e]
        for engine in engines:
            if run.fits(90, f"launcher path {engine}"):
                with run.phase(f"launcher {engine}"):
                    launcher_path(run, args, model, workdir, engine)
    if "criu" in phases and criu_ok and run.fits(60, "bare CRIU path"):
        with run.phase("criu"):
            criu_path(run, args, api, model, workdir)
    if "cold" in phases and not FAKE:  # last: it empties the page cache every later step would use
        with run.phase("cold, page cache dropped"):
            cold_boots(run, args, model, workdir, ["dropped"])


if __name__ == "__main__":
    sys.exit(main())
