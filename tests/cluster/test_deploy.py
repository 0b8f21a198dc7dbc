"""``deploy/raycluster.yaml`` against the Kubernetes schemas (PyPI ``kubernetes-validate``; no cluster).

Built-in kinds are validated as they are. The RayCluster is a custom resource (KubeRay's CRD, not in the
Kubernetes schemas): each of its pod templates is validated as a ``v1 PodTemplate``, and the fields of the
CRD this example relies on are checked by hand (what KubeRay reads, with the types it expects).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

kubernetes_validate = pytest.importorskip("kubernetes_validate")
yaml = pytest.importorskip("yaml")

MANIFEST = Path(__file__).parents[2] / "deploy" / "raycluster.yaml"
K8S_VERSION = "1.30.0"


def documents() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def validate(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_every_builtin_kind_is_valid() -> None:
    docs = [d for d in documents() if d["apiVersion"] != "ray.io/v1"]
    assert {d["kind"] for d in docs} >= {
        "Secret",
        "ConfigMap",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
    }
    for doc in docs:
        validate(doc)


def test_raycluster_pod_templates_are_valid_and_privileged_with_the_node_store() -> None:
    (cluster,) = [d for d in documents() if d["kind"] == "RayCluster"]
    spec = cluster["spec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
        validate({**template, "template": group["template"]})
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())  # map[string]string
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        assert container["securityContext"]["privileged"] is True  # CRIU, network namespaces
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["COLDSTART_NODE_CONFIG"] == "/etc/coldstart/node.json"
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts["/var/lib/coldstart"]]["hostPath"]["path"] == "/var/lib/coldstart"
    for worker in spec["workerGroupSpecs"]:
        assert {"groupName", "replicas", "minReplicas", "maxReplicas"} <= set(worker)
        assert worker["minReplicas"] <= worker["replicas"] <= worker["maxReplicas"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["ray-client-server-port"] == "10001"


def test_the_node_settings_in_the_secret_are_what_nodes_read() -> None:
    import json

    from coldstart.launcher.cluster.node import NodeSettings

    (secret,) = [
        d for d in documents() if d["kind"] == "Secret" and d["metadata"]["name"] == "coldstart-node"
    ]
    settings = NodeSettings.from_json(json.loads(secret["stringData"]["node.json"]))
    assert settings.publish_to is not None and str(settings.publish_to) in settings.tiers


def test_a_broken_manifest_is_refused() -> None:
    (deployment, *_) = [d for d in documents() if d["kind"] == "Deployment"]
    broken = {**deployment, "spec": {**deployment["spec"], "replicas": "one"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)
