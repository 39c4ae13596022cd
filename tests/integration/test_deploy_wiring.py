"""Ports and TLS agree across every deployment file, and every configuration the files hand the coordinator
or an agent (YAML, environment, flags, the image's ENV) builds with the product's own config classes."""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml
from deploy_files import (
    AGENT_METRICS_PORT,
    COORDINATOR_METRICS_PORT,
    DEPLOY,
    ENV_PREFIXES,
    GRPC_PORT,
    IMAGES,
    K8S,
    PROMETHEUS,
    SYSTEMD,
    build_with,
    certs_arguments,
    compose,
    container_env,
    dns_names,
    dockerfile_stages,
    env_key,
    field_path,
    image_stage,
    k8s_object,
    kubernetes_expand,
    load_one,
    manifests,
    mounted_config,
    run,
    secret_files,
    under,
    unit_entries,
)
from pydantic_settings import BaseSettings

from common.certs import certs_main, common_name
from common.settings import build
from coordinator.config import CoordinatorConfig
from edge_agent.config import AgentConfig

pytestmark = pytest.mark.integration


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
