"""Cold boot vs restore, to the first streamed token, for each CPU checkpointer.

    .venv/bin/python bench/startup.py [--size qwen3-0.6b] [--runs 5] [--checkpointers criu,runsc]
    .venv/bin/python bench/startup.py --engine vllm --vllm-config lean|default [--size tiny] [--runs 3]
    .venv/bin/python bench/startup.py --gateway [--gateway-image] [--checkpointers ''] [--drop-caches]

Engine: ``transformers serve`` (default) with a Qwen3-0.6B-shaped model with random bf16 weights made
locally (``coldstart make-model``; a realistic CPU cold boot: importing torch + transformers, loading
1.2 GB), or the real vLLM (``--engine vllm``, from the set-up's venv; checkpointer CRIU) in its lean
configuration (``VLLM_ENABLE_V1_MULTIPROCESSING=0 --distributed-executor-backend uni
--kv-cache-memory-bytes 64 MiB``: API server + engine core) or its default multiprocess one (API server,
engine core, worker, shared-memory rings), both with ``--max-model-len 512`` and a 64 MiB KV cache
(128 MiB for the Qwen3-0.6B shape, whose 512 tokens need ~59 MB).
The table adds the engine tree's memory after warm-up (sum of PSS over its processes, and of RSS).
Every number is the median of ``--runs`` runs in this one process, each on a fresh replica, and is the time
from "start" to the first non-empty content chunk of a streamed greedy chat completion (time to first
token: decoding 8 tokens on CPU takes ~1 s and would hide the restore):

- host cold boot:  ``transformers serve`` as a plain host process (``PlainSandbox``), the baseline;
- sandbox cold boot: the same inside the checkpointer's sandbox (CRIU: PID+net namespaces; runsc: gVisor);
- launcher restore: ``SnapshotManager.restore`` -- lookup, gate, model-file and image digests (stat
  cache), restore into fresh namespaces, health, after-restore hook, canary -- then the request;
- bare restore: the tool alone on the same image (``criu restore`` / ``runsc create`` + ``runsc restore``
  into a namespace made beforehand), health polled the same way, then the request.

``--restore-path`` adds the step of every replica start that issue 18 took off processes: making the
replica's network namespace and veth pair, with ``ip`` processes (before) and through netlink (now), from
``bench/netns.py`` (as root).

``--gateway`` adds the end-to-end clock as a user meets it (``bench/gateway_clock.py``): ``coldstart-serve
--snapshot criu`` (with ``--gateway-image``: the model from a lazily mounted image of it, empty chunk cache)
boots and snapshots once, scales to zero, and each run is one streamed request sent at zero replicas; its
phases are read back from the launcher's ``/metrics`` (image mount, pull, verify, restore, wake, canary, and
the proxy's arrival -> first token), beside the client's own request -> first token.

Floor: snapshot bytes / read bandwidth, the bandwidth measured in this run by reading the snapshot's files
(warm page cache, as every restore here reads them). Goals (issue 3): restore >= 15x faster than cold boot,
launcher <= 0.1 s over the bare restore.
"""

from __future__ import annotations

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Awaitable, Callable, Iterator  # noqa: E402
from pathlib import Path

import gateway_clock  # noqa: E402
import httpx  # noqa: E402
import netns as namespace_bench  # bench/netns.py  # noqa: E402

