"""The real vLLM (CPU build, lean configuration, tiny model) behind ``coldstart-serve vllm MODEL --snapshot
runsc``: booted inside gVisor, checkpointed by ``runsc checkpoint``, scaled to zero, and restored by
``runsc restore`` answering the same greedy token ids (the launcher's canary compares ids and logprobs
too), side by side with the CRIU module (``test_vllm_serve.py``).

What made it work with this runsc (Debian bookworm-backports 0.0~20240729): its CPUID shows ``amx_tile``
but hides ``avx512_bf16`` and it answers the AMX permission request (``arch_prctl(ARCH_REQ_XCOMP_PERM)``)
with EINVAL; vLLM then loaded its ``_C_AVX512`` kernels and called the AMX-only
``torch.ops._C.convert_weight_packed`` at weight processing ("'_C' object has no attribute
'convert_weight_packed'"). ``vllm_entry.py`` now hides AMX from torch unless the permission is granted.
Measured here (2 cores): boot + snapshot 164 s, image 1,203 MB, restore to a matching canary 1.19 s.
One engine boot for the module; skipped where runsc does not work (``coldstart doctor`` says why).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from support import Served, make_cached_model, needs_runsc, ready_lines, vllm_greedy_ids, vllm_module_marks

from coldstart.engine_adapters.vllm import LEAN_CPU_ARGS, LEAN_CPU_ENV

MODEL = "tiny-vllm-runsc"
PROMPT = [{"role": "user", "content": "Name a colour."}]


pytestmark = [
    *vllm_module_marks(),
    needs_runsc(),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    model = make_cached_model("tiny")
    work = tmp_path_factory.mktemp("vllm-runsc")
    args = [
        "vllm", str(model), "--snapshot", "runsc", "--snapshot-dir", str(work / "snapshots"),
        "--work-dir", str(work / "run"), "--served-model-name", MODEL, "--idle-timeout", "3",
        "--max-replicas", "1", "--boot-timeout", "900", *LEAN_CPU_ARGS,
    ]  # fmt: skip
    served = Served(args, work / "serve.log", env=LEAN_CPU_ENV)
    served.snapshot_dir = work / "snapshots"  # type: ignore[attr-defined]
    try:
        served.wait_ready(timeout=900)
        yield served
    finally:
        served.stop()


def greedy_ids(served: Served) -> tuple[list[int], str]:
    return vllm_greedy_ids(served, MODEL, PROMPT)


def test_gvisor_snapshot_of_vllm_then_restore_answers_the_same_greedy_tokens(served: Served) -> None:
    ids, text = greedy_ids(served)
    assert ids, "vLLM returned no token ids"
    manifests = list(served.snapshot_dir.glob("*/manifest.json"))  # type: ignore[attr-defined]
    assert len(manifests) == 1, f"expected one snapshot, found {manifests}"
    manifest = json.loads(manifests[0].read_text())
    assert manifest["identity"]["checkpointer"] == "runsc"
    assert not manifest.get("weights"), "weights go into files only with CRIU (runsc has its own root)"
    served.wait_for(lambda h: h["replicas"] == [], timeout=120, what="scale to zero")
    restores = ready_lines(served, "restore")
    assert greedy_ids(served) == (ids, text)
    assert ready_lines(served, "restore") == restores + 1, "the replica that answered was not restored"
