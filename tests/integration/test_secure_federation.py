"""Secure aggregation with real processes: fedpipe-coordinator and three fedpipe-agent processes through the
console scripts, real MiniLM training, each agent's change uploaded masked and the sum unmasked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_a_secure_federation_trains_and_only_masked_vectors_travel(tmp_path: Path) -> None:
    # Prepare
    run_dir = tmp_path / "run"
    spec = {
        "coordinator": {
            "strategy": "fedavg",
            "planner": "uniform",
            "run": {"rounds": 1, "min_agents": 3, "run_dir": str(run_dir), "round_deadline_s": 240,
                    "registration_timeout_s": 120, "finish_grace_s": 5},
            "selection": {"mode": "all"},
            "lora": {"rank": 4, "alpha": 8},
            "training": {"batch_size": 8, "max_steps": 3, "max_seq_len": 32},
            "evaluation": {"heldout": "embedded", "max_samples": 100, "agents": False},
            "privacy": {"secure_aggregation": {"enabled": True, "clip_norm": 5.0, "step_deadline_s": 60}},
        },
        "agents": {"count": 3, "config": {"threads": 1, "data": {"max_samples": 64, "val_fraction": 0.1}}},
    }  # fmt: skip
    config = tmp_path / "federation.yaml"
    config.write_text(yaml.safe_dump(spec))

    # Execute
    proc = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "local_federation.py"), "--config", str(config), "--timeout", "600"],
        capture_output=True, text=True, timeout=660, cwd=ROOT,
    )  # fmt: skip

    # Assert: the round aggregated all three, from masked uploads only
    assert proc.returncode == 0, f"federation failed:\n{proc.stdout}\n{proc.stderr}"
    records = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    trained = [r for r in records if r["round"] == 1]
    assert len(trained) == 1 and trained[0]["failure"] is None
    assert sorted(trained[0]["agents"]) == ["agent-1", "agent-2", "agent-3"]
    assert trained[0]["heldout"]["samples"] == 100
    coordinator_log = (run_dir / "logs" / "coordinator.log").read_text()
    assert "secure round" in coordinator_log and "3 participants" in coordinator_log
    assert coordinator_log.count("masked update from") == 3
    for agent in ("agent-1", "agent-2", "agent-3"):
        agent_log = (run_dir / "logs" / f"{agent}.log").read_text()
        assert "keys advertised for secure aggregation (signed)" in agent_log and "masked update sent" in agent_log
        assert "the keys of 2 neighbours are signed by their certificates" in agent_log  # the launcher's mTLS
