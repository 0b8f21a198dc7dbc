"""``python -m coldstart.engine_adapters.transformers_entry serve MODEL ...``: ``transformers serve`` with the
snapshot_hooks control channel open, so that after each restore the hooks library reseeds torch, NumPy and
Python RNGs from fresh entropy (and refreshes host identity). ``transformers serve`` itself has no hook for
this; sampling uses torch's global generator, which a snapshot would otherwise hand to every replica alike.
"""

from __future__ import annotations

import sys


def main() -> int:
    from coldstart import snapshot_hooks

    snapshot_hooks.serve()  # reads COLDSTART_CONTROL_HOST/PORT; a no-op outside coldstart
    from transformers.cli.transformers import main as transformers_main

    sys.argv[0] = "transformers"
    transformers_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
