"""``transformers serve``: the engine that runs for real on CPU here, and our default.

Facts this adapter relies on (measured, see shared/reference/this-machine.md):
- the positional model argument preloads the model before the port binds, so ``GET /health`` 200 = ready;
- ``HF_HUB_OFFLINE=1`` is needed for a local path (else it looks the hub up at start);
- the request's ``model`` must equal the command-line string; ``GET /v1/models`` lists the hub cache (500
  here), so the proxy answers ``/v1/models`` itself;
- it has no sleep/offload API (on CPU there is no device state to drop) and no restore hook, so it is
  started through ``transformers_entry``, which opens the snapshot_hooks control channel: after a restore
  the launcher's after-restore call reseeds the RNGs, and two restored replicas sample differently.
"""

from __future__ import annotations

import sys
from typing import ClassVar

from coldstart.engine_adapters.base import (
    EngineConfig,
    LaunchSpec,
    local_model_path,
    package_version,
    require_package,
)
from coldstart.engine_adapters.hooks_channel import HooksChannel


class TransformersAdapter(HooksChannel):
    name: ClassVar[str] = "transformers"
    extra: ClassVar[str] = "transformers"
    # Routes of `transformers serve` that are not inference (model loading, hub listing).
    control_paths: ClassVar[frozenset[str]] = frozenset({"/load_model"})
    # It tokenizes and generates in its event loop: a 30 MB prompt (under --max-body-size) blocked
    # /health until the liveness probe failed and the replica was killed. 2 MiB is ~500k tokens, beyond
    # any context a CPU model serves here.
    max_request_bytes: ClassVar[int | None] = 2 << 20

    def check_installed(self) -> None:
        require_package("transformers", self.name, self.extra)
        require_package("torch", self.name, self.extra)
        require_package("transformers.cli", self.name, self.extra)

    def version(self) -> str:
        return f"transformers-{package_version('transformers')}+torch-{package_version('torch')}"

    def upstream_model_name(self, config: EngineConfig) -> str:
        return local_model_path(config.model)

    def launch_spec(self, config: EngineConfig) -> LaunchSpec:
        model = local_model_path(config.model)
        argv = [sys.executable, "-m", "coldstart.engine_adapters.transformers_entry", "serve", model]
        argv += ["--host", config.host, "--port", str(config.port), *config.engine_args]
        env = {"HF_HUB_OFFLINE": "1"} if model.startswith("/") else {}
        return LaunchSpec(argv=argv, env={**env, **self.hooks_env(config), "PYTHONUNBUFFERED": "1"})
