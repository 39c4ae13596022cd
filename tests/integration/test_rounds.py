"""Round rules against a real coordinator server on 127.0.0.1: replays, the update norm bound, quorum with
skip or extend, late uploads, and agents that register again mid-round."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from rig import (
    AGENT_A,
    AGENT_B,
    NO_LIMIT,
    SAMPLES_A,
    SAMPLES_B,
    Assignment,
    Coordinator,
    Upload,
    coordinator_config,
    get_task,
    launch,
    refused,
    register,
    train_assignment,
    upload,
)

from common.adapters import GlobalAdapter
from common.types import TaskKind
from coordinator.config import RunSection, UpdatesSection

pytestmark = pytest.mark.integration

AGENT_C = "agent-c"
WAIT_S = 20.0


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Coordinator]]:
    """Start coordinators with config sections replaced; stop them all afterwards."""
    started: list[Coordinator] = []

    def run(**sections: Any) -> Coordinator:
        started.append(launch(tmp_path / f"run-{len(started)}", **sections))
        return started[-1]

    yield run
    for coordinator in started:
        coordinator.stop()


def run_section(tmp_path: Path, index: int, **changes: Any) -> RunSection:
    """rig's run section with changes, for the index-th coordinator the `start` fixture makes."""
    return coordinator_config(tmp_path / f"run-{index}", NO_LIMIT).run.model_copy(update=changes)


def sample(coordinator: Coordinator, name: str, labels: dict[str, str] | None = None) -> float:
    return float(coordinator.orchestrator.metrics.registry.get_sample_value(name, labels or {}) or 0.0)


def open_round(coordinator: Coordinator, agents: tuple[str, ...]) -> dict[str, Assignment]:
    """Register the agents and take their round-1 TRAIN tasks."""
    for agent in agents:
        register(coordinator.stub, agent)
    return {agent: train_assignment(coordinator.stub, agent) for agent in agents}


def small(assignment: Assignment, scale: float, samples: int = SAMPLES_A) -> Upload:
    """An update moving every tensor by scale times seeded noise."""
    upload_ = assignment.update(seed=11, samples=samples)
    generator = torch.Generator().manual_seed(3)
    tensors = {n: t + scale * torch.randn(t.shape, generator=generator) for n, t in assignment.tensors.items()}
    return Upload(upload_.meta, tensors)


def delta_norm(update: Upload | dict[str, torch.Tensor], sent: dict[str, torch.Tensor]) -> float:
    tensors = update.tensors if isinstance(update, Upload) else update
    return math.sqrt(sum(float((tensors[n].double() - t.double()).pow(2).sum()) for n, t in sent.items()))


def wait_for(what: str, check: Callable[[], bool]) -> None:
    end = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_replayed_upload_is_acknowledged_and_counted_once_also_after_the_round_closed(
    start: Callable[..., Coordinator],
) -> None:
    # Prepare
    coordinator = start()
    tasks = open_round(coordinator, (AGENT_A, AGENT_B))
    a, b = tasks[AGENT_A].update(seed=1, samples=SAMPLES_A), tasks[AGENT_B].update(seed=2, samples=SAMPLES_B)

    # Execute: a re-sends while the round is open, b after its upload closed the round
    answers = [upload(coordinator.stub, a.messages()), upload(coordinator.stub, a.messages())]
    answers += [upload(coordinator.stub, b.messages())]
    summary = coordinator.finished()
    answers += [upload(coordinator.stub, b.messages())]

    # Assert: every answer OK; the replays say so; each update counted once
    assert [x.accepted for x in answers] == [True] * 4
    assert answers[0].message == "accepted for round 1 (1/2)" and answers[2].message == "accepted for round 1 (2/2)"
    assert answers[1].message == answers[3].message == "replay of the update already accepted for round 1; ignored"
    assert summary["rounds"][0]["samples"] == SAMPLES_A + SAMPLES_B
    for agent in (AGENT_A, AGENT_B):
        assert sample(coordinator, "fedpipe_updates_accepted_total", {"agent": agent}) == 1
        assert sample(coordinator, "fedpipe_updates_replayed_total", {"agent": agent}) == 1


def test_an_update_over_the_norm_bound_is_refused_and_its_agent_sits_the_round_out(
    start: Callable[..., Coordinator], tmp_path: Path
) -> None:
    # Prepare: one update is quorum, so the round closes once b uploads and a no longer counts
    coordinator = start(
        updates=UpdatesSection(max_norm=0.5, norm_action="reject"), run=run_section(tmp_path, 0, quorum=1)
    )
    tasks = open_round(coordinator, (AGENT_A, AGENT_B))
    big, fine = small(tasks[AGENT_A], 0.1), small(tasks[AGENT_A], 0.001)
    before = coordinator.orchestrator.state.global_

    # Execute: a's update is over the bound; a tries again; b's update is fine
    code, details = refused(lambda: upload(coordinator.stub, big.messages()))
    again, again_details = refused(lambda: upload(coordinator.stub, fine.messages()))
    told = get_task(coordinator.stub, AGENT_A, wait_s=0.0)
    assert coordinator.orchestrator.state.global_ is before
    accepted = upload(coordinator.stub, small(tasks[AGENT_B], 0.001, SAMPLES_B).messages())
    summary = coordinator.finished()

    # Assert: the figure and the bound are named; a is not asked to retrain but told it sits out
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"update norm: {delta_norm(big, tasks[AGENT_A].tensors):.4g} exceeds updates.max_norm 0.5" in details
    assert again == grpc.StatusCode.FAILED_PRECONDITION and "sits out round 1" in again_details
    assert told.kind is TaskKind.WAIT and told.message.startswith("sitting out round 1: update refused: update norm")
    assert accepted.message == "accepted for round 1 (1/2)"
    assert summary["rounds"][0]["agents"] == (AGENT_B,)
    assert sample(coordinator, "fedpipe_updates_screened_total", {"agent": AGENT_A, "action": "rejected"}) == 1


