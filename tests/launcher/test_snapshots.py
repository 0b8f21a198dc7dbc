"""Snapshots end to end through ``coldstart-serve --snapshot criu``: the first replica is booted and
snapshotted; later ones (scale from zero) are restored, asserted from the lifecycle log; a damaged snapshot
or one from another host is refused with its reason, counted, and the request is answered by a cold boot.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from support import Served

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def snapshot_store(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding one CRIU snapshot of ``transformers serve`` (tiny model), taken by coldstart-serve."""
    from coldstart.launcher.checkpointers.registry import get_checkpointer
    from coldstart.launcher.errors import CheckpointerUnavailable

    if os.geteuid() != 0:
        pytest.skip("criu needs root")
    try:
        get_checkpointer("criu").probe()
    except CheckpointerUnavailable as exc:
        pytest.skip(f"criu unavailable here: {exc}")
    root = tmp_path_factory.mktemp("snapshots")
    served = serve_with(root / "store", tiny_model, root / "first.log", initial=1)
    try:
        served.wait_ready()
        assert re.search(r"snapshot \w+ taken", served.log()), served.log()
        assert ("r1", "booting", "snapshotting") in served.lifecycle()
    finally:
        served.stop()
    return root / "store"


def serve_with(store: Path, model: Path, log: Path, initial: int = 0, extra: tuple[str, ...] = ()) -> Served:
    args = ["transformers", str(model), "--snapshot", "criu", "--snapshot-dir", str(store)]
    args += ["--work-dir", str(log.parent / f"{log.stem}-work"), "--initial-replicas", str(initial), *extra]
    return Served(args, log)


def ask(served: Served, model: Path) -> str:
    served.wait_for(lambda health: True, 60, "the proxy to listen")
    with OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=180) as client:
        answer = client.chat.completions.create(
            model=str(model), messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0
        )
    return answer.choices[0].message.content or ""


def metric(served: Served, name: str) -> dict[str, float]:
    """``name``'s samples by their labels, the ``model`` label left out (one model is served here)."""
    text = httpx.get(f"{served.url}/metrics", timeout=10).text
    samples = re.findall(rf"^{name}(\{{[^}}]*\}})?\s+(\S+)$", text, flags=re.MULTILINE)
    out = {}
    for labels, value in samples:
        labels = re.sub(r'model="[^"]*",?', "", labels)
        out["" if labels == "{}" else labels] = float(value)
    return out


def copy_store(store: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the store and the path of its one snapshot folder."""
    copy = tmp_path / "store"
    shutil.copytree(store, copy, symlinks=True)
    (snap,) = [p for p in copy.iterdir() if not p.name.startswith(".")]
    return copy, snap


def test_scale_from_zero_restores(snapshot_store: Path, tiny_model: Path, tmp_path: Path) -> None:
    served = serve_with(snapshot_store, tiny_model, tmp_path / "serve.log")
    try:
        answer = ask(served, tiny_model)
        assert answer
        assert ("r1", "new", "restoring") in served.lifecycle(), served.log()
        assert ("r1", "restoring", "ready") in served.lifecycle(), served.log()
        assert not any(to == "booting" for _, _, to in served.lifecycle()), "booted instead of restoring"
        assert metric(served, "coldstart_restores_total") == {"": 1.0}
        assert metric(served, "coldstart_cold_boots_total").get("", 0.0) == 0.0  # no sample until one
        # The end-to-end clock, phase by phase: each step of this one restore observed once, in seconds (no
        # pull: the snapshot was local).
        counts = metric(served, "coldstart_phase_seconds_count")
        sums = metric(served, "coldstart_phase_seconds_sum")
        for phase in ("verify", "checkpointer_restore", "canary"):
            assert counts.get(f'{{phase="{phase}"}}') == 1.0, counts
            assert 0 < sums[f'{{phase="{phase}"}}'] < 120, sums
        assert '{phase="pull"}' not in counts
    finally:
        served.stop()


def test_a_restarted_launcher_sizes_its_first_replica_by_the_snapshot(
    snapshot_store: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """The snapshot records the engine's resident memory; a launcher that has run no replica of the model
    yet checks it against --memory-budget before restoring, and answers 503 naming the budget."""
    (snap,) = [p for p in snapshot_store.iterdir() if not p.name.startswith(".")]
    resident = json.loads((snap / "manifest.json").read_text())["resident_bytes"]
    assert resident > 50 << 20, resident  # transformers serve with torch loaded
    served = serve_with(snapshot_store, tiny_model, tmp_path / "serve.log", extra=("--memory-budget", "40MB"))
    try:
        served.wait_for(lambda health: True, 60, "the proxy to listen")
        answer = httpx.post(
            f"{served.url}/v1/chat/completions",
            json={"model": str(tiny_model), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            timeout=60,
        )
        assert answer.status_code == 503, answer.text
        assert "--memory-budget" in answer.json()["error"]["message"], answer.text
        assert not served.lifecycle(), "a replica was started"
    finally:
        served.stop()


def flip_byte(snap: Path) -> None:
    pages = max((snap / "image").glob("pages-*.img"), key=lambda p: p.stat().st_size)
    with open(pages, "r+b") as f:
        f.seek(pages.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


def truncate(snap: Path) -> None:
    pages = max((snap / "image").glob("pages-*.img"), key=lambda p: p.stat().st_size)
    os.truncate(pages, pages.stat().st_size // 2)


def other_host(snap: Path) -> None:
    manifest = json.loads((snap / "manifest.json").read_text())
    manifest["identity"]["fingerprint"]["cpu_flags"].append("coldstart_flag_no_cpu_has")
    (snap / "manifest.json").write_text(json.dumps(manifest))


def weights_changed(snap: Path) -> None:
    """As if model.safetensors had been rewritten in place (same size) after the snapshot: the shared test
    model must stay intact, so the recorded digest changes instead of the file."""
    manifest = json.loads((snap / "manifest.json").read_text())
    (name,) = [n for n in manifest["model_files"] if n.endswith("model.safetensors")]
    manifest["model_files"][name]["sha256"] = "0" * 64
    (snap / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "damage, reason, message",
    [
        (flip_byte, "digest", "sha256"),
        (truncate, "digest", "bytes, manifest says"),
        (other_host, "gate", "cpu flag coldstart_flag_no_cpu_has missing on this host"),
        (weights_changed, "model_files", "model.safetensors sha256 differs"),
    ],
    ids=["flipped-byte", "truncated-pages", "manifest-from-another-host", "weights-changed"],
)
def test_bad_snapshot_is_refused_and_cold_boot_answers(  # type: ignore[no-untyped-def]
    snapshot_store: Path, tiny_model: Path, tmp_path: Path, damage, reason: str, message: str
) -> None:
    store, snap = copy_store(snapshot_store, tmp_path)
    damage(snap)
    served = serve_with(store, tiny_model, tmp_path / "serve.log")
    try:
        assert ask(served, tiny_model), "the request was not answered"
        log = served.log()
        assert f"restore failed ({reason})" in log and message in log, log
        assert ("r1", "restoring", "booting") in served.lifecycle(), log
        assert metric(served, "coldstart_restore_failures_total") == {f'{{reason="{reason}"}}': 1.0}
        assert metric(served, "coldstart_cold_boots_total") == {"": 1.0}
    finally:
        served.stop()
    if reason == "digest":  # moved aside, so the next cold boot can write a good one
        assert any(p.name.startswith(".bad-") for p in store.iterdir())