from coldstart.engine_adapters.base import EngineAdapter, EngineConfig  # noqa: E402
from coldstart.engine_adapters.registry import get_adapter  # noqa: E402
from coldstart.engine_adapters.vllm import LEAN_CPU_ARGS, LEAN_CPU_ENV  # noqa: E402
from coldstart.launcher.boot import config_for, wait_healthy  # noqa: E402
from coldstart.launcher.checkpointers import criu_init, runsc_rootns_quirk  # noqa: E402
from coldstart.launcher.checkpointers._pipes import OwnedPipe, exec_into, kill_quietly, run_quiet, wait_exit  # noqa: E402
from coldstart.launcher.checkpointers.base import Checkpointer  # noqa: E402
from coldstart.launcher.checkpointers.criu import RESTORE_FLAGS  # noqa: E402
from coldstart.launcher.checkpointers.registry import get_checkpointer  # noqa: E402
from coldstart.launcher.errors import ColdstartError  # noqa: E402
from coldstart.launcher.sandboxes.base import Sandbox  # noqa: E402
from coldstart.launcher.sandboxes.netns import create_netns  # noqa: E402
from coldstart.launcher.sandboxes.plain import PlainSandbox  # noqa: E402
from coldstart.launcher.snapshots.manager import SnapshotManager  # noqa: E402
from coldstart.launcher.snapshots.store import SnapshotStore  # noqa: E402
from coldstart.launcher.tiny_model import make_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
POLL_S = 0.01
PROMPT = [{"role": "user", "content": "Tell me about snapshots."}]


async def first_token(http: httpx.AsyncClient, base_url: str, model: str) -> None:
    """Until the first chunk after the role chunk: the first token's content, or (max_tokens=1) the
    finish chunk that follows it. Tokens of the random Qwen3-0.6B-shaped model mostly fall outside its
    small local tokenizer and stream as empty content, which ``transformers serve`` does not send."""
    body = {"model": model, "messages": PROMPT, "max_tokens": 1, "temperature": 0, "stream": True}
    async with http.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=300) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = (json.loads(line[6:]).get("choices") or [{}])[0]
            if choice.get("delta", {}).get("content") or choice.get("finish_reason"):
                return
    raise RuntimeError("stream ended without a token")


async def poll_health(
    http: httpx.AsyncClient, base_url: str, alive: Callable[[], bool], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("engine exited")
        try:
            if (await http.get(f"{base_url}/health", timeout=2)).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(POLL_S)
    raise TimeoutError("not healthy")


VLLM_CONFIGS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "lean": (LEAN_CPU_ARGS, LEAN_CPU_ENV),
    "default": (("--max-model-len", "512", "--kv-cache-memory-bytes", "67108864"), {}),
}


def tree_memory(pids: list[int]) -> tuple[int, int]:
    """(sum of PSS, sum of RSS) in bytes over ``pids`` (PSS counts shared pages once in total)."""
    pss = rss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                elif line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return pss, rss


async def cold_boot_ttft(
    sandbox: Sandbox, adapter: EngineAdapter, config: EngineConfig, http: httpx.AsyncClient, model: str
) -> float:
    started = time.monotonic()
    try:
        spec = adapter.launch_spec(config_for(sandbox, config))
        await sandbox.start(dataclasses.replace(spec, env={**spec.env, **config.env}))
        try:
            await wait_healthy(sandbox, adapter, http, timeout_s=600)
        except ColdstartError:
            errors = [ln for ln in sandbox.log_tail(2000).splitlines() if "Error" in ln or "error" in ln]
            print("\n".join(errors[:40]), file=sys.stderr)
            raise
        await first_token(http, sandbox.base_url, model)
        return time.monotonic() - started
    finally:
        await sandbox.stop(5.0)


