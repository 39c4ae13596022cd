"""Crashes with real processes over mTLS on 127.0.0.1: kill -9 an agent mid-round, kill -9 the coordinator
mid-round; the run goes on, loses nothing it had saved, and nobody restarts agents by hand.

Each test prints a RELIABILITY line with its figures (pytest -s shows them; RELIABILITY.md quotes them).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from common.ferret import weights_digest
from deploy.local_federation import Federation

pytestmark = pytest.mark.integration

WAIT_S = 240.0


def spec(
    run_dir: Path,
    agents: int,
    rounds: int,
    overrides: dict[str, Any] | None = None,
    aggregation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Tiny real training: MiniLM, LoRA rank 4 on query/value, a few steps per round, no evaluation."""
    return {
        "coordinator": {
            "planner": "uniform",
            "run": {
                "rounds": rounds,
                "min_agents": agents,
                "quorum": agents - 1 if agents > 2 else agents,
                "run_dir": str(run_dir),
                "round_deadline_s": 120,
                "registration_timeout_s": 180,
                "heartbeat_interval_s": 1,
                "agent_timeout_s": 6,
                "finish_grace_s": 10,
            },
            "lora": {"rank": 4, "alpha": 8, "targets": ["query", "value"]},
            "selection": {"mode": "all"},
            "training": {"batch_size": 8, "max_steps": 6, "max_seq_len": 32},
            "evaluation": {"agents": False, "initial": False, "heldout": None},
            "aggregation": aggregation or {},
        },
        "agents": {
            "count": agents,
            "config": {
                "threads": 1,
                "reconnect_s": 300,
                "calibration": {"enabled": False},
                "data": {"max_samples": 120, "val_fraction": 0.1},
            },
            "overrides": overrides or {},
        },
    }


def wait_until(what: str, check: Callable[[], bool], fed: Federation, timeout_s: float = WAIT_S) -> float:
    """Poll check until it holds; returns the seconds waited. Fails with the coordinator's log tail."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout_s:
            tail = "\n".join(fed.log("coordinator", fed.starts["coordinator"]).splitlines()[-40:])
            pytest.fail(f"timed out waiting for {what}; coordinator log:\n{tail}")
        time.sleep(0.2)
    return time.monotonic() - start


def in_log(fed: Federation, name: str, pattern: str, start: int = 1) -> Callable[[], bool]:
    """A check that a regular expression occurs in a process's log."""
    return lambda: re.search(pattern, fed.log(name, start)) is not None


def assert_valid_adapter(directory: Path) -> None:
    """A peft adapter directory whose tensors are all finite and LoRA-shaped."""
    config = json.loads((directory / "adapter_config.json").read_text())
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    assert config["peft_type"] == "LORA" and tensors
    assert all(bool(t.isfinite().all()) for t in tensors.values())
    assert any(name.endswith("lora_A.weight") for name in tensors)


