"""Runs inside SGLang's own environment (standard library + SGLang + torch only).

ENGINE_PYTHON sglang_entry.py probe   -> one JSON line: distribution, version, device, sleep_mode
"""

from __future__ import annotations

import json
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]  # our sglang.py would shadow it

import importlib.metadata as metadata  # noqa: E402


def probe() -> int:
    try:
        version = metadata.version("sglang")
    except metadata.PackageNotFoundError:
        print(json.dumps({"error": f"no sglang distribution in {sys.prefix}"}))
        return 1
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # The memory saver (release/resume memory occupation) is what coldstart relies on; it needs CUDA.
    print(
        json.dumps(
            {"distribution": "sglang", "version": version, "device": device, "sleep_mode": device == "cuda"}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(probe() if sys.argv[1:2] == ["probe"] else 2)