async def bare_criu(
    image: Path, criu: str, work: Path, http: httpx.AsyncClient, model: str, resume: bool = False
) -> float:
    """Seconds to the first token; seconds to healthy go to ``bare_healthy``. ``resume``: the engine was
    paused for the dump (vLLM on CPU): ``POST /resume`` first, as anyone restoring it must."""
    sidecar = json.loads((image / "coldstart-criu.json").read_text())
    ns = await create_netns()
    pipe = OwnedPipe("bare criu")
    images = work / "images"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True)
    for item in image.iterdir():
        (images / item.name).symlink_to(item.resolve())
    inherit = [a for p in sidecar["pipes"] for a in ("--inherit-fd", f"fd[{pipe.write_fd}]:{p}")]
    pidfile = work / "pid"
    pidfile.unlink(missing_ok=True)
    Path(criu_init.PRIVATE_TMPDIR).mkdir(parents=True, exist_ok=True)
    argv = [
        *ns.enter_argv(),
        criu,
        "restore",
        "-D",
        str(images),
        *RESTORE_FLAGS,
        "--pidfile",
        str(pidfile),
        *inherit,
    ]
    proc = None
    try:
        started = time.monotonic()
        proc = await exec_into(argv, pipe, extra_fds=[pipe.write_fd])
        await pipe.start_reading()
        url = f"http://{ns.guest_ip}:{sidecar['port']}"
        await poll_health(http, url, lambda: proc.returncode is None, 120)
        bare_healthy.append(time.monotonic() - started)
        if resume:
            (await http.post(f"{url}/resume")).raise_for_status()
        await first_token(http, url, model)
        return time.monotonic() - started
    finally:
        if pidfile.exists():
            kill_quietly(int(pidfile.read_text()), 9)
        if proc is not None and not await wait_exit(proc, 10):
            kill_quietly(proc.pid, 9)
            await proc.wait()
        await pipe.close()
        await ns.adelete()


async def bare_runsc(
    image: Path, runsc: str, work: Path, http: httpx.AsyncClient, model: str, n: int, resume: bool = False
) -> float:
    sidecar = json.loads((image / "coldstart-runsc.json").read_text())
    flags = sidecar["global_flags"]
    ns = await create_netns()
    config = json.loads(json.dumps(sidecar["config"]))
    for item in config["linux"]["namespaces"]:
        if item["type"] == "network":
            item["path"] = ns.path
    bundle = work / f"bundle{n}"
    bundle.mkdir(parents=True, exist_ok=True)
    (bundle / "config.json").write_text(json.dumps(config))
    cid = f"bench-{os.getpid()}-{n}"
    pipe = OwnedPipe("bare runsc")
    proc = None
    try:
        started = time.monotonic()
        create = await exec_into(
            runsc_rootns_quirk.wrap([runsc, *flags, "create", "--bundle", str(bundle), cid]), pipe
        )
        if await create.wait() != 0:
            raise RuntimeError("runsc create failed")
        restore = runsc_rootns_quirk.wrap([runsc, *flags, "restore", "--image-path", str(image), cid])
        proc = await exec_into(restore, pipe)
        await pipe.start_reading()
        url = f"http://{ns.guest_ip}:8000"
        await poll_health(http, url, lambda: proc.returncode is None, 120)
        bare_healthy.append(time.monotonic() - started)
        if resume:  # paused for the dump (vLLM on CPU), as in bare_criu
            (await http.post(f"{url}/resume")).raise_for_status()
        await first_token(http, url, model)
        return time.monotonic() - started
    finally:
        await run_quiet([runsc, *flags, "kill", cid, "KILL"], 30)
        if proc is not None and not await wait_exit(proc, 10):
            kill_quietly(proc.pid, 9)
            await proc.wait()
        await run_quiet([runsc, *flags, "delete", "-force", cid], 30)
        await pipe.close()
        await ns.adelete()


