"""Clean stops: an agent told to stop while the coordinator is unreachable exits at once, the local launcher
stops every process it started on SIGTERM, and the launcher shards only the embedded data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from rig import processes_mentioning

from deploy.local_federation import Federation, free_ports, script

ROOT = Path(__file__).resolve().parents[2]


def wait_for(predicate: object, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if callable(predicate) and predicate():
            return True
        time.sleep(0.2)
    return False


def test_the_launcher_shards_the_embedded_data_and_leaves_an_agents_own_file_whole(tmp_path: Path) -> None:
    # Prepare: agent-2 is handed its own file, agent-3 its own file with an explicit shard
    spec = {
        "coordinator": {"insecure": True},
        "agents": {
            "count": 3,
            "config": {"insecure": True},
            "overrides": {
                "agent-2": {"data": {"path": "/data/site-2.csv"}},
                "agent-3": {"data": {"path": "/data/site-3.csv", "shard": "1/2"}},
            },
        },
    }

    # Execute
    Federation(spec, tmp_path / "run")
    data = {
        a: yaml.safe_load((tmp_path / "run" / f"{a}.yaml").read_text())["data"]
        for a in ("agent-1", "agent-2", "agent-3")
    }

    # Assert
    assert data["agent-1"] == {"shard": "1/3"}
    assert data["agent-2"] == {"path": "/data/site-2.csv"}
    assert data["agent-3"] == {"path": "/data/site-3.csv", "shard": "1/2"}


@pytest.mark.integration
def test_an_agent_stopped_while_the_coordinator_is_unreachable_exits_at_once(tmp_path: Path) -> None:
    # Prepare: nobody listens on the agent's coordinator address; its reconnect window is 15 minutes
    (port,) = free_ports(1)
    config = {
        "agent_id": "agent-1",
        "coordinator": f"127.0.0.1:{port}",
        "insecure": True,
        "calibration": {"enabled": False},
        "data": {"max_samples": 40},
        "metrics": {"port": 0},
        "threads": 1,
        "reconnect_s": 900,
    }
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(config))
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        agent = subprocess.Popen(
            [script("fedpipe-agent"), "--config", str(tmp_path / "agent.yaml")], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        assert wait_for(lambda: "failed (UNAVAILABLE)" in log.read_text(errors="replace"), 120), log.read_text()

        # Execute
        agent.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        code = agent.wait(timeout=30)

        # Assert: it stops within seconds, cleanly, and says why
        assert time.monotonic() - stopped < 10
        assert code == 0, log.read_text()
        text = log.read_text()
        assert "signal 15" in text and "stopping; the coordinator was unreachable" in text
    finally:
        if agent.poll() is None:
            agent.kill()


@pytest.mark.integration
def test_sigterm_to_the_launcher_stops_the_coordinator_and_every_agent(tmp_path: Path) -> None:
    # Prepare: a federation that would run for a while
    run_dir = tmp_path / "run"
    spec = {
        "coordinator": {
            "insecure": True,
            "run": {"rounds": 50, "min_agents": 2, "run_dir": str(run_dir), "registration_timeout_s": 120},
            "evaluation": {"agents": False, "initial": False},
        },
        "agents": {"count": 2, "config": {"insecure": True, "threads": 1, "calibration": {"enabled": False}}},
    }
    config = tmp_path / "federation.yaml"
    config.write_text(yaml.safe_dump(spec))
    launcher = subprocess.Popen(
        [sys.executable, str(ROOT / "deploy" / "local_federation.py"), "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        # every process up: the coordinator and both agents, their command lines naming the run directory
        assert wait_for(lambda: len(processes_mentioning(str(run_dir))) >= 3, 120), launcher.poll()

        # Execute
        launcher.send_signal(signal.SIGTERM)
        code = launcher.wait(timeout=60)

        # Assert: the launcher reports the signal and nothing it started is left running
        _, err = launcher.communicate(timeout=10)
        assert code == 128 + signal.SIGTERM, err
        assert "stopped by signal 15" in err
        assert wait_for(lambda: not processes_mentioning(str(run_dir)), 30), processes_mentioning(str(run_dir))
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for pid in processes_mentioning(str(run_dir)):
            os.kill(pid, signal.SIGKILL)
