"""The Ferret mode end to end over real gRPC and mTLS (console scripts, real training): after every round
each agent's weights hash equal to the coordinator's global; a killed coordinator resumes bit-identically; a
restarted agent resyncs with a full download and carries on in step; the result exports as a plain model.

Prints FERRET lines with the figures (pytest -s).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from common.ferret import weights_digest
from deploy.local_federation import Federation

pytestmark = pytest.mark.integration

WAIT_S = 600.0
DIGEST_LINE = re.compile(r"ferret: weights sha256 ([0-9a-f]{16}), the global of round (\d+)")


def spec(run_dir: Path, rounds: int, model: str = "embedded", agents: int = 2) -> dict[str, Any]:
    """Ferret on query/value (or q/v_proj), a few steps of 8 per round, 120 held-out tweets."""
    causal = model == "embedded-llm"
    return {
        "coordinator": {
            "planner": "uniform",
            "run": {"rounds": rounds, "min_agents": agents, "run_dir": str(run_dir), "round_deadline_s": 300,
                    "registration_timeout_s": 300, "finish_grace_s": 10, "heartbeat_interval_s": 1,
                    "agent_timeout_s": 10},
            "model": {"path": model},
            "lora": {"targets": ["q_proj", "v_proj"] if causal else ["query", "value"]},
            "selection": {"mode": "all"},
            "training": {"mode": "ferret", "batch_size": 4 if causal else 8, "max_steps": 3 if causal else 6,
                         "max_seq_len": 48, "learning_rate": 1e-4},
            "ferret": {"directions": 300},
            "evaluation": {"agents": True, "initial": False, "heldout": "embedded",
                           "max_samples": 40 if causal else 120},
        },
        "agents": {
            "count": agents,
            "config": {"threads": 1, "reconnect_s": 300, "model": {"path": model}, "calibration": {"enabled": False},
                       "data": {"max_samples": 60 if causal else 160, "val_fraction": 0.15}},
        },
    }  # fmt: skip


def coordinator_digests(run_dir: Path) -> dict[int, str]:
    """Round -> the first 16 hex digits of the digest of the global the coordinator saved for it."""
    digests = {}
    for directory in sorted((run_dir / "rounds").iterdir()):
        info = json.loads((directory / "fedpipe_ferret.json").read_text())
        tensors = load_file(str(directory / "weights.safetensors"))
        named = {b: tensors[f"{b}.weight"] for b in info["blocks"]} | {h: tensors[h] for h in info["heads"]}
        digests[int(info["round"])] = weights_digest(named)[:16]
    return digests


def agent_digests(fed: Federation, agent: str, start: int = 1) -> dict[int, str]:
    """Round -> the digest of the weights the agent held once in step with that round's global."""
    return {int(r): d for d, r in DIGEST_LINE.findall(fed.log(agent, start))}


def wait_until(what: str, check: Callable[[], bool], fed: Federation, timeout_s: float = WAIT_S) -> None:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"timed out waiting for {what}; coordinator log:\n{fed.log('coordinator')[-3000:]}")
        time.sleep(0.2)


def run_to_end(fed: Federation) -> None:
    coordinator = fed.start_coordinator()
    assert fed.wait_serving()
    for agent in fed.agent_ids:
        fed.start_agent(agent)
    wait_until("the run to finish", lambda: coordinator.poll() is not None, fed)
    assert coordinator.returncode == 0, fed.log("coordinator")[-3000:]


@pytest.mark.parametrize("model", ["embedded", "embedded-llm"], ids=["classifier", "causal-lm"])
def test_after_every_round_every_agent_holds_the_coordinators_weights_bit_for_bit(tmp_path: Path, model: str) -> None:
    # Prepare
    run_dir = tmp_path / "run"
    rounds = 2 if model == "embedded" else 1

    # Execute
    with Federation(spec(run_dir, rounds, model), run_dir) as fed:
        run_to_end(fed)
        mine = coordinator_digests(run_dir)
        theirs = {agent: agent_digests(fed, agent) for agent in fed.agent_ids}
        up = [json.loads((run_dir / "rounds" / f"{r:04d}" / "plans.json").read_text()) for r in range(1, rounds + 1)]

    # Assert: every round's global reached by every agent (through the round's coefficients, no resync needed)
    for agent, seen in theirs.items():
        for round_, digest in mine.items():
            assert seen.get(round_) == digest, (agent, round_, seen, mine)
    records = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(1, rounds + 1)) and all(r["heldout"] for r in records)
    coefficient_bytes = sum(4 * v for plans in up for a in plans.values() for v in [a["plan"]["directions"]])
    print(f"FERRET {model}: {rounds} rounds, digests equal on {len(theirs)} agents; {coefficient_bytes} B up planned")


