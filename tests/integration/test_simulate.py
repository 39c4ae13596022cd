"""fedpipe-coordinator simulate: the real coordinator with virtual agents in one process. Through the console
script with real training on the embedded model, and in process with noise work for two hundred agents,
where every update must be counted exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import ConfigError
from coordinator.simulate import Simulation, SimulationConfig

pytestmark = pytest.mark.integration

SCRIPT = Path(sys.executable).parent / "fedpipe-coordinator"


def test_the_console_script_trains_virtual_agents_on_the_real_model(tmp_path: Path) -> None:
    # Prepare: four virtual agents, skewed labels, one round of two steps each, validation on the agents
    run_dir = tmp_path / "sim"
    command = [
        str(SCRIPT), "simulate", "--agents", "4", "--simulation.label-skew", "0.5", "--simulation.samples", "[20,40]",
        "--run.rounds", "1", "--run.min-agents", "4", "--run.run-dir", str(run_dir), "--planner", "uniform",
        "--training.max-steps", "2", "--training.batch-size", "4", "--training.max-seq-len", "32",
        "--selection.mode", "all", "--metrics.port", "-1",
    ]  # fmt: skip

    # Execute
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)

    # Assert: every agent trained and was aggregated once, and evaluated the globals on its validation split
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads((run_dir / "simulation.json").read_text())
    assert figures["accepted_per_round"] == {"1": 4}
    assert figures["aggregated_per_round"] == {"1": 4}
    assert figures["tasks"]["train"] == 4 and figures["tasks"]["failed"] == 0
    assert figures["tasks"]["evaluate"] == 8  # the round-0 and round-1 globals, on each agent
    assert figures["planning"] and figures["planning"][0]["agents"] == 4
    rows = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["agents_eval"]["samples"] > 0 and len(rows[1]["agents"]) == 4
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()
    assert "simulated 4 agents" in done.stderr


def test_two_hundred_agents_with_noise_work_count_every_update_once(tmp_path: Path) -> None:
    # Prepare
    config = SimulationConfig.model_validate(
        {
            "simulation": {"agents": 200, "work": "noise", "workers": 4, "seed": 3},
            "run": {"rounds": 2, "min_agents": 200, "run_dir": tmp_path / "noise"},
            "evaluation": {"agents": False, "initial": False},
            "selection": {"mode": "all"},
            "planning": {"ranks": [2, 4]},
            "metrics": {"port": -1},
        }
    )

    # Execute
    result = Simulation(config).run()

    # Assert
    figures, summary = result["simulation"], result["summary"]
    assert figures["accepted_per_round"] == {1: 200, 2: 200}
    assert figures["aggregated_per_round"] == {1: 200, 2: 200}
    assert figures["tasks"] == {"train": 400, "evaluate": 0, "probe": 0, "failed": 0}
    for record in summary["rounds"]:
        assert len(record["agents"]) == len(set(record["agents"])) == 200
    assert [call["agents"] for call in figures["planning"]] == [200, 200, 200]  # round 0's plans, then 1 and 2


def test_twenty_agents_aggregate_securely_with_the_threads_executor_and_never_on_ray(tmp_path: Path) -> None:
    # Prepare
    settings = {
        "simulation": {"agents": 20, "work": "noise", "workers": 2, "seed": 4},
        "run": {"rounds": 2, "min_agents": 20, "run_dir": tmp_path / "secure"},
        "evaluation": {"agents": False, "initial": False},
        "selection": {"mode": "all"},
        "strategy": "slot-average",
        "privacy": {"secure_aggregation": {"enabled": True, "clip_norm": 10.0, "signed_keys": False}},
        "metrics": {"port": -1},
    }

    # Execute
    result = Simulation(SimulationConfig.model_validate(settings)).run()

    # Assert: every agent took each secure step once per round, and every round aggregated all 20
    figures = result["simulation"]
    assert figures["tasks"] == {
        "train": 40, "evaluate": 0, "probe": 0, "failed": 0, "secagg-share": 40, "secagg-mask": 40,
        "secagg-unmask": 40,
    }  # fmt: skip
    assert [len(r["agents"]) for r in result["summary"]["rounds"]] == [20, 20]
    settings["simulation"] = {**settings["simulation"], "executor": "ray", "work": "train"}  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="Ray tasks do not"):
        Simulation(SimulationConfig.model_validate(settings))


def test_a_derived_noise_multiplier_spends_the_budget_at_the_first_rounds_sampling_rate(tmp_path: Path) -> None:
    # Prepare: registration ends at 5 of 30 agents; the noise must fit round 1's rate (5 of 30), not 5 of 5
    config = SimulationConfig.model_validate(
        {
            "simulation": {"agents": 30, "work": "noise", "workers": 2, "seed": 5},
            "run": {"rounds": 3, "min_agents": 5, "sample_count": 5, "run_dir": tmp_path / "dp"},
            "evaluation": {"agents": False, "initial": False},
            "selection": {"mode": "all"},
            "strategy": "fedavg",
            "privacy": {"dp": {"enabled": True, "target_epsilon": 1.0}},
            "metrics": {"port": -1},
        }
    )

    # Execute
    privacy = Simulation(config).run()["summary"]["privacy"]

    # Assert
    assert privacy["sampling_rates"] == [pytest.approx(5 / 30)]
    assert 0.97 <= privacy["epsilon"] <= 1.0 and privacy["rounds"] == 3


def test_noise_work_with_agent_evaluation_is_refused_before_anything_starts(tmp_path: Path) -> None:
    config = SimulationConfig.model_validate(
        {"simulation": {"agents": 2, "work": "noise"}, "run": {"run_dir": tmp_path / "x", "min_agents": 2}}
    )
    with pytest.raises(ConfigError, match=r"evaluation\.agents"):
        Simulation(config)
    assert not (tmp_path / "x" / "rounds.jsonl").exists()


def test_virtual_agents_train_as_tasks_on_a_local_ray(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    # Prepare: four virtual agents trained by Ray tasks (a local Ray of two CPUs, started and stopped by the
    # run), one round of two steps; the agents' evaluations come back from Ray too.
    config = SimulationConfig.model_validate(
        {
            "simulation": {"agents": 4, "executor": "ray", "workers": 2, "samples": [20, 40], "seed": 1},
            "run": {"rounds": 1, "min_agents": 4, "run_dir": tmp_path / "ray"},
            "planner": "uniform",
            "training": {"max_steps": 2, "batch_size": 4, "max_seq_len": 32},
            "selection": {"mode": "all"},
            "metrics": {"port": -1},
        }
    )

    # Execute
    result = Simulation(config).run()

    # Assert: every update came from a Ray worker, was admitted and aggregated once; the evaluations too
    import ray

    figures, summary = result["simulation"], result["summary"]
    assert figures["executor"] == "ray" and not ray.is_initialized()
    assert figures["accepted_per_round"] == {1: 4} and figures["aggregated_per_round"] == {1: 4}
    assert figures["tasks"] == {"train": 4, "evaluate": 8, "probe": 0, "failed": 0}
    last = summary["rounds"][-1]
    assert len(last["agents"]) == len(set(last["agents"])) == 4
    assert last["agents_eval"]["samples"] > 0
    assert (tmp_path / "ray" / "final" / "adapter_model.safetensors").is_file()
