"""Held-out evaluation off the critical path (evaluation.overlap) against a real coordinator on 127.0.0.1: the
next round opens while the last global is still being scored, and the round is recorded, in order and with
its figures, once the score is in."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rig import (
    AGENT_A,
    AGENT_B,
    SAMPLES_A,
    SAMPLES_B,
    Coordinator,
    get_task,
    launch,
    register,
    train_round,
)

from common.types import Evaluation, GlobalState, ModelSpec, TaskKind, TrainPlan
from coordinator.config import EvaluationSection, RunSection

pytestmark = pytest.mark.integration

WAIT_S = 20.0


class GatedScorer:
    """A held-out scorer whose first call does not return until released: the slow evaluation a test needs to
    see overlap (the real held-out scorer needs a real model, which the rig's spec does not describe)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.rounds: list[int] = []

    def __call__(self, global_: GlobalState, template: TrainPlan, spec: ModelSpec) -> Evaluation:
        self.rounds.append(global_.round)
        if len(self.rounds) == 1 and not self.release.wait(WAIT_S):
            raise TimeoutError("the test never released the evaluation")
        return Evaluation(loss=1.0 / (1 + global_.round), accuracy=0.5, samples=10)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., tuple[Coordinator, GatedScorer]]]:
    started: list[Coordinator] = []

    def run(overlap: bool) -> tuple[Coordinator, GatedScorer]:
        """A two-round run whose round 1 both agents trained, and whose scoring of it has begun (and blocks)."""
        scorer = GatedScorer()
        run_dir = tmp_path / f"run-{len(started)}"
        section = RunSection(
            rounds=2, min_agents=2, round_deadline_s=30.0, registration_timeout_s=10.0, agent_timeout_s=30.0,
            run_dir=run_dir, finish_grace_s=0.0,
        )  # fmt: skip
        evaluation = EvaluationSection(agents=False, heldout=None, initial=False, overlap=overlap)
        coordinator = launch(run_dir, evaluator=scorer, run=section, evaluation=evaluation)
        started.append(coordinator)
        for agent in (AGENT_A, AGENT_B):
            register(coordinator.stub, agent)
        train_one_round(coordinator)
        assert wait_until(lambda: scorer.rounds == [1])
        return coordinator, scorer

    yield run
    for coordinator in started:
        coordinator.stop()


def train_one_round(coordinator: Coordinator) -> None:
    train_round(coordinator, {AGENT_A: SAMPLES_A, AGENT_B: SAMPLES_B})


def records(coordinator: Coordinator) -> list[dict[str, Any]]:
    path = coordinator.config.run.run_dir / "rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def wait_until(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_the_next_round_trains_while_the_last_global_is_scored(
    start: Callable[..., tuple[Coordinator, GatedScorer]],
) -> None:
    # Prepare
    coordinator, scorer = start(overlap=True)

    # Execute: round 2 opens although round 1's evaluation has not returned
    task = get_task(coordinator.stub, AGENT_A)
    unrecorded = records(coordinator)
    scorer.release.set()
    recorded = wait_until(lambda: len(records(coordinator)) == 1)
    train_one_round(coordinator)
    summary = coordinator.finished()

    # Assert: round 1 recorded once its score was in (before round 2 ended), rounds in order, each with its
    # held-out figures and the time its evaluation took
    assert task.kind is TaskKind.TRAIN and task.round == 2
    assert unrecorded == []
    assert recorded
    rows = records(coordinator)
    assert [row["round"] for row in rows] == [1, 2]
    assert [row["heldout"]["loss"] for row in rows] == [0.5, 1 / 3]
    assert rows[0]["heldout_seconds"] > 0 and rows[1]["opened_s"] > rows[0]["opened_s"]
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert summary["final_loss"] == 1 / 3 and summary["final_source"] == "heldout"
    registry = coordinator.orchestrator.metrics.registry
    assert registry.get_sample_value("fedpipe_heldout_evaluation_seconds_count") == 2


def test_without_overlap_the_next_round_waits_for_the_score(
    start: Callable[..., tuple[Coordinator, GatedScorer]],
) -> None:
    # Prepare
    coordinator, scorer = start(overlap=False)

    # Execute
    waiting = get_task(coordinator.stub, AGENT_A, wait_s=1.0)
    scorer.release.set()
    train_one_round(coordinator)
    summary = coordinator.finished()

    # Assert
    assert waiting.kind is TaskKind.WAIT
    assert [row["round"] for row in records(coordinator)] == [1, 2]
    assert summary["final_loss"] == 1 / 3
