"""A poisoned run against a clean one, with real processes over mTLS on 127.0.0.1.

Two honest agents (console scripts, MiniLM, real training) and mallory, a client of the tests' own with a
certificate of the run's CA, which every round uploads the global it was sent with the classifier bias
pushed to +-1e6 (every tweet "positive"), claiming as many samples as the honest agents. With the
defaults the held-out accuracy stays within 2 points of the clean run's; with the defences off the same
attack takes it to about the minority class's share, so the test can fail.

Prints POISONING lines with the figures (pytest -s shows them; RELIABILITY.md quotes them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hostile import federate as run_federation  # bench/hostile.py: the conftest puts bench/ on the path
from hostile import heldout_accuracies

pytestmark = pytest.mark.integration

HONEST = 2
DEFENCES_OFF = {"max_abs_value": 0.0, "norm_multiple": 0.0, "max_weight_ratio": 0.0}


def spec(run_dir: Path, with_mallory: bool, updates: dict[str, float] | None = None) -> dict[str, Any]:
    """MiniLM, LoRA rank 4 on query/value, two rounds of 15 steps, 300 held-out tweets; two honest agents."""
    return {
        "coordinator": {
            "planner": "uniform",
            "run": {
                "rounds": 2,
                "min_agents": HONEST + (1 if with_mallory else 0),
                "quorum": HONEST,
                "run_dir": str(run_dir),
                "round_deadline_s": 240,
                "registration_timeout_s": 240,
                "finish_grace_s": 5,
                "seed": 7,
            },
            "lora": {"rank": 4, "alpha": 8, "targets": ["query", "value"]},
            "selection": {"mode": "all"},
            "training": {"batch_size": 16, "max_steps": 15, "max_seq_len": 48, "learning_rate": 0.002},
            "evaluation": {"agents": False, "initial": False, "heldout": "embedded", "max_samples": 300},
            "updates": updates or {},
        },
        "agents": {
            "count": HONEST,
            "config": {
                "threads": 1,
                "calibration": {"enabled": False},
                "data": {"max_samples": 400, "val_fraction": 0.1},
            },
        },
    }


def federate(run_dir: Path, with_mallory: bool, updates: dict[str, float] | None = None) -> dict[str, Any]:
    """One federation to its end, with mallory's bias attack beside the honest agents when asked."""
    return run_federation(spec(run_dir, with_mallory, updates), run_dir, {"attack": "bias"} if with_mallory else None)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The honest agents alone."""
    return federate(tmp_path_factory.mktemp("clean") / "run", with_mallory=False)


def test_with_the_defaults_a_poisoned_run_ends_within_two_points_of_the_clean_one(
    tmp_path: Path, clean: dict[str, Any]
) -> None:
    # Execute
    poisoned = federate(tmp_path / "run", with_mallory=True)

    # Assert: every poisoned upload refused; accuracy as clean (within 2 points) in every round
    clean_acc, poisoned_acc = heldout_accuracies(clean), heldout_accuracies(poisoned)
    print(f"POISONING defaults: clean {clean_acc}, poisoned {poisoned_acc}, mallory {poisoned['mallory']}")
    assert poisoned["mallory"] and all("max_abs_value" in outcome for outcome in poisoned["mallory"])
    for before, after in zip(clean_acc, poisoned_acc, strict=True):
        assert abs(before - after) <= 0.02
    assert all(sorted(r["agents"]) == ["agent-1", "agent-2"] for r in poisoned["rounds"])


def test_with_the_defences_off_the_same_attack_takes_the_run(tmp_path: Path, clean: dict[str, Any]) -> None:
    # Execute
    poisoned = federate(tmp_path / "run", with_mallory=True, updates=DEFENCES_OFF)

    # Assert: mallory's uploads were taken, and the global now calls nearly every tweet positive
    print(f"POISONING defences off: clean {heldout_accuracies(clean)}, poisoned {heldout_accuracies(poisoned)}")
    assert all(outcome.startswith("accepted") for outcome in poisoned["mallory"]), poisoned["mallory"]
    assert heldout_accuracies(poisoned)[-1] < heldout_accuracies(clean)[-1] - 0.2
    assert max(heldout_accuracies(poisoned)) < 0.5