def test_agent_killed_mid_round_round_closes_with_the_rest_and_the_agent_rejoins(tmp_path: Path) -> None:
    # Prepare: four agents; agent-4 runs at a quarter of a core, so it is still training when the others are done
    run_dir = tmp_path / "run"
    overrides = {"agent-4": {"compute_share": 0.25}}
    with Federation(spec(run_dir, agents=4, rounds=3, overrides=overrides), run_dir) as fed:
        fed.start_coordinator()
        assert fed.wait_serving()
        for agent_id in fed.agent_ids:
            fed.start_agent(agent_id)
        wait_until("round 1 to start", in_log(fed, "coordinator", r"round 1/3: training on 4 agents"), fed)
        wait_until(
            "a first update in round 1", in_log(fed, "coordinator", r"round 1: update from agent-\d accepted"), fed
        )

        # Execute: kill -9 agent-4 mid-round, restart it once round 1 has closed
        assert "round 1: update from agent-4" not in fed.log("coordinator")
        os.kill(fed.agents["agent-4"].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until("round 1 to close", lambda: len(fed.rounds_done()) >= 1, fed)
        closed_after = time.monotonic() - killed_at
        fed.start_agent("agent-4")
        coordinator = fed.coordinator
        assert coordinator is not None
        wait_until("the run to finish", lambda: coordinator.poll() is not None, fed)

        # Assert: round 1 closed with the other three, its adapter is valid, and agent-4 came back for a later round
        assert coordinator.returncode == 0, fed.log("coordinator")[-3000:]
        records = fed.rounds_done()
        assert [r["round"] for r in records] == [1, 2, 3]
        assert sorted(records[0]["agents"]) == ["agent-1", "agent-2", "agent-3"]
        assert records[0]["dropped"] == ["agent-4"]
        log = fed.log("coordinator")
        assert "agent agent-4 missed heartbeats for 6s: marked dead" in log
        assert_valid_adapter(run_dir / "rounds" / "0001")
        assert_valid_adapter(run_dir / "final")
        rejoined = [r["round"] for r in records[1:] if "agent-4" in r["agents"]]
        assert rejoined, f"agent-4 did not rejoin: {records}"
        assert fed.agents["agent-4"].wait(timeout=60) == 0
        print(
            f"RELIABILITY agent-kill: 4 agents, agent-4 killed mid-round 1, round 1 closed {closed_after:.1f}s later "
            f"with 3 updates; restarted agent-4 rejoined in round {rejoined[0]}; rounds completed "
            f"{len(records)}/3"
        )


def test_coordinator_killed_mid_round_resumes_with_the_saved_global_and_agents_carry_on(tmp_path: Path) -> None:
    # Prepare: two agents, three rounds under FedAdam, whose moments must survive the crash with the global;
    # wait for round 1 to be saved and round 2 to be under way
    run_dir = tmp_path / "run"
    with Federation(spec(run_dir, agents=2, rounds=3, aggregation={"server_optimizer": "fedadam"}), run_dir) as fed:
        fed.start_coordinator()
        assert fed.wait_serving()
        for agent_id in fed.agent_ids:
            fed.start_agent(agent_id)
        wait_until("round 2 to start", in_log(fed, "coordinator", r"round 2/3: training on 2 agents"), fed)
        state = json.loads((run_dir / "state" / "state.json").read_text())
        assert state["round"] == 1
        agents_before = {a: p.pid for a, p in fed.agents.items()}

        # Execute: kill -9 the coordinator mid-round 2 and start it again on the same run directory
        coordinator = fed.coordinator
        assert coordinator is not None
        os.kill(coordinator.pid, signal.SIGKILL)
        coordinator.wait()
        restarted_at = time.monotonic()
        restarted = fed.start_coordinator()
        wait_until("the resume", in_log(fed, "coordinator", r"resuming run \w+ after round 1", 2), fed)
        resumed_s = time.monotonic() - restarted_at
        wait_until("round 2 again", in_log(fed, "coordinator", r"round 2/3: training on 2 agents", 2), fed)
        training_s = time.monotonic() - restarted_at
        wait_until("the run to finish", lambda: restarted.poll() is not None, fed)

        # Assert: resumed from round 1 with the very global saved before the crash, and finished with the same agents
        assert restarted.returncode == 0, fed.log("coordinator", 2)[-3000:]
        log = fed.log("coordinator", 2)
        match = re.search(
            r"resuming run (\w+) after round 1 from .* \(global sha256 ([0-9a-f]{64}), strategy state sha256 "
            r"([0-9a-f]{64})",
            log,
        )
        assert match is not None, log[-2000:]
        assert match.group(1) == state["run_id"]
        assert match.group(2) == state["global_sha256"]
        # the moments came back as saved (load_state refuses a state whose tensors do not match this digest)
        assert match.group(3) == state["strategy_sha256"] != weights_digest({})
        records = fed.rounds_done()
        assert [r["round"] for r in records] == [1, 2, 3]
        assert all(sorted(r["agents"]) == ["agent-1", "agent-2"] for r in records)
        assert json.loads((run_dir / "summary.json").read_text())["final_round"] == 3
        assert_valid_adapter(run_dir / "final")
        assert {a: p.pid for a, p in fed.agents.items()} == agents_before, "no agent was restarted"
        assert all(p.wait(timeout=60) == 0 for p in fed.agents.values())
        print(
            f"RELIABILITY coordinator-kill: killed mid-round 2 (FedAdam), resumed after round 1 "
            f"(global and moments, same sha256) "
            f"{resumed_s:.1f}s after restart, round 2 training again after {training_s:.1f}s; "
            f"rounds completed 3/3, agents restarted 0"
        )