def test_an_update_over_the_norm_bound_is_clipped_to_it(start: Callable[..., Coordinator]) -> None:
    # Prepare
    coordinator = start(updates=UpdatesSection(max_norm=1.0, norm_action="clip"))
    tasks = open_round(coordinator, (AGENT_A, AGENT_B))
    big = small(tasks[AGENT_A], 0.1)
    sent = tasks[AGENT_A].tensors

    # Execute
    answer = upload(coordinator.stub, big.messages())
    kept = coordinator.orchestrator.state.inbox[AGENT_A].update.tensors

    # Assert: same direction, norm exactly the bound
    assert answer.accepted
    assert delta_norm(big, sent) > 3.0
    assert delta_norm(dict(kept), sent) == pytest.approx(1.0, rel=1e-5)
    factor = 1.0 / delta_norm(big, sent)
    for name, value in sent.items():
        torch.testing.assert_close(kept[name], value + factor * (big.tensors[name] - value), rtol=1e-5, atol=1e-6)
    assert sample(coordinator, "fedpipe_updates_clipped_total", {"agent": AGENT_A}) == 1


def test_without_quorum_the_round_is_skipped_and_a_late_upload_is_refused(
    start: Callable[..., Coordinator], tmp_path: Path
) -> None:
    # Prepare: three agents, all three updates needed, two rounds, a short deadline
    run = run_section(tmp_path, 0, rounds=2, min_agents=3, quorum_fraction=1.0, round_deadline_s=3.0)
    coordinator = start(run=run)
    tasks = open_round(coordinator, (AGENT_A, AGENT_B, AGENT_C))
    late = tasks[AGENT_C].update(seed=3, samples=SAMPLES_B)

    # Execute: a and b upload; c misses the deadline, then uploads for round 1 once round 2 is open
    upload(coordinator.stub, tasks[AGENT_A].update(seed=1, samples=SAMPLES_A).messages())
    upload(coordinator.stub, tasks[AGENT_B].update(seed=2, samples=SAMPLES_B).messages())
    wait_for("round 2", lambda: get_task(coordinator.stub, AGENT_C, wait_s=1.0).round == 2)
    code, details = refused(lambda: upload(coordinator.stub, late.messages()))

    # Assert: round 1 skipped, the global still round 0, the late update never mixed into round 2
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "round 1 is not open for uploads (open round: 2)" in details
    global_ = coordinator.orchestrator.state.global_
    assert isinstance(global_, GlobalAdapter) and global_.round == 0
    assert coordinator.orchestrator.state.round == 2 and coordinator.orchestrator.state.inbox == {}
    assert sample(coordinator, "fedpipe_rounds_failed_total", {"reason": "no_quorum"}) == 1
    assert coordinator.orchestrator.results[0].dropped == (AGENT_C,)


def test_without_quorum_an_extended_deadline_lets_the_straggler_in(
    start: Callable[..., Coordinator], tmp_path: Path
) -> None:
    # Prepare
    run = run_section(
        tmp_path, 0, min_agents=3, quorum_fraction=1.0, round_deadline_s=3.0, on_no_quorum="extend", max_extensions=1
    )
    coordinator = start(run=run)
    tasks = open_round(coordinator, (AGENT_A, AGENT_B, AGENT_C))

    # Execute: the straggler uploads only after the first deadline passed
    upload(coordinator.stub, tasks[AGENT_A].update(seed=1, samples=SAMPLES_A).messages())
    upload(coordinator.stub, tasks[AGENT_B].update(seed=2, samples=SAMPLES_B).messages())
    wait_for("the extension", lambda: sample(coordinator, "fedpipe_round_extensions_total") == 1)
    answer = upload(coordinator.stub, tasks[AGENT_C].update(seed=3, samples=SAMPLES_B).messages())
    summary = coordinator.finished()

    # Assert
    assert answer.message == "accepted for round 1 (3/3)"
    assert sorted(summary["rounds"][0]["agents"]) == [AGENT_A, AGENT_B, AGENT_C]
    assert summary["final_round"] == 1


def test_an_agent_registering_again_mid_round_joins_the_next_round(
    start: Callable[..., Coordinator], tmp_path: Path
) -> None:
    # Prepare: one update is quorum, so the round closes as soon as b uploads
    coordinator = start(run=run_section(tmp_path, 0, quorum=1))
    tasks = open_round(coordinator, (AGENT_A, AGENT_B))
    stale = tasks[AGENT_A].update(seed=1, samples=SAMPLES_A)

    # Execute: a restarts (registers again) mid-round, then tries its old task's upload
    register(coordinator.stub, AGENT_A)
    code, details = refused(lambda: upload(coordinator.stub, stale.messages()))
    after = get_task(coordinator.stub, AGENT_A, wait_s=0.0)
    upload(coordinator.stub, tasks[AGENT_B].update(seed=2, samples=SAMPLES_B).messages())
    summary = coordinator.finished()

    # Assert
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert f"agent {AGENT_A} registered again during round 1; it joins the next" in details
    assert after.kind is TaskKind.WAIT
    assert summary["rounds"][0]["agents"] == (AGENT_B,) and summary["rounds"][0]["dropped"] == (AGENT_A,)
