"""The systemd units verify and are hardened."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
from deploy_files import (
    SYSTEMD,
    load_one,
    run,
    under,
    unit_entries,
)

pytestmark = pytest.mark.integration


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
