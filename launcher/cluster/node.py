"""A coldstart node of a Ray cluster: its units, its snapshot store and its tiers, and the ``ray start`` line.

A node is a Ray node started by ``coldstart node start`` (``cli/node.py``), which writes the node's settings
to a JSON file and starts Ray with ``COLDSTART_NODE_CONFIG`` pointing at it. Every replica actor Ray places
on the node inherits that variable from the raylet and reads the file (``NodeSettings.load``): the node's
snapshot directory, its work directory, where it pulls snapshots from and where it publishes the ones it
takes. The deployment's own ``ServeConfig`` says *what* runs (engine, model, args, checkpointer, canary);
the node says *where its files live* -- two nodes of one deployment have different stores.

Why a file named by one variable and not Ray node labels: label values are Kubernetes label values (63
characters, no ``/``), too narrow for paths and URLs; and custom resources carry numbers only.

Units: CPU units are the custom resource ``coldstart_slot`` (one per replica a node may hold); GPU units are
Ray's own ``GPU`` resource.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coldstart.launcher.atomic import write_text_atomic
from coldstart.launcher.errors import UsageError

CONFIG_ENV = "COLDSTART_NODE_CONFIG"
CONFIG_NAME = "coldstart-node.json"  # beside Ray's temp dir of the node
SLOT = "coldstart_slot"  # the Ray custom resource a CPU unit is
NAMESPACE = "coldstart"  # the Ray namespace of every replica actor


@dataclass(frozen=True)
class NodeSettings:
    snapshot_dir: Path
    work_dir: Path
    tiers: tuple[str, ...] = ()  # nearest first, origin last: where this node pulls snapshots from
    publish_to: Path | None = None  # the chunk store this node publishes the snapshots it takes into
    chunk_cache: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "snapshot_dir": str(self.snapshot_dir),
            "work_dir": str(self.work_dir),
            "tiers": list(self.tiers),
            "publish_to": str(self.publish_to) if self.publish_to else None,
            "chunk_cache": str(self.chunk_cache) if self.chunk_cache else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NodeSettings:
        return cls(
            snapshot_dir=Path(data["snapshot_dir"]),
            work_dir=Path(data["work_dir"]),
            tiers=tuple(data.get("tiers") or ()),
            publish_to=Path(data["publish_to"]) if data.get("publish_to") else None,
            chunk_cache=Path(data["chunk_cache"]) if data.get("chunk_cache") else None,
        )

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(self.to_json(), indent=2))

    @classmethod
    def load(cls) -> NodeSettings:
        """This node's settings, from the file ``COLDSTART_NODE_CONFIG`` names (set by ``coldstart node
        start``). A node started with a bare ``ray start`` has none: the error says what to run."""
        name = os.environ.get(CONFIG_ENV)
        if not name:
            raise UsageError(
                f"this Ray node was not started by 'coldstart node start' (no {CONFIG_ENV}); "
                "start it with: coldstart node start --address HEAD:6379 --units N --snapshot-dir DIR"
            )
        try:
            return cls.from_json(json.loads(Path(name).read_text()))
        except (OSError, ValueError, KeyError) as exc:
            raise UsageError(f"{CONFIG_ENV}={name}: cannot read the node's settings ({exc})") from exc


def with_node(config: Any, node: NodeSettings) -> Any:
    """A deployment's ``ServeConfig`` with this node's snapshot store, work directory and tiers."""
    return dataclasses.replace(
        config,
        snapshot_dir=node.snapshot_dir,
        work_dir=node.work_dir,
        snapshot_tiers=",".join(node.tiers) or None,
        snapshot_cache=node.chunk_cache,
        snapshot_publish=None,  # the actor publishes itself (it must know when the publish is done)
    )


@dataclass(frozen=True)
class NodeStart:
    """What ``coldstart node start`` turns into a ``ray start`` line."""

    settings: NodeSettings
    head: bool
    address: str | None  # HEAD:6379 for a worker
    node_ip: str | None
    units: int  # CPU units (coldstart_slot); GPUs are found by Ray itself
    temp_dir: Path
    port: int = 6379
    client_port: int = 10001
    object_store_bytes: int = 100_000_000

    def argv(self, ray: str = "ray") -> list[str]:
        argv = [ray, "start", "--num-cpus", "1", "--disable-usage-stats"]
        argv += ["--object-store-memory", str(self.object_store_bytes), "--temp-dir", str(self.temp_dir)]
        if self.units:
            argv += ["--resources", json.dumps({SLOT: self.units})]
        if self.node_ip:
            argv += ["--node-ip-address", self.node_ip]
        if self.head:
            argv += ["--head", "--port", str(self.port), "--include-dashboard=false"]
            argv += ["--ray-client-server-port", str(self.client_port)]
        else:
            if not self.address:
                raise UsageError("a worker node needs --address HEAD:6379 (or --head for the first node)")
            argv += ["--address", self.address]
        return argv

    @property
    def config_path(self) -> Path:
        return self.temp_dir / CONFIG_NAME
