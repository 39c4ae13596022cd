"""Four agents with different memory and compute caps on one host: the fedpipe planner gives them
different plans, none exceeds its memory cap (measured peak), and their round times stay close."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CAPS = {  # agent -> (memory limit, compute share)
    "agent-1": ("3GiB", 1.0),
    "agent-2": ("2GiB", 0.6),
    "agent-3": ("1.2GiB", 0.45),
    "agent-4": ("0.95GiB", 0.3),
}


def federation_config(run_dir: Path) -> dict[str, Any]:
    return {
        "coordinator": {
            "planner": "fedpipe",
            "run": {"rounds": 4, "min_agents": 4, "run_dir": str(run_dir), "round_deadline_s": 300,
                    "registration_timeout_s": 240, "finish_grace_s": 10},
            "lora": {"rank": 8, "alpha": 16},
            "selection": {"mode": "importance", "budget": 0.34, "probe_steps": 6},
            "training": {"max_seq_len": 48, "learning_rate": 0.002},
            "planning": {"ranks": [4, 8, 16], "batch_sizes": [2, 4, 8, 16], "max_local_epochs": 8,
                         "refit_threshold": 0.1},
            "evaluation": {"agents": True, "initial": False, "heldout": None},
        },
        "agents": {
            "count": 4,
            "config": {"threads": 1, "data": {"max_samples": 180, "val_fraction": 0.1},
                       "calibration": {"seq_len": 48}},
            "overrides": {agent: {"memory_limit": memory, "compute_share": share}
                          for agent, (memory, share) in CAPS.items()},
        },
    }  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("heterogeneous")
    print(f"run in {base}")
    run_dir = base / "run"
    config = base / "federation.yaml"
    config.write_text(yaml.safe_dump(federation_config(run_dir)))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "local_federation.py"), "--config", str(config), "--timeout", "1200"],
        capture_output=True, text=True, timeout=1260, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, f"federation failed:\n{proc.stdout}\n{proc.stderr}"
    return run_dir


def plans(run_dir: Path, round_: int) -> dict[str, Any]:
    return dict(json.loads((run_dir / "rounds" / f"{round_:04d}" / "plans.json").read_text()))


@pytest.mark.integration
def test_agents_with_different_caps_get_different_plans(run_dir: Path) -> None:
    last = plans(run_dir, 4)
    assert sorted(last) == sorted(CAPS)
    configurations = {
        (e["plan"]["batch_size"], e["plan"]["quantization"], max(e["plan"]["rank_pattern"].values()),
         len(e["plan"]["target_modules"]), e["plan"]["max_steps"])
        for e in last.values()
    }  # fmt: skip
    assert len(configurations) >= 3, configurations
    agents = json.loads((run_dir / "agents.json").read_text())["profiles"]
    assert agents["agent-4"]["memory_cap_bytes"] == round(0.95 * 2**30)
    assert agents["agent-4"]["compute_share"] == pytest.approx(0.3)
    # two full-depth runs and the shallow one (LoRA on the last layer only)
    assert [p["layers"] for p in agents["agent-1"]["calibration"]] == [0, 0, 1]


@pytest.mark.integration
def test_round_one_memory_predictions_are_close_before_any_refit(run_dir: Path) -> None:
    # The target is 10% for every agent; this guards the measured 6-11% (BENCHMARKS.md) against
    # regressions, with room for a shared 2-core host.
    for agent, entry in plans(run_dir, 1).items():
        predicted, measured = entry["predicted"]["peak_memory_bytes"], entry["measured"]["peak_memory_bytes"]
        assert abs(predicted / measured - 1) <= 0.15, (agent, predicted, measured)


@pytest.mark.integration
def test_no_agent_exceeds_its_memory_cap(run_dir: Path) -> None:
    for round_ in (1, 2, 3, 4):
        for agent, entry in plans(run_dir, round_).items():
            cap = json.loads((run_dir / "agents.json").read_text())["profiles"][agent]["memory_cap_bytes"]
            assert entry["predicted"]["peak_memory_bytes"] <= cap
            assert entry["measured"]["peak_memory_bytes"] <= cap, (round_, agent, entry["measured"])


@pytest.mark.integration
def test_round_times_are_within_25_percent(run_dir: Path) -> None:
    # Calibration runs while the other agents calibrate too, so first predictions are rough on a shared
    # 2-core host; the closed loop refits each agent to its measured step time until the plans settle.
    times = {r: plans(run_dir, r) for r in (1, 2, 3, 4)}
    settled = [sum(times[r][agent]["measured"]["train_seconds"] for r in (3, 4)) / 2 for agent in CAPS]
    assert max(settled) <= 1.25 * min(settled), {r: {a: e["measured"] for a, e in p.items()} for r, p in times.items()}
