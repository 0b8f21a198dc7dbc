"""Boot failures that say why (launcher/boot.py): the real vLLM refusing to start, its root-cause line in
the error's first line and on the error (``root_cause``), its whole output in the replica's engine log, and
the warning logged before a CPU vLLM boots with no KV-cache bound."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import httpx
import pytest
from support import make_cached_model, needs_vllm

from coldstart.engine_adapters.base import EngineConfig
from coldstart.engine_adapters.registry import get_adapter
from coldstart.launcher.boot import cold_boot
from coldstart.launcher.errors import EngineExited
from coldstart.launcher.sandboxes.plain import PlainSandbox


@needs_vllm()
def test_cpu_vllm_without_a_kv_cache_bound_is_warned_about() -> None:
    adapter = get_adapter("vllm")
    if adapter.environment.device != "cpu":  # type: ignore[attr-defined]
        pytest.skip("the warning is for vLLM's CPU build")
    (warning,) = adapter.boot_warnings(EngineConfig("m", ("--gpu-memory-utilization", "0.5")))
    assert "0.50 x" in warning and "--kv-cache-memory-bytes" in warning and "GiB" in warning
    assert adapter.boot_warnings(EngineConfig("m", ("--kv-cache-memory-bytes", "67108864"))) == []
    assert adapter.boot_warnings(EngineConfig("m", env={"VLLM_CPU_KVCACHE_SPACE": "1"})) == []


@pytest.mark.slow
@pytest.mark.vllm
@needs_vllm()
def test_vllm_refusing_to_start_shows_its_root_cause(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """vLLM's CPU build wants --gpu-memory-utilization of the host's RAM free at start; 0.99 is never free
    on a running host, so it refuses ("Available memory on node 0 ... is less than desired CPU memory
    utilization") in its engine core, and the API server then prints a traceback ending "See root cause
    above": the last 20 lines, all the error used to show, do not hold the reason."""
    total, available = (int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()[:3:2])
    if available > 0.95 * total:
        pytest.skip("this host has 99% of its RAM free: vLLM would take it")
    model = make_cached_model("tiny")
    adapter = get_adapter("vllm")
    # vLLM's default multiprocessing: the engine core (which refuses) is a child of the API server.
    config = EngineConfig(str(model), ("--max-model-len", "512", "--gpu-memory-utilization", "0.99"))
    log_path = tmp_path / "r1" / "engine.log"

    async def boot() -> EngineExited:
        sandbox = PlainSandbox("vllm:r1", log_path=log_path)
        try:
            async with httpx.AsyncClient(trust_env=False) as http:
                with pytest.raises(EngineExited) as caught:
                    await cold_boot(sandbox, adapter, config, http, timeout_s=300)
        finally:
            await sandbox.stop(5)
        return caught.value

    with caplog.at_level(logging.WARNING, logger="coldstart.boot"):
        exc = asyncio.run(boot())
    assert any("--kv-cache-memory-bytes" in r.getMessage() for r in caplog.records), caplog.text
    first_line = str(exc).splitlines()[0]
    assert "less than desired" in exc.root_cause and exc.root_cause in first_line, str(exc)
    assert "See root cause above" not in exc.root_cause
    assert "less than desired" not in exc.log_tail, "the reason was in the last lines anyway"
    assert f"whole output: {log_path}" in str(exc)
    assert "less than desired" in log_path.read_text() and os.stat(log_path).st_mode & 0o777 == 0o600
