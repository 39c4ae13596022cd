"""Agents that outlive a run (after_finish: next-run): one agent process trains in two runs of two coordinator
processes on the same address, then waits for a third and stops cleanly on SIGTERM."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from deploy.local_federation import Federation

WAIT_S = 240.0


def wait_until(what: str, check: Callable[[], bool], fed: Federation) -> None:
    end = time.monotonic() + WAIT_S
    while not check():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}; agent log:\n{fed.log('agent-1')[-3000:]}")
        time.sleep(0.2)


@pytest.mark.integration
def test_an_agent_with_after_finish_next_run_joins_the_next_coordinators_run(tmp_path: Path) -> None:
    # Prepare: one agent, runs of one short round; the agent re-registers every second once a run is over.
    run_dir = tmp_path / "run"
    spec = {
        "coordinator": {
            "insecure": True,
            "planner": "uniform",
            "run": {"rounds": 1, "min_agents": 1, "registration_timeout_s": 180, "finish_grace_s": 2},
            "lora": {"rank": 4, "alpha": 8, "targets": ["query", "value"]},
            "selection": {"mode": "all"},
            "training": {"batch_size": 8, "max_steps": 3, "max_seq_len": 32},
            "evaluation": {"agents": False, "initial": False, "heldout": None},
        },
        "agents": {
            "count": 1,
            "config": {
                "insecure": True,
                "threads": 1,
                "poll_wait_s": 1,
                "after_finish": "next-run",
                "calibration": {"enabled": False},
                "data": {"max_samples": 60, "val_fraction": 0.1},
            },
        },
    }
    with Federation(spec, run_dir) as fed:
        fed.start_coordinator()
        assert fed.wait_serving()
        agent = fed.start_agent("agent-1")
        first = fed.coordinator
        assert first is not None
        wait_until("the first run to end", lambda: first.poll() is not None, fed)
        wait_until("the agent to wait", lambda: "waiting for the coordinator's next run" in fed.log("agent-1"), fed)

        # Execute: a second coordinator process on the same address, for a fresh run in its own directory.
        config = yaml.safe_load(fed.coordinator_yaml.read_text())
        config["run"]["run_dir"] = str(tmp_path / "second")
        fed.coordinator_yaml.write_text(yaml.safe_dump(config))
        second = fed.start_coordinator()
        wait_until("the second run to end", lambda: second.poll() is not None, fed)
        wait_until(
            "the agent to wait again",
            lambda: fed.log("agent-1").count("waiting for the coordinator's next run") == 2,
            fed,
        )
        alive = agent.poll() is None
        agent.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        code = agent.wait(timeout=30)
        took = time.monotonic() - stopped

    # Assert: both runs finished with the agent's update, the agent joined the second by itself, stayed up
    # after it, and a SIGTERM while it waits ends it at once and cleanly.
    assert first.returncode == 0 and second.returncode == 0
    runs = re.findall(r"finished run (\w+)", fed.log("agent-1"))
    joined = re.findall(r"joined run (\w+)", fed.log("agent-1"))
    assert len(runs) == 2 and runs[0] != runs[1] and joined == [runs[1]]
    for log in (fed.log("coordinator"), fed.log("coordinator", 2)):
        assert "round 1: update from agent-1 accepted" in log
    assert alive
    assert code == 0 and took < 10
