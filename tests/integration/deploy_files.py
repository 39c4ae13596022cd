"""What the deployment tests share: where the files are, how to read them, and how to build the
configurations they hand the coordinator and agents with the product's own config classes."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import pytest
import yaml
from cryptography import x509
from pydantic import BaseModel
from pydantic_settings import BaseSettings

from common.settings import build
from coordinator.config import CoordinatorConfig
from edge_agent.config import AgentConfig

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROMETHEUS = DEPLOY / "prometheus"
SYSTEMD = DEPLOY / "systemd"
COMPOSE = DEPLOY / "compose.yaml"
DASHBOARD = DEPLOY / "grafana" / "fedpipe.json"
METRICS_DOC = ROOT / "docs" / "metrics.md"

GRPC_PORT, COORDINATOR_METRICS_PORT, AGENT_METRICS_PORT = 50051, 9400, 9401
KUBERNETES_VERSIONS = ("1.30", "1.37")  # the oldest version still commonly run, and the newest the validator ships
# Which Dockerfile (and target stage) each image named in compose and Kubernetes is built from.
IMAGES = {
    "fedpipe/coordinator": ("Dockerfile", "coordinator"),
    "fedpipe/agent": ("Dockerfile", "agent"),
    "fedpipe/agent-cuda": ("Dockerfile.cuda", "agent"),
    "fedpipe/coordinator-cuda": ("Dockerfile.cuda", "coordinator"),
}
ENV_PREFIXES: dict[str, type[BaseSettings]] = {"FEDPIPE_COORDINATOR_": CoordinatorConfig, "FEDPIPE_AGENT_": AgentConfig}
S = TypeVar("S", bound=BaseSettings)


# ------------------------------------------------------------------------------------------------ helpers


def run(argv: Sequence[str], cwd: Path = ROOT, timeout: float = 120, env: Mapping[str, str] | None = None) -> str:
    """Run a command; fail the test with its output unless it exits 0. Returns stdout and stderr together."""
    result = subprocess.run(
        list(argv), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=None if env is None else dict(env)
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(argv)} exited {result.returncode}:\n{output}"
    return output


def yaml_files() -> list[Path]:
    """Every YAML file under deploy/, the systemd config examples included."""
    found = [*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml.example")]
    return sorted(set(found))


def load_all(path: Path) -> list[Any]:
    """The non-empty documents of a YAML file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def load_one(path: Path) -> dict[str, Any]:
    """A YAML file holding one mapping."""
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path}: expected a mapping"
    return data


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    """(file, document) for every Kubernetes object under deploy/k8s/ (the Kustomization is not one)."""
    return [
        (path, doc) for path in sorted(K8S.glob("*.yaml")) for doc in load_all(path) if doc["kind"] != "Kustomization"
    ]


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    """The Kubernetes object of that kind and name."""
    found = [doc for _, doc in manifests() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def compose() -> dict[str, Any]:
    """deploy/compose.yaml with its anchors and merge keys resolved."""
    return load_one(COMPOSE)


def documented_metrics() -> dict[str, str]:
    """name -> type from the tables of docs/metrics.md (first column)."""
    rows = re.findall(r"^\| `(fedpipe_[a-z0-9_]+)` \| (\w+) \|", METRICS_DOC.read_text(), flags=re.MULTILINE)
    assert len(rows) > 20, "docs/metrics.md: the metric tables were not found"
    return dict(rows)


def metric_names(text: str) -> set[str]:
    """fedpipe_* names mentioned in a PromQL expression or an annotation."""
    return set(re.findall(r"(?<![\w-])fedpipe_[a-z0-9_]*[a-z0-9]", text))


def undocumented(names: set[str], documented: Mapping[str, str]) -> set[str]:
    """The names that are neither documented nor a documented histogram's _bucket/_sum/_count series."""
    missing = set()
    for name in names:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if name not in documented and documented.get(base) != "histogram":
            missing.add(name)
    return missing


def dashboard() -> dict[str, Any]:
    """The Grafana dashboard."""
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel, rows and panels nested in collapsed rows included."""
    panels: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and annotation query of the dashboard."""
    queries = [
        (f"panel {panel['id']} {target['refId']}", target["expr"])
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
    ]
    for annotation in dashboard()["annotations"]["list"]:
        if "expr" in annotation:
            queries.append((f"annotation {annotation['name']}", annotation["expr"]))
    return queries


def alert_rules() -> list[dict[str, Any]]:
    """Every rule of deploy/prometheus/alerts.yml."""
    return [rule for group in load_one(PROMETHEUS / "alerts.yml")["groups"] for rule in group["rules"]]


@dataclass(frozen=True)
class Stage:
    """One stage of a Dockerfile: its parent stage (if it builds on one) and its ENV, EXPOSE and other lines."""

    parent: str | None
    env: dict[str, str]
    expose: list[int]
    instructions: list[str]


def dockerfile_stages(name: str) -> dict[str, Stage]:
    """The stages of deploy/docker/<name>, with continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "docker" / name).read_text())
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--\S+\s+)*(\S+)\s+AS\s+(\S+)", rest, flags=re.IGNORECASE)
            assert match, f"{name}: every stage is named: {line!r}"
            base, stage = match.groups()
            current = stages[stage] = Stage(base if base in stages else None, {}, [], [])
        elif current is not None:
            current.instructions.append(line)
            if keyword == "ENV":
                for pair in shlex.split(rest):
                    key, _, value = pair.partition("=")
                    current.env[key] = value
            elif keyword == "EXPOSE":
                current.expose.extend(int(port.split("/")[0]) for port in rest.split())
    return stages


def image_stage(image: str) -> tuple[Stage, dict[str, str]]:
    """The final stage an image is built from, and the environment it inherits along its stages."""
    dockerfile, target = IMAGES[image.split(":")[0]]
    stages = dockerfile_stages(dockerfile)
    chain: list[Stage] = []
    name: str | None = target
    while name is not None:
        chain.append(stages[name])
        name = stages[name].parent
    env: dict[str, str] = {}
    for stage in reversed(chain):
        env.update(stage.env)
    return stages[target], env


def field_path(settings: type[BaseModel], dotted: Sequence[str]) -> bool:
    """Whether the key path names a leaf field (a value, not a section) of the config class."""
    model: type[BaseModel] = settings
    for i, part in enumerate(dotted):
        field = model.model_fields.get(part)
        if field is None:
            return False
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
            continue
        return i == len(dotted) - 1
    return False


def env_key(name: str) -> tuple[type[BaseSettings], list[str]] | None:
    """(config class, key path) of a FEDPIPE_COORDINATOR_*/FEDPIPE_AGENT_* variable; None for other variables."""
    for prefix, settings in ENV_PREFIXES.items():
        if name.startswith(prefix):
            return settings, name[len(prefix) :].lower().split("__")
    return None


def build_with(
    monkeypatch: pytest.MonkeyPatch, settings: type[S], env: Mapping[str, str], argv: Sequence[str] = ()
) -> S:
    """Build a config as the process would: only `env` in the environment (no stray FEDPIPE_* of ours), plus argv."""
    for name in list(os.environ):
        if name.startswith("FEDPIPE_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return build(settings, list(argv), "test")


def kubernetes_expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of env values, command and args: $$ is a literal $, and an unknown or unclosed
    $(VAR) stays as written (what follows it included, up to the closing parenthesis)."""
    out: list[str] = []
    i = 0
    while i < len(value):
        if value.startswith("$$", i):
            out.append("$")
            i += 2
        elif value.startswith("$(", i):
            end = value.find(")", i)
            if end < 0:
                out.append(value[i:])
                break
            out.append(env.get(value[i + 2 : end], value[i : end + 1]))
            i = end + 1
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def container_env(container: Mapping[str, Any], pod_name: str) -> dict[str, str]:
    """A container's environment as Kubernetes builds it (fieldRef metadata.name only), in order."""
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = kubernetes_expand(str(entry["value"]), env)
        else:
            assert entry["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", entry
            env[entry["name"]] = pod_name
    return env


def mounted_config(tmp_path: Path, pod: Mapping[str, Any], container: Mapping[str, Any]) -> dict[str, Path]:
    """Write the ConfigMaps a container mounts into tmp_path; map each file's in-container path to its copy."""
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    files: dict[str, Path] = {}
    for mount in container["volumeMounts"]:
        volume = volumes.get(mount["name"], {})
        if "configMap" in volume:
            config_map = k8s_object("ConfigMap", volume["configMap"]["name"])
            for key, text in config_map["data"].items():
                copy = tmp_path / mount["name"] / key
                copy.parent.mkdir(parents=True, exist_ok=True)
                copy.write_text(text)
                files[f"{mount['mountPath']}/{key}"] = copy
    return files


def secret_files(pod: Mapping[str, Any], container: Mapping[str, Any]) -> set[str]:
    """In-container paths of every Secret key a container mounts (keys from the placeholders in secrets.yaml)."""
    secrets = {doc["metadata"]["name"]: doc for doc in load_all(K8S / "secrets.yaml")}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    paths: set[str] = set()
    for mount in container["volumeMounts"]:
        volume = volumes.get(mount["name"], {})
        if "secret" in volume:
            secret = secrets[volume["secret"]["secretName"]]
            paths.update(f"{mount['mountPath']}/{key}" for key in secret["data"])
    return paths


def under(path: Path | str, directory: str) -> bool:
    """Whether a POSIX path lies in the directory."""
    return PurePosixPath(directory) in PurePosixPath(str(path)).parents


def unit_entries(path: Path) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values of a systemd unit (keys may repeat, which configparser rejects)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"{path.name}: not a key=value line in a section: {raw!r}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def certs_arguments(command: str) -> list[str]:
    """The arguments after `fedpipe-coordinator certs` in a shell command line."""
    words = shlex.split(command.replace("\\\n", " "))
    start = next(i for i, word in enumerate(words) if word == "certs" and words[i - 1] == "fedpipe-coordinator")
    end = next((i for i, word in enumerate(words) if i > start and word in {";", "&&", "||"}), len(words))
    return words[start + 1 : end]


def dns_names(cert: Path) -> list[str]:
    """The DNS names a certificate is valid for."""
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    return parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    )


def compose_command() -> list[str] | None:
    """`docker compose` (v2), or a standalone docker-compose that is v2; None when there is neither."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30).returncode == 0:
        return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    if standalone:
        result = subprocess.run([standalone, "version"], capture_output=True, text=True, timeout=30)
        if re.search(r"version v?([2-9]|\d\d)\.", result.stdout):
            return [standalone]
    return None
