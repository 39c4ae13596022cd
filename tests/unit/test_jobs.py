"""The run queue of a serving coordinator (coordinator.jobs) and a submitted run's settings (coordinator.service)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import ConfigError, InvalidArgument, UnknownRun
from coordinator.config import SERVICE_KEYS, CoordinatorConfig
from coordinator.jobs import QUEUE_FILE, JobQueue
from coordinator.service import run_config


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_runs_are_taken_in_submission_order_and_ids_are_numbered(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path, Clock())
    a, b, c = (queue.submit({"run": {"rounds": n}}, name) for n, name in ((1, "a"), (2, "b"), (3, "")))

    assert [j.run_id[:4] for j in (a, b, c)] == ["0001", "0002", "0003"]
    assert [queue.position(j.run_id) for j in (a, b, c)] == [1, 2, 3]
    taken = queue.take(timeout_s=0)
    assert taken is not None and taken.run_id == a.run_id and taken.state == "running" and taken.starts == 1
    assert queue.position(b.run_id) == 1 and queue.position(a.run_id) == 0
    queue.end(a.run_id, "completed", "1 rounds", 0.75)
    second = queue.take(timeout_s=0)
    assert second is not None and second.run_id == b.run_id


def test_the_queue_survives_a_restart_and_the_running_run_comes_back_first(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path, Clock())
    first = queue.submit({"run": {"rounds": 1}}, "first")
    second = queue.submit({"run": {"rounds": 2}}, "second")
    running = queue.take(timeout_s=0)
    assert running is not None and running.run_id == first.run_id
    queue.close()  # the coordinator stops: the running run stays running on disk

    again = JobQueue(tmp_path, Clock())
    assert [(j.run_id, j.state) for j in again.all()] == [(first.run_id, "running"), (second.run_id, "queued")]
    resumed = again.take(timeout_s=0)
    assert resumed is not None and resumed.run_id == first.run_id
    assert resumed.starts == 2 and resumed.started_at == running.started_at  # a resume, not a new start
    assert again.get(second.run_id).settings == {"run": {"rounds": 2}}


def test_cancel_drops_a_queued_run_and_marks_a_running_one(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path, Clock())
    running = queue.submit({}, "r")
    queued = queue.submit({}, "q")
    queue.take(timeout_s=0)

    dropped = queue.cancel(queued.run_id)
    marked = queue.cancel(running.run_id)

    assert dropped.state == "cancelled" and dropped.ended_at > 0
    assert marked.state == "running" and marked.cancel_requested
    assert queue.take(timeout_s=0) is None  # the running one is its runner's to end; nothing else is due
    queue.end(running.run_id, "cancelled", "cancelled by an admin")
    with pytest.raises(InvalidArgument, match="already ended"):
        queue.cancel(running.run_id)


def test_runs_are_found_by_a_unique_prefix_and_unknown_or_ambiguous_ones_are_named(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path, Clock())
    jobs = [queue.submit({}) for _ in range(11)]

    assert queue.get("0003").run_id == jobs[2].run_id
    assert queue.get(jobs[10].run_id).run_id == jobs[10].run_id
    with pytest.raises(InvalidArgument, match="matches 11 runs"):
        queue.get("00")
    with pytest.raises(UnknownRun, match="no such run"):
        queue.get("9999")
    with pytest.raises(UnknownRun):
        queue.get("")


def test_take_waits_for_a_submission_and_close_wakes_it(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path)
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(queue.take()))
    waiter.start()
    job = queue.submit({}, "late")
    waiter.join(5)
    assert not waiter.is_alive() and getattr(got[0], "run_id", None) == job.run_id

    closer = threading.Thread(target=lambda: got.append(queue.take()))
    closer.start()
    queue.close()
    closer.join(5)
    assert not closer.is_alive() and got[1] is None
    assert queue.take(timeout_s=0) is None


def test_a_queue_file_that_is_not_ours_is_refused_and_left_alone(tmp_path: Path) -> None:
    (tmp_path / QUEUE_FILE).write_text('{"runs": 3}')
    with pytest.raises(ConfigError, match="not a FedPipe run queue"):
        JobQueue(tmp_path)
    assert (tmp_path / QUEUE_FILE).read_text() == '{"runs": 3}'


def test_a_change_that_cannot_be_written_is_not_made(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path / "state")
    kept = queue.submit({}, "kept")
    (tmp_path / "state" / QUEUE_FILE).unlink()
    (tmp_path / "state").rmdir()  # the directory is gone: the write fails
    with pytest.raises(OSError):
        queue.submit({}, "lost")
    assert [j.run_id for j in queue.all()] == [kept.run_id]


def test_an_in_memory_queue_writes_nothing(tmp_path: Path) -> None:
    queue = JobQueue(None)
    job = queue.submit({}, run_id="abc123")
    assert queue.get("abc").run_id == "abc123" and job.state == "queued"
    with pytest.raises(InvalidArgument, match="exists"):
        queue.submit({}, run_id="abc123")
    assert list(tmp_path.iterdir()) == []


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["submit", "take", "cancel", "end"]), max_size=25))
def test_any_sequence_of_changes_reads_back_the_same_and_one_run_at_most_runs(ops: list[str]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        queue = JobQueue(Path(folder), Clock())
        for op in ops:
            jobs = queue.all()
            if op == "submit":
                queue.submit({"n": len(jobs)})
            elif op == "take" and not any(j.state == "running" for j in jobs):
                queue.take(timeout_s=0)
            elif op == "cancel" and [j for j in jobs if not j.ended]:
                queue.cancel(next(j for j in jobs if not j.ended).run_id)
            elif op == "end" and [j for j in jobs if j.state == "running"]:
                queue.end(next(j for j in jobs if j.state == "running").run_id, "completed", "done")
            assert sum(1 for j in queue.all() if j.state == "running") <= 1
        assert JobQueue(Path(folder)).all() == queue.all()
        saved = json.loads((Path(folder) / QUEUE_FILE).read_text())
        assert [entry["run_id"] for entry in saved["runs"]] == [j.run_id for j in queue.all()]


def test_a_submitted_run_takes_the_service_defaults_and_may_not_set_what_the_service_owns(tmp_path: Path) -> None:
    defaults = CoordinatorConfig.model_validate({"planner": "uniform", "run": {"rounds": 7, "min_agents": 3}})

    config = run_config(defaults, {"run": {"rounds": 2}, "lora": {"rank": 4}}, tmp_path / "r1")

    assert config.planner == "uniform" and config.run.min_agents == 3  # the service's defaults
    assert config.run.rounds == 2 and config.lora.rank == 4  # the run's own
    assert config.run.run_dir == tmp_path / "r1"
    for key in SERVICE_KEYS:
        with pytest.raises(ConfigError, match=f"^{key}: the serving coordinator sets it"):
            run_config(defaults, {key: {}}, tmp_path)
    with pytest.raises(ConfigError, match=r"run\.run_dir"):
        run_config(defaults, {"run": {"run_dir": "/elsewhere"}}, tmp_path)
    with pytest.raises(ConfigError, match=r"run\.rounds"):
        run_config(defaults, {"run": {"rounds": 0}}, tmp_path)
