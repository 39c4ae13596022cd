"""A federation through the console scripts with one data-parallel agent (two gloo processes, `nproc: 2`) and
one ordinary agent, under mTLS: the two-process agent registers, uploads and is counted as one agent; one of
its worker processes is killed during the run, which fails that agent's round cleanly (the coordinator stops
waiting for it) and the agent trains again in a later round."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from rig import processes

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 4


def federation_config(run_dir: Path) -> dict[str, Any]:
    return {
        "coordinator": {
            "planner": "uniform",
            "run": {"rounds": ROUNDS, "min_agents": 2, "run_dir": str(run_dir), "round_deadline_s": 240,
                    "registration_timeout_s": 240, "finish_grace_s": 10, "quorum": 1},
            "lora": {"rank": 4, "alpha": 8},
            "selection": {"mode": "all"},
            "training": {"batch_size": 8, "max_steps": 12, "max_seq_len": 32, "learning_rate": 0.002},
            "evaluation": {"agents": False, "initial": False, "heldout": None},
        },
        "agents": {
            "count": 2,
            "config": {"threads": 1, "data": {"max_samples": 120, "val_fraction": 0.1},
                       "calibration": {"enabled": False}},
            "overrides": {"agent-1": {"nproc": 2}},
        },
    }  # fmt: skip


def ranks_of(run_dir: Path, agent_id: str) -> list[int]:
    """The training ranks the fedpipe-agent running with this agent's config file spawned (multiprocessing's
    resource tracker left out)."""
    config = str(run_dir / f"{agent_id}.yaml")
    everything = processes()
    agents = {pid for pid, _, command in everything if config in command and "fedpipe-agent" in command}
    return [pid for pid, parent, command in everything if parent in agents and "spawn_main" in command]


def rounds_done(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "rounds.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str], list[int]]:
    base = tmp_path_factory.mktemp("parallel-federation")
    run_dir = base / "run"
    config = base / "federation.yaml"
    config.write_text(yaml.safe_dump(federation_config(run_dir)))
    command = [
        sys.executable,
        str(ROOT / "deploy" / "local_federation.py"),
        "--config",
        str(config),
        "--timeout",
        "900",
    ]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    killed: list[int] = []
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and launcher.poll() is None:
            done = [r for r in rounds_done(run_dir) if r["round"] >= 1]
            helpers = ranks_of(run_dir, "agent-1")
            if done and helpers and not killed:
                # After round 1: round 2 is training (or about to); one helper rank dies without warning.
                time.sleep(1.0)
                os.kill(helpers[0], signal.SIGKILL)
                killed.append(helpers[0])
            time.sleep(0.2)
        out, err = launcher.communicate(timeout=600)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    return run_dir, subprocess.CompletedProcess(command, launcher.returncode, out, err), killed


@pytest.mark.integration
def test_a_two_process_agent_trains_and_recovers_from_a_killed_rank(
    run: tuple[Path, subprocess.CompletedProcess[str], list[int]],
) -> None:
    run_dir, proc, killed = run
    assert proc.returncode == 0, f"federation failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert killed, "the test must have killed one of agent-1's worker processes"
    rounds = [r for r in rounds_done(run_dir) if r["round"] >= 1]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    with_both = [r["round"] for r in rounds if set(r["agents"]) == {"agent-1", "agent-2"}]
    without = [r["round"] for r in rounds if "agent-1" not in r["agents"]]
    assert with_both[0] == 1, "both agents train round 1, agent-1 as one agent over its two processes"
    assert len(without) == 1 and without[0] >= 2, f"agent-1 loses exactly the round its rank died in: {rounds}"
    assert any(r > without[0] for r in with_both), "agent-1 must train again after the failed round"
    agent_log = (run_dir / "logs" / "agent-1.log").read_text()
    assert "process group: 2 ranks on cpu, cpu over gloo" in agent_log
    assert "the process group failed" in agent_log and "restarts its group" in agent_log
    coordinator_log = (run_dir / "coordinator.log").read_text()
    assert f"round {without[0]}: agent-1 registered again mid-round" in coordinator_log
    plans = json.loads((run_dir / "rounds" / "0001" / "plans.json").read_text())
    assert plans["agent-1"]["plan"]["batch_size"] == 8  # one plan, split over the ranks by the agent itself
    assert "agent agent-1 registered: cpu" in coordinator_log and "2 devices" in coordinator_log