def read_bandwidth(files: list[Path]) -> float:
    """Bytes/s reading ``files`` (warm page cache: read once to warm, then timed)."""
    buf = bytearray(8 << 20)
    total, best = 0, float("inf")
    for _ in range(2):
        started, total = time.monotonic(), 0
        for file in files:
            with open(file, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    total += n
        best = min(best, time.monotonic() - started)
    return total / best


failures: list[str] = []  # runs that failed and were run again (printed under the table)


async def repeat(what: str, runs: int, once: Callable[[int], Awaitable[float]]) -> list[float]:
    times = []
    for i in range(runs):
        try:
            t = await once(i)
        except (ColdstartError, OSError) as exc:  # counted and said, never hidden: run it once more
            failures.append(f"{what} #{i + 1}: {str(exc).splitlines()[0]}")
            print(f"  {what} #{i + 1} FAILED, running it again: {exc}", file=sys.stderr, flush=True)
            t = await once(i)
        times.append(t)
        print(f"  {what} #{i + 1}: {t:.3f}s", file=sys.stderr, flush=True)
    return times


async def bench(args: argparse.Namespace) -> list[dict[str, object]]:
    model_dir = make_model(REPO / ".cache" / "models" / args.size, args.size)
    adapter = get_adapter(args.engine)
    if args.engine == "vllm":
        engine_args, env = VLLM_CONFIGS[args.vllm_config]
        if args.size == "qwen3-0.6b":  # 512 tokens of its KV cache need ~59 MB: give it 128 MiB
            engine_args = tuple("134217728" if a == "67108864" else a for a in engine_args)
        config = EngineConfig(model=str(model_dir), engine_args=engine_args, env=env)
    else:
        config = EngineConfig(model=str(model_dir))
    model = adapter.upstream_model_name(config)
    results: list[dict[str, object]] = []
    work = Path(tempfile.mkdtemp(prefix="coldstart-bench-"))
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=300) as http:
            print("host cold boot (PlainSandbox)", file=sys.stderr)
            host = await repeat(
                "host cold boot", args.cold_runs,
                lambda i: cold_boot_ttft(PlainSandbox(f"bench{i}"), adapter, config, http, model),
            )  # fmt: skip
            results.append({"name": "host (no snapshot)", "cold": host})
            for name in args.checkpointers:
                checkpointer = get_checkpointer(name)
                info = checkpointer.probe()
                print(f"{name} {info.version}", file=sys.stderr)

                def sandbox_cold(i: int, c: Checkpointer = checkpointer, n: str = name) -> Awaitable[float]:
                    return cold_boot_ttft(
                        c.new_sandbox(work / f"{n}-cold{i}", f"c{i}"), adapter, config, http, model
                    )

                cold = await repeat(f"{name} cold boot", args.cold_runs, sandbox_cold)
                manager = SnapshotManager(
                    checkpointer, SnapshotStore(work / f"{name}-store"), adapter, config
                )
                original = await manager.boot_and_snapshot(
                    adapter, config, http, work / f"{name}-orig", "orig"
                )
                memory = tree_memory(original.host_pids())
                await original.stop(5.0)
                snap = manager.store.lookup(manager.identity.key)
                assert snap is not None
                weight_bytes = int((snap.manifest.get("weights") or {}).get("bytes", 0))
                snapshot_bytes = snap.total_bytes - weight_bytes  # the image; weight files counted apart
                files = [snap.path / rel for rel in snap.manifest["files"]]
                bandwidth = read_bandwidth(files)

                async def launcher_restore(
                    i: int, m: SnapshotManager = manager, n: str = name, cache: str = "warm"
                ) -> float:
                    if cache == "dropped":
                        drop_page_cache()
                    started = time.monotonic()
                    sandbox = await m.restore(adapter, config, http, work / f"{n}-r{i}", f"r{i}")
                    try:
                        await first_token(http, sandbox.base_url, model)
                        timing = dict(m.restore_timings[f"r{i}"])
                        timing["first_token"] = time.monotonic() - started - timing["total"]
                        timing["page_cache_dropped"] = float(cache == "dropped")
                        phases[n].append(timing)
                        print(f"    phases: { {k: round(v, 3) for k, v in timing.items()} }", file=sys.stderr)
                        return time.monotonic() - started
                    finally:
                        await sandbox.stop(5.0)

                phases[name] = []
                restored = await repeat(f"{name} launcher restore", args.runs, launcher_restore)
                if args.drop_caches:
                    await repeat(
                        f"{name} launcher restore, page cache dropped", args.runs,
                        lambda i, lr=launcher_restore: lr(100 + i, cache="dropped"),  # type: ignore[misc]
                    )  # fmt: skip
                pair = await two_replicas_memory(manager, adapter, config, http, work / f"{name}-pair", model)
                pair_ksm = None
                if args.ksm:
                    with ksm_running():
                        pair_ksm = await two_replicas_memory(
                            manager, adapter, config, http, work / f"{name}-ksm", model, ksm=True
                        )
                binary: str = checkpointer.binary

                def bare_once(
                    i: int, img: Path = snap.image_dir, tool: str = binary, n: str = name
                ) -> Awaitable[float]:
                    if n == "criu":
                        return bare_criu(img, tool, work / f"bare{i}", http, model, args.engine == "vllm")
                    return bare_runsc(img, tool, work / "bare", http, model, i, args.engine == "vllm")

                bare_healthy.clear()
                bare = await repeat(f"bare {name} restore", args.runs, bare_once)
                results.append(
                    {
                        "name": f"{name} {info.version}",
                        "cold": cold,
                        "restore": restored,
                        "bare": bare,
                        "bytes": snapshot_bytes,
                        "bandwidth": bandwidth,
                        "phases": phases[name],
                        "bare_healthy": list(bare_healthy),
                        "memory": memory,
                        "weights": weight_bytes,
                        "pair": pair,
                        "pair_ksm": pair_ksm,
                    }
                )
            if args.gateway or args.gateway_image:
                await asyncio.to_thread(gateway_rows, args, model_dir, config, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


@dataclasses.dataclass
class GatewayClock:
    runs: list[dict[str, float]]  # per request at zero: phase -> seconds, "client", "page_cache_dropped"
    first_ready: float  # launch -> first replica ready (first boot + snapshot)
    image_mount: float | None
    fetched: float | None  # bytes the first boot fetched through the image mount


gateway_clocks: list[GatewayClock] = []  # filled by gateway_rows, printed under the table


def gateway_rows(args: argparse.Namespace, model_dir: Path, config: EngineConfig, work: Path) -> None:
    """``coldstart-serve --snapshot criu``: first boot + snapshot, then ``--runs`` requests at zero replicas
    (each also with the page cache dropped where ``--drop-caches``); the phases from its /metrics."""
    model_arg = str(model_dir)
    image_args: list[str] = []
    if args.gateway_image:
        from coldstart.imagefs.build import build

        index = build(model_dir, work / "gateway-origin").index_path
        model_arg = "{image}"
        image_args = ["--image", str(index), "--image-cache", str(work / "gateway-chunks")]
    launcher = gateway_clock.Launcher(
        [
            args.engine, model_arg, *image_args, "--snapshot", "criu",
            "--snapshot-dir", str(work / "gateway-snapshots"), "--work-dir", str(work / "gateway-run"),
            "--served-model-name", "m", "--idle-timeout", "2", "--max-replicas", "1",
            *config.engine_args,
        ],
        work / "gateway.log",
        env=config.env,
    )  # fmt: skip
    try:
        first_ready = launcher.wait_ready()
        text = launcher.metrics()
        mounts, mount_s = gateway_clock.phase_totals(text, "m")["image_mount"]
        fetched = gateway_clock.gauge(text, "coldstart_image_fetched_bytes", "m")
        launcher.wait_zero()
        runs: list[dict[str, float]] = []
        for i in range(args.runs * (2 if args.drop_caches else 1)):
            dropped = args.drop_caches and i % 2 == 1
            if dropped:
                drop_page_cache()
            timing = gateway_clock.request_at_zero(launcher, "m")
            timing["page_cache_dropped"] = float(dropped)
            runs.append(timing)
            print(f"  gateway request at zero #{i + 1}: {timing}", file=sys.stderr, flush=True)
    finally:
        launcher.stop()
    gateway_clocks.append(GatewayClock(runs, first_ready, mount_s / mounts if mounts else None, fetched))


def drop_page_cache() -> None:
    """Write back and drop the host's page cache (root): the next restore reads its files from disk."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


KSM = Path("/sys/kernel/mm/ksm")
KSM_SETTINGS = {"run": "1", "pages_to_scan": "4000", "sleep_millisecs": "20"}  # ~200k pages/s at most


@contextlib.contextmanager
def ksm_running() -> Iterator[None]:
    """The host's KSM on (``ksmd`` merges the pages of mappings marked ``MADV_MERGEABLE``), its settings
    put back afterwards (``run`` 2 unmerges what it merged)."""
    before = {name: (KSM / name).read_text().strip() for name in KSM_SETTINGS}
    try:
        for name, value in KSM_SETTINGS.items():
            (KSM / name).write_text(value)
        yield
    finally:
        if before["run"] == "0":
            (KSM / "run").write_text("2")
        for name, value in before.items():
            (KSM / name).write_text(value)


def ksmd_cpu_s() -> float:
    """CPU seconds ``ksmd`` has used (0 where its kernel thread is not visible)."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "comm").read_text().strip() == "ksmd":
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            continue
    return 0.0


async def ksm_settled(timeout: float = 180.0) -> float:
    """Seconds until ``ksmd`` stops finding pages to merge: ``pages_sharing`` grew by under 1% over three
    of its full scans (or ``timeout``)."""
    started = time.monotonic()
    scans = int((KSM / "full_scans").read_text())
    last, steady = -1, 0
    while time.monotonic() - started < timeout and steady < 3:
        await asyncio.sleep(0.2)
        now_scans = int((KSM / "full_scans").read_text())
        if now_scans == scans:
            continue
        scans = now_scans
        sharing = int((KSM / "pages_sharing").read_text())
        steady = steady + 1 if last >= 0 and sharing <= last * 1.01 else 0
        last = max(last, sharing)
    return time.monotonic() - started


async def two_replicas_memory(
    manager: SnapshotManager,
    adapter: EngineAdapter,
    config: EngineConfig,
    http: httpx.AsyncClient,
    work: Path,
    model: str,
    ksm: bool = False,
) -> tuple[int, int]:
    """PSS of one restored replica's tree alone, then the PSS sum of two restored side by side (weight
    files mapped by both are shared through the page cache: each is charged half). ``ksm``: with the host's
    KSM running, each read once ``ksmd`` has settled (the restored heaps are marked mergeable)."""
    first = await manager.restore(adapter, config, http, work / "a", "pa")
    try:
        await first_token(http, first.base_url, model)
        if ksm:
            await ksm_settled()
        one = tree_memory(first.host_pids())[0]
        second = await manager.restore(adapter, config, http, work / "b", "pb")
        try:
            await first_token(http, second.base_url, model)
            if ksm:
                cpu, settle = ksmd_cpu_s(), await ksm_settled()
                shared = int((KSM / "pages_sharing").read_text()) * os.sysconf("SC_PAGE_SIZE")
                cpu_settle = ksmd_cpu_s() - cpu
                await asyncio.sleep(10)  # a fixed window: ksmd's cost once there is little left to merge
                ksm_notes.append(
                    f"second replica: ksmd settled in {settle:.1f} s using {cpu_settle:.1f} s of CPU, then "
                    f"{(ksmd_cpu_s() - cpu - cpu_settle) / 10:.0%} of a core; {shared / 2**20:,.0f} MiB of "
                    "pages deduplicated host-wide"
                )
            both = tree_memory(first.host_pids())[0] + tree_memory(second.host_pids())[0]
        finally:
            await second.stop(5.0)
    finally:
        await first.stop(5.0)
    return one, both


ksm_notes: list[str] = []


phases: dict[str, list[dict[str, float]]] = {}
bare_healthy: list[float] = []  # appended by bare_criu/bare_runsc, moved into the results per checkpointer


def table(results: list[dict[str, object]], runs: int) -> str:
    med = statistics.median
    host_cold = med(results[0]["cold"])  # type: ignore[arg-type]
    lines = [
        f"median of {runs} runs, seconds; first token = first streamed chunk of a 1-token greedy answer",
        "",
        "| checkpointer | cold boot -> 1st token (in sandbox) | bare restore -> 1st token | "
        "launcher restore -> 1st token | speed-up vs host cold boot | speed-up vs sandbox cold boot | "
        "snapshot image + weight files | read floor | engine memory (PSS / RSS) | "
        "two restored: PSS sum / one |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| host process, no snapshot | {host_cold:.2f} | | | 1.0x | | | | | |",
    ]
    for r in results[1:]:
        cold, restore, bare = (med(r[k]) for k in ("cold", "restore", "bare"))  # type: ignore[arg-type]
        floor = r["bytes"] / r["bandwidth"]  # type: ignore[operator]
        weights = int(r["weights"])  # type: ignore[call-overload]
        pair: tuple[int, int] = r["pair"]  # type: ignore[assignment]
        one, two = pair
        memory: tuple[int, int] = r["memory"]  # type: ignore[assignment]
        image = int(r["bytes"])  # type: ignore[call-overload]
        lines.append(
            f"| {r['name']} | {cold:.2f} | {bare:.3f} | {restore:.3f} | {host_cold / restore:.1f}x | "
            f"{cold / restore:.1f}x | {image / 1e6:.0f} + {weights / 1e6:.0f} MB | "
            f"{floor:.3f} s at {float(r['bandwidth']) / 1e9:.1f} GB/s | "  # type: ignore[arg-type]
            f"{memory[0] / 1e9:.2f} / {memory[1] / 1e9:.2f} GB | "
            + (
                f"{two / 1e9:.2f} / {one / 1e9:.2f} GB = {two / one:.2f}x |"
                if one
                else "n/a (no host PIDs) |"
            )
        )
    if len(results) == 1:  # --checkpointers '': the host row, then the gateway's clock
        return "\n".join(lines + [line for clock in gateway_clocks for line in gateway_table(clock)])
    lines += [
        "",
        "where the launcher's time goes (medians): to healthy = lookup + gate + digests + namespaces"
        " + restore;",
        "the canary is one greedy token before the replica may serve",
        "",
        "| checkpointer | bare restore -> healthy | launcher -> healthy | launcher - bare (to healthy) | "
        "digests + gate | canary | launcher - bare (to 1st token) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results[1:]:
        ph: list[dict[str, float]] = [p for p in r["phases"] if not p.get("page_cache_dropped")]  # type: ignore[attr-defined]
        bare_h = med(r["bare_healthy"])  # type: ignore[arg-type]
        launcher_h, verify, canary = (
            med([p.get(k, 0.0) for p in ph]) for k in ("healthy", "verify", "canary")
        )
        gap = med(r["restore"]) - med(r["bare"])  # type: ignore[arg-type]
        lines.append(
            f"| {r['name']} | {bare_h:.3f} | {launcher_h:.3f} | {launcher_h - bare_h:+.3f} | {verify:.3f} | "
            f"{canary:.3f} | {gap:+.3f} |"
        )
    lines += [
        "",
        "the end-to-end clock of a request arriving at zero replicas, by phase (medians; no image: mount and",
        "fetch are not on this path; pull only with remote tiers); page cache warm, and dropped before each",
        "restore where --drop-caches",
        "",
        "| checkpointer | page cache | verify | restore -> healthy | wake | canary | first token | total |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results[1:]:
        ph = r["phases"]  # type: ignore[assignment]
        for cache in ("warm", "dropped"):
            rows = [p for p in ph if p.get("page_cache_dropped", 0.0) == float(cache == "dropped")]
            if not rows:
                continue
            cells = [med([p.get(k, 0.0) for p in rows]) for k in ("verify", "restore", "wake", "canary")]
            first = med([p["first_token"] for p in rows])
            total = med([p["total"] + p["first_token"] for p in rows])
            lines.append(
                f"| {r['name']} | {cache} | "
                + " | ".join(f"{c:.3f}" for c in cells)
                + f" | {first:.3f} | {total:.3f} |"
            )
    for clock in gateway_clocks:
        lines += gateway_table(clock)
    return "\n".join(lines)


def gateway_table(clock: GatewayClock) -> list[str]:
    med = statistics.median
    mount = f"image mount {clock.image_mount:.3f} s" if clock.image_mount is not None else "no image"
    fetched = f", the boot fetched {clock.fetched / 1e6:.1f} MB" if clock.fetched is not None else ""
    lines = [
        "",
        "through the gateway (coldstart-serve --snapshot criu): a streamed request sent at zero replicas,",
        f"phases from its /metrics (first boot + snapshot -> ready {clock.first_ready:.1f} s after launch; "
        f"{mount}{fetched})",
        "",
        "| page cache | runs | pull | verify | restore -> healthy | wake | canary |"
        " arrival -> 1st token (proxy) | client: request -> 1st token |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for cache in ("warm", "dropped"):
        rows = [p for p in clock.runs if p["page_cache_dropped"] == float(cache == "dropped")]
        if not rows:
            continue
        keys = ("pull", "verify", "checkpointer_restore", "wake", "canary", "first_token", "client")
        cells = [  # "-": not on this path (pull: only with remote tiers)
            f"{med([p.get(k, 0.0) for p in rows]):.3f}" if any(k in p for p in rows) else "-" for k in keys
        ]
        lines.append(f"| {cache} | {len(rows)} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", default="transformers", choices=["transformers", "vllm"])
    parser.add_argument("--vllm-config", default="lean", choices=sorted(VLLM_CONFIGS))
    parser.add_argument(
        "--size", default=None, choices=["tiny", "qwen3-0.6b"], help="default: qwen3-0.6b (vllm: tiny)"
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cold-runs", type=int, default=None, help="cold boots per row (default: --runs)")
    parser.add_argument(
        "--drop-caches", action="store_true", help="also restore with the page cache dropped before each"
    )
    parser.add_argument(
        "--checkpointers", default="criu,runsc", type=lambda s: [x for x in s.split(",") if x]
    )
    parser.add_argument(
        "--ksm", action="store_true", help="also two restored replicas' PSS with the host's KSM running"
    )
    parser.add_argument(
        "--gateway", action="store_true", help="also the end-to-end clock through coldstart-serve's /metrics"
    )
    parser.add_argument(
        "--gateway-image", action="store_true", help="--gateway with the model in a lazily mounted image"
    )
    parser.add_argument(
        "--restore-path",
        action="store_true",
        help="also the replica namespace step alone: ip processes (before) vs netlink (now), bench/netns.py",
    )
    args = parser.parse_args(argv)
    if args.restore_path:
        print(namespace_bench.table(max(args.runs, 20)))
    if args.cold_runs is None:
        args.cold_runs = args.runs
    if args.size is None:
        args.size = "tiny" if args.engine == "vllm" else "qwen3-0.6b"
    results = asyncio.run(bench(args))
    if args.engine == "vllm":
        print(f"engine: {get_adapter('vllm').version()}, {args.vllm_config} configuration, model {args.size}")
    print(table(results, args.runs))
    for r in results[1:]:
        if r.get("pair_ksm"):
            one, two = r["pair_ksm"]  # type: ignore[misc]
            print(f"{r['name']}, KSM running: two restored replicas' PSS sum / one = {two / 1e9:.2f} / "
                  f"{one / 1e9:.2f} GB = {two / one:.2f}x")  # fmt: skip
    for note in ksm_notes:
        print(f"KSM: {note}")
    for failure in failures:
        print(f"failed once and run again: {failure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
