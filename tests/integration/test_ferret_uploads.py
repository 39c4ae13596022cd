"""Coefficient uploads against a real coordinator in the Ferret mode, over gRPC on 127.0.0.1: a bad one is
refused with its named status and never touches the global weights; a good one is aggregated. The model is
rig.py's hand-made two-module spec, its base weights seeded tensors (nothing is loaded)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch
from rig import (
    AGENT_A,
    AGENT_B,
    HEAD_B,
    HEAD_W,
    HIDDEN,
    QUERY,
    SPEC,
    VALUE,
    Coordinator,
    Upload,
    launch,
    refused,
    register,
    train_assignment,
    upload,
)

from common.ferret import weights_digest
from coordinator.config import TrainingSection
from coordinator.modes.ferret import COEF, BaseWeights, FerretGlobal, FerretMode

pytestmark = pytest.mark.integration


class SeededWeights(BaseWeights):
    def __init__(self) -> None:
        super().__init__("tiny-bert", SPEC)

    def block(self, name: str) -> torch.Tensor:
        return torch.randn(HIDDEN, HIDDEN, generator=torch.Generator().manual_seed(len(name)))


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[Coordinator]:
    training = TrainingSection(mode="ferret", batch_size=4, max_steps=3)
    mode = FerretMode(SPEC, "tiny-bert", 0, "rademacher", SeededWeights())
    started = launch(tmp_path / "run", mode=mode, training=training)
    yield started
    started.stop()


def coefficients(upload_: Upload, counts: dict[str, int]) -> Upload:
    """The assignment's upload turned into a Ferret one: coefficients per block, the heads as downloaded."""
    tensors = {name: value for name, value in upload_.tensors.items() if name in (HEAD_W, HEAD_B)}
    tensors.update({block + COEF: torch.full((count,), 0.01) for block, count in counts.items()})
    return replace(upload_, tensors=tensors)


def held_digest(coordinator: Coordinator) -> str:
    global_ = coordinator.orchestrator.state.global_
    assert isinstance(global_, FerretGlobal)
    return weights_digest({**global_.blocks, **global_.heads})


INVALID, STALE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
FOUR = {QUERY: 4, VALUE: 4}


def with_inf(u: Upload) -> Upload:
    return coefficients(u, FOUR).with_tensor(QUERY + COEF, torch.tensor([1.0, float("inf"), 0.0, 0.0]))


def wrong_digest(u: Upload) -> Upload:
    return coefficients(u.with_meta(base_digest="00" * 32), FOUR)


CASES = {
    "too-few": (lambda u: coefficients(u, {QUERY: 1, VALUE: 4}), INVALID, "1 coefficients, out of range"),
    "missing-block": (lambda u: coefficients(u, {QUERY: 4}), INVALID, f"missing {VALUE}{COEF}"),
    "unknown-block": (lambda u: coefficients(u, {**FOUR, "enc.layer.9.q": 2}), INVALID, "unknown blocks"),
    "over-budget": (lambda u: coefficients(u, {QUERY: 600, VALUE: 500}), INVALID, "over the plan's 1000"),
    "inf": (with_inf, INVALID, "NaN or Inf"),
    "wrong-digest": (wrong_digest, STALE, "not the digest of the round's global"),
}


@pytest.mark.parametrize(("edit", "code", "message"), list(CASES.values()), ids=list(CASES))
def test_a_bad_coefficient_upload_is_refused_and_leaves_the_weights_alone(
    coordinator: Coordinator, edit: Callable[[Upload], Upload], code: grpc.StatusCode, message: str
) -> None:
    # Prepare: round 1 open; the plans name the digest the agents trained from
    for agent in (AGENT_A, AGENT_B):
        register(coordinator.stub, agent)
    a = train_assignment(coordinator.stub, AGENT_A)
    assert a.plan.mode == "ferret" and a.plan.global_digest == held_digest(coordinator)
    base = a.update(seed=1, samples=4).with_meta(base_digest=a.plan.global_digest)
    before = held_digest(coordinator)

    # Execute
    got, details = refused(lambda: upload(coordinator.stub, edit(base).messages()))

    # Assert
    assert got == code and message in details, details
    assert held_digest(coordinator) == before


def test_good_coefficient_uploads_move_the_weights_and_the_digest(coordinator: Coordinator) -> None:
    # Prepare
    for agent in (AGENT_A, AGENT_B):
        register(coordinator.stub, agent)
    tasks = {agent: train_assignment(coordinator.stub, agent) for agent in (AGENT_A, AGENT_B)}
    before = held_digest(coordinator)

    # Execute
    for seed, task in enumerate(tasks.values()):
        trained = task.update(seed=seed, samples=4).with_meta(base_digest=task.plan.global_digest)
        good = coefficients(trained, {QUERY: 5, VALUE: 3})
        assert upload(coordinator.stub, good.messages()).accepted
    summary = coordinator.finished()

    # Assert: aggregated; the global moved and its coefficients are kept for agents one round behind
    global_ = coordinator.orchestrator.state.global_
    assert isinstance(global_, FerretGlobal) and global_.round == 1
    assert summary["rounds"][0]["agents"] == (AGENT_A, AGENT_B)
    assert held_digest(coordinator) != before and global_.previous_digest == before
    assert global_.coefficients[QUERY + COEF].numel() == 5
