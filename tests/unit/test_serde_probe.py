"""Wire conversion of importance probes and their reports."""

from __future__ import annotations

import math

import pytest

from common import serde
from common.errors import InvalidArgument
from common.types import ImportanceReport, ProbePlan, Quantization, Task, TaskKind

PROBE = ProbePlan("p0-abc", ("l0.q", "l0.v"), 4, 20, 16, 1e-3, 48, Quantization.NF4, 7, 300.0)


def test_probe_task_round_trips() -> None:
    task = Task(TaskKind.PROBE, round=0, probe=PROBE)
    assert serde.task_from_pb(serde.task_to_pb(task)) == task


def test_probe_task_without_probe_is_refused() -> None:
    message = serde.task_to_pb(Task(TaskKind.PROBE, round=0))
    with pytest.raises(InvalidArgument, match=r"task\.probe: a probe task needs a probe plan"):
        serde.task_from_pb(message)


@pytest.mark.parametrize("field", ["rank", "steps", "batch_size"])
def test_probe_with_zero_field_is_refused(field: str) -> None:
    message = serde.probe_to_pb(PROBE)
    setattr(message, field, 0)
    with pytest.raises(InvalidArgument, match=rf"probe\.{field}: must be positive"):
        serde.probe_from_pb(message)


def test_importance_report_round_trips() -> None:
    report = ImportanceReport("p0-abc", {"l0.q": 0.25, "l0.v": 1.5}, 320, 20, 3.5)
    assert serde.importance_from_pb(serde.importance_to_pb("agent-1", report)) == report


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_importance_scores_must_be_finite_and_non_negative(bad: float) -> None:
    message = serde.importance_to_pb("a", ImportanceReport("p", {"l0.q": bad}, 10, 1, 0.1))
    with pytest.raises(InvalidArgument, match=r"scores\[l0\.q\]: must be finite and >= 0"):
        serde.importance_from_pb(message)


def test_importance_without_samples_is_refused() -> None:
    message = serde.importance_to_pb("a", ImportanceReport("p", {"l0.q": 1.0}, 0, 1, 0.1))
    with pytest.raises(InvalidArgument, match="samples: must be positive"):
        serde.importance_from_pb(message)