def test_secure_aggregation_with_dp_keeps_every_agent_in_step_with_the_coordinator(tmp_path: Path) -> None:
    # Prepare: three agents share 300 directions evenly, clip their coefficients, add their share of the noise and
    # upload them masked; the coordinator broadcasts the noisy mean coefficients
    run_dir = tmp_path / "run"
    settings = spec(run_dir, 2, agents=3)
    settings["coordinator"]["strategy"] = "fedavg"
    settings["coordinator"]["privacy"] = {
        "dp": {"enabled": True, "clip_norm": 1.0, "noise_multiplier": 0.5},
        "secure_aggregation": {"enabled": True},
    }

    # Execute
    with Federation(settings, run_dir) as fed:
        run_to_end(fed)
        mine = coordinator_digests(run_dir)
        theirs = {agent: agent_digests(fed, agent) for agent in fed.agent_ids}
        log = fed.log("coordinator")

    # Assert: each round unmasked from three masked uploads, and every agent reached every round's global
    assert log.count("masked update from") == 6 and "3 participants" in log
    for agent, seen in theirs.items():
        for round_, digest in mine.items():
            assert seen.get(round_) == digest, (agent, round_, seen, mine)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["privacy"]["rounds"] == 2 and summary["privacy"]["noise_multiplier"] == 0.5


def test_a_killed_coordinator_resumes_bit_identically_and_a_restarted_agent_resyncs(tmp_path: Path) -> None:
    # Prepare: three rounds; agent-2 is killed after round 1 and the coordinator during round 2
    run_dir = tmp_path / "run"
    with Federation(spec(run_dir, rounds=3), run_dir) as fed:
        fed.start_coordinator()
        assert fed.wait_serving()
        for agent in fed.agent_ids:
            fed.start_agent(agent)
        wait_until("round 1 to be saved", lambda: len(fed.rounds_done()) >= 1, fed)
        os.kill(fed.agents["agent-2"].pid, signal.SIGKILL)
        fed.agents["agent-2"].wait()
        fed.start_agent("agent-2")

        # Execute
        wait_until("round 2 to start", lambda: "round 2/3: training" in fed.log("coordinator"), fed)
        state = json.loads((run_dir / "state" / "state.json").read_text())
        coordinator = fed.coordinator
        assert coordinator is not None
        os.kill(coordinator.pid, signal.SIGKILL)
        coordinator.wait()
        restarted = fed.start_coordinator()
        wait_until("the run to finish", lambda: restarted.poll() is not None, fed)

        # Assert: resumed after the saved round with the same digest; the run ended with both agents in step
        assert restarted.returncode == 0, fed.log("coordinator", 2)[-3000:]
        resumed = re.search(
            r"resuming run \w+ after round (\d+) from .* \(global sha256 ([0-9a-f]{64})", fed.log("coordinator", 2)
        )
        assert resumed is not None and resumed.group(2) == state["global_sha256"]
        mine = coordinator_digests(run_dir)
        assert sorted(mine) == [1, 2, 3]
        for agent, start in (("agent-1", 1), ("agent-2", 2)):
            seen = agent_digests(fed, agent, start)
            assert all(seen.get(r) == d for r, d in mine.items() if r >= 2), (agent, seen, mine)
        assert "ferret: a full download of the global" in fed.log("agent-2", 2)
        print(f"FERRET resume: resumed after round {resumed.group(1)} with the saved sha256; restarted agent resynced")


def test_a_ferret_run_exports_as_a_plain_transformers_model(tmp_path: Path) -> None:
    # Prepare: a one-round run
    run_dir = tmp_path / "run"
    with Federation(spec(run_dir, rounds=1), run_dir) as fed:
        run_to_end(fed)
    out = tmp_path / "exported"

    # Execute
    done = subprocess.run(
        [str(Path(sys.executable).parent / "fedpipe-export"), str(run_dir), "--out", str(out)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False,
    )  # fmt: skip

    # Assert: loads with plain transformers and holds the trained blocks
    assert done.returncode == 0, done.stderr[-2000:]
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out)
    final = load_file(str(run_dir / "final" / "weights.safetensors"))
    state = model.state_dict()
    assert all(bool((state[name] == value).all()) for name, value in final.items())
