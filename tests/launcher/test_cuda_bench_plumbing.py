"""``bench/gpu_coldstart.py --fake-gpu``: the GPU benchmark's plumbing (engine spawn, hooks over the control
channel, the CUDA sequence, canary, CRIU dump/restore, report) on CPU with a simulated driver, so the
script that runs on the H200 does not rot between GPU sessions. Times here mean nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_bench_plumbing(tmp_path: Path) -> None:
    criu = shutil.which("criu")
    argv = [sys.executable, str(REPO / "bench" / "gpu_coldstart.py"), "--fake-gpu", "--runs", "1"]
    argv += ["--cold-runs", "1", "--kv-tokens", "64", "--out", str(tmp_path)]
    if criu:  # CRIU 4.2 (CI installs it): the full path too
        argv += ["--criu", criu]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_coldstart.json").read_text())
    assert results["errors"] == []
    assert len(results["cold"]) == 1
    assert len(results["modes"]["hooks"]) == len(results["modes"]["no_hooks"]) == 1
    assert results["canary_checks"] and all(results["canary_checks"])
    assert results["uuid_restore"].startswith("ok: gpuPairs")
    if criu:
        assert len(results["modes"]["criu"]) == 1
        assert results["modes"]["criu"][0]["cuda_state_after_criu"] == "checkpointed"
    assert "SIMULATED DRIVER" in (tmp_path / "gpu_coldstart.txt").read_text()
