"""``bench/gpu_coldstart.py``: the one-shot GPU run must work the first time on the GPU machine, so its
plumbing runs here with ``--fake-gpu`` (engine on CPU, driver and NVML simulated, real CRIU and the real
launcher path with the CRIU checkpointer): phases, canary by token ids, results after every phase, the
overall deadline, at most 8 files back. Times here mean nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from support import bench_module

REPO = Path(__file__).resolve().parents[2]
MAX_FILES_BACK = 8  # the device tool returns at most 8 files from $OUT; the run command adds log.txt


def bench() -> ModuleType:
    return bench_module("gpu_coldstart")


def run_bench(out: Path, *extra: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, str(REPO / "bench" / "gpu_coldstart.py"), "--fake-gpu", "--out", str(out)]
    argv += ["--runs", "1", "--cold-runs", "1", "--kv-tokens", "64", *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def test_a_token_is_a_chunk_with_text_ids_or_logprobs() -> None:
    carries = bench()._carries_token
    assert not carries({"choices": [{"delta": {"role": "assistant", "content": ""}}]})
    assert not carries({"choices": [{"delta": {}, "finish_reason": "length"}]})
    assert carries({"choices": [{"delta": {"content": "~1f~"}}]})
    assert carries({"choices": [{"text": "", "token_ids": [17]}]})
    assert carries({"choices": [{"delta": {}, "logprobs": {"content": [{"token": "", "logprob": -1.0}]}}]})


def test_answers_compare_by_token_ids_and_empty_proves_nothing() -> None:
    same = bench().same_answer
    ref = {"token_ids": [5, 6], "text": "ab"}
    assert same(ref, {"token_ids": [5, 6], "text": "ab"}) | {"got": None} == {
        "by": "token_ids", "identical": True, "vacuous": False, "got": None,
    }  # fmt: skip
    assert not same(ref, {"token_ids": [5, 7], "text": "ab"})["identical"]  # same text, other ids
    empty = same({"token_ids": None, "text": ""}, {"token_ids": None, "text": ""})
    assert empty["vacuous"] and not empty["identical"] and empty["by"] == "text"


@pytest.mark.slow
def test_gpu_bench_plumbing(tmp_path: Path) -> None:
    criu = shutil.which("criu") or "/usr/local/sbin/criu"
    proc = run_bench(tmp_path, "--criu", criu)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_coldstart.json").read_text())
    assert results["errors"] == []
    assert [p.split()[0] for p in results["phases_done"]] == [
        "preflight", "model", "cold", "inplace", "launcher", "criu",
    ]  # fmt: skip
    assert results["preflight"]["gvisor"] is None
    assert not [n for n, v in results["preflight"]["imports"].items() if v.startswith("MISSING")]
    assert len(results["cold"]) == 1
    assert len(results["modes"]["hooks"]) == len(results["modes"]["no_hooks"]) == 1
    checks = results["canary_checks"]
    assert checks and all(c["identical"] and c["by"] == "token_ids" for c in checks)
    assert results["uuid_restore"].startswith("ok: gpuPairs")
    assert results["modes"]["criu"][0]["cuda_state_after_criu"] == "checkpointed"
    launcher = results["launcher"]["tiny_engine"]
    assert len(launcher["restores"]) == 2 and launcher["snapshot_bytes"] > 0
    assert "SIMULATED DRIVER" in (tmp_path / "gpu_coldstart.txt").read_text()
    assert len(list(tmp_path.iterdir())) <= MAX_FILES_BACK - 1
    assert "criu restore 1: Error/Warn lines" in (tmp_path / "criu-logs.txt").read_text()


@pytest.mark.slow
def test_deadline_ends_the_run_with_results_saved(tmp_path: Path) -> None:
    proc = run_bench(tmp_path, "--deadline-s", "12", "--phases", "preflight,cold,inplace", "--criu", "none")
    assert proc.returncode == 1
    results = json.loads((tmp_path / "gpu_coldstart.json").read_text())
    assert results["preflight"]["imports"]  # the early phases were saved
    stopped = results["not_measured"] + results["errors"]
    assert any("deadline" in line for line in stopped), stopped
    # Every engine it started is gone: nothing of this run is left serving.
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in ps and "tiny_engine.py --model /var/tmp/gpu-coldstart" not in ps
