"""Every YAML file in deploy/ parses, and the Kubernetes manifests match the API schemas and keep the
coordinator's state and the agents' identities right."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_files import (
    AGENT_METRICS_PORT,
    DEPLOY,
    K8S,
    KUBERNETES_VERSIONS,
    k8s_object,
    load_all,
    load_one,
    manifests,
    under,
    yaml_files,
)

pytestmark = pytest.mark.integration


# ------------------------------------------------------------------------------------------- YAML parsing


@pytest.mark.parametrize("path", yaml_files(), ids=lambda path: str(path.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path: Path) -> None:
    """Each YAML file under deploy/ is well-formed and holds at least one document."""
    # Execute
    documents = load_all(path)

    # Assert
    assert documents, f"{path} is empty"


# ------------------------------------------------------------------------------------------ Kubernetes


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_manifests_match_the_api_schemas(version: str) -> None:
    """Every object validates strictly (no unknown fields) against that Kubernetes version's schemas."""
    # Prepare
    validator: Any = pytest.importorskip("kubernetes_validate")
    objects = manifests()

    # Execute
    problems = []
    for path, doc in objects:
        try:
            validator.validate(doc, version, strict=True)
        except Exception as err:  # the validator's own errors carry the schema path of the problem
            problems.append(f"{path.name} {doc['kind']}/{doc['metadata']['name']}: {err}")

    # Assert
    assert {doc["kind"] for _, doc in objects} >= {"Namespace", "ConfigMap", "Deployment", "StatefulSet", "Service"}
    assert not problems, "\n".join(problems)


def test_kustomization_applies_the_manifests_but_not_the_placeholder_secrets() -> None:
    """kustomization.yaml lists existing files, leaves secrets.yaml out, and retags images the manifests use."""
    # Prepare
    kustomization = load_one(K8S / "kustomization.yaml")
    images = {
        container["image"].split(":")[0]
        for _, doc in manifests()
        if doc["kind"] in {"Deployment", "StatefulSet"}
        for container in doc["spec"]["template"]["spec"]["containers"]
    }

    # Execute
    resources = kustomization["resources"]

    # Assert
    assert all((K8S / resource).is_file() for resource in resources), resources
    assert "secrets.yaml" not in resources
    assert set(resources) == {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml", "secrets.yaml"}
    assert {image["name"] for image in kustomization["images"]} == images
    assert all(
        doc["metadata"].get("namespace") == kustomization["namespace"]
        for _, doc in manifests()
        if doc["kind"] != "Namespace"
    )


def test_kubernetes_coordinator_owns_its_run_directory_alone() -> None:
    """A serving coordinator: one replica, Recreate, its state directory (queue and runs) on a PersistentVolumeClaim,
    probes that need no client certificate."""
    # Prepare
    deployment = k8s_object("Deployment", "fedpipe-coordinator")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
    }
    config = yaml.safe_load(k8s_object("ConfigMap", "fedpipe-coordinator-config")["data"]["coordinator.yaml"])

    # Execute
    run_mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] in claims)

    # Assert
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert k8s_object("PersistentVolumeClaim", claims[next(iter(claims))])
    assert container["args"][0] == "serve" and "run_dir" not in config["run"]
    assert under(config["service"]["state_dir"], run_mount)
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert "grpc" not in container["readinessProbe"] and "grpc" not in container["livenessProbe"]


def test_kubernetes_agents_are_gpu_pods_named_after_their_ids() -> None:
    """The StatefulSet has a headless Service, a GPU limit, GPU node placement, readiness on /readyz, scrape hints."""
    # Prepare
    statefulset = k8s_object("StatefulSet", "fedpipe-agent")
    template = statefulset["spec"]["template"]
    container = template["spec"]["containers"][0]

    # Execute
    service = k8s_object("Service", statefulset["spec"]["serviceName"])

    # Assert
    assert service["spec"]["clusterIP"] == "None"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert template["spec"]["nodeSelector"] and template["spec"]["tolerations"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert template["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(AGENT_METRICS_PORT)
    assert container["env"][0] == {
        "name": "FEDPIPE_AGENT_AGENT_ID",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
    }
