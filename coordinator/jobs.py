"""The run queue of a serving coordinator: submitted runs, one after another, kept on disk across restarts.

`<state_dir>/queue.json` holds every run (its settings, state and times) and is rewritten atomically on
each change, so a restarted coordinator resumes the run that was running and keeps the queue behind it.
Each run has its directory `<state_dir>/runs/<id>` (checkpoint, rounds, final adapter, coordinator.log).
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from common.errors import ConfigError, InvalidArgument, UnknownRun

State = Literal["queued", "running", "completed", "failed", "cancelled"]
ENDED: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
QUEUE_FILE = "queue.json"
VERSION = 1


@dataclass(frozen=True)
class Job:
    """One submitted run."""

    run_id: str
    name: str
    settings: Mapping[str, Any]  # the submitted mapping, as submitted (the service merges its defaults in)
    submitted_at: float
    state: State = "queued"
    started_at: float = 0.0
    ended_at: float = 0.0
    message: str = ""
    final_accuracy: float | None = None
    cancel_requested: bool = False
    starts: int = 0  # times it was started (a coordinator restart starts it again, resuming)

    @property
    def ended(self) -> bool:
        return self.state in ENDED


class JobQueue:
    """Thread-safe queue of runs persisted under state_dir; `take` blocks the runner until a run is due."""

    def __init__(self, state_dir: Path | None, clock: Callable[[], float] = time.time) -> None:
        """state_dir None: kept in memory only (the one-shot coordinator's single run)."""
        self.state_dir = state_dir
        self.clock = clock
        self.path = state_dir / QUEUE_FILE if state_dir is not None else None
        self.cond = threading.Condition()
        self.jobs: dict[str, Job] = {}
        self.closed = False
        self.taken: set[str] = set()  # runs this process started: not due again until the next start
        if state_dir is not None:
            state_dir.mkdir(parents=True, exist_ok=True)
        if self.path is not None:
            if self.path.exists():
                self.jobs = _load(self.path)
            else:
                _save(self.path, {})  # an unwritable state_dir fails now, not at the first submission

    def run_dir(self, run_id: str) -> Path:
        """Where a run keeps its checkpoint, rounds and final adapter."""
        if self.state_dir is None:
            raise ValueError("an in-memory queue has no run directories")
        return self.state_dir / "runs" / run_id

    # ------------------------------------------------------------------ what admins do

    def submit(self, settings: Mapping[str, Any], name: str = "", run_id: str = "") -> Job:
        """Queue a run behind the others; its id is NNNN-xxxxxx (a sequence number, then random) unless given."""
        with self.cond:
            number = 1 + max((_number(j.run_id) for j in self.jobs.values()), default=0)
            run_id = run_id or f"{number:04d}-{secrets.token_hex(3)}"
            if run_id in self.jobs:
                raise InvalidArgument("run_id", f"{run_id} exists")
            job = Job(run_id, name, dict(settings), self.clock())
            self._put(job)
            self.cond.notify_all()
            return job

    def cancel(self, run_id: str, why: str = "cancelled by an admin") -> Job:
        """A queued run is cancelled at once; a running one is marked, and the service stops it."""
        with self.cond:
            job = self.get(run_id)
            if job.ended:
                raise InvalidArgument("run_id", f"run {job.run_id} already ended ({job.state})")
            if job.state == "queued":
                job = self._put(replace(job, state="cancelled", ended_at=self.clock(), message=why))
            else:
                job = self._put(replace(job, cancel_requested=True, message=why))
            self.cond.notify_all()
            return job

    def get(self, run_id: str) -> Job:
        """A run by its id or a unique prefix of it (`0003` for `0003-1a2b3c`)."""
        with self.cond:
            if run_id in self.jobs:
                return self.jobs[run_id]
            found = [j for i, j in self.jobs.items() if run_id and i.startswith(run_id)]
            if len(found) == 1:
                return found[0]
            if not found:
                raise UnknownRun(f"run {run_id!r}: no such run")
            raise InvalidArgument("run_id", f"{run_id!r} matches {len(found)} runs; give more of the id")

    def all(self) -> list[Job]:
        """Every run, in submission order."""
        with self.cond:
            return sorted(self.jobs.values(), key=lambda j: j.run_id)

    def position(self, run_id: str) -> int:
        """1 for the run that starts next, 0 for one that is not queued."""
        with self.cond:
            queued = [j.run_id for j in self._due() if j.state == "queued"]
            return queued.index(run_id) + 1 if run_id in queued else 0

    # ------------------------------------------------------------------ what the runner does

    def take(self, timeout_s: float | None = None) -> Job | None:
        """The next run to start, marked running: one that was running when the coordinator stopped comes
        first (it resumes), then the queue in order. None when closed or after timeout_s."""
        end = None if timeout_s is None else time.monotonic() + timeout_s
        with self.cond:
            while not self.closed:
                due = self._due()
                if due:
                    job = due[0]
                    self.taken.add(job.run_id)
                    started = job.started_at or self.clock()
                    return self._put(replace(job, state="running", started_at=started, starts=job.starts + 1))
                remaining = None if end is None else end - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self.cond.wait(remaining)
            return None

    def end(self, run_id: str, state: State, message: str, final_accuracy: float | None = None) -> Job:
        """Record how a run ended."""
        if state not in ENDED:
            raise ValueError(f"{state} is not an end state")
        with self.cond:
            job = self._put(
                replace(
                    self.jobs[run_id],
                    state=state,
                    ended_at=self.clock(),
                    message=message,
                    final_accuracy=final_accuracy,
                )
            )
            self.cond.notify_all()
            return job

    def close(self) -> None:
        """Wake the runner for good (the coordinator stops); running runs stay running on disk, to resume."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def _due(self) -> list[Job]:
        running = [j for j in self.jobs.values() if j.state == "running" and j.run_id not in self.taken]
        queued = sorted((j for j in self.jobs.values() if j.state == "queued"), key=lambda j: j.run_id)
        return sorted(running, key=lambda j: j.run_id) + queued

    def _put(self, job: Job) -> Job:
        jobs = {**self.jobs, job.run_id: job}
        if self.path is not None:
            _save(self.path, jobs)  # on disk first: a change that cannot be kept is not made
        self.jobs = jobs
        return job


def _number(run_id: str) -> int:
    head = run_id.split("-", 1)[0]
    return int(head) if head.isdigit() else 0


def _save(path: Path, jobs: Mapping[str, Job]) -> None:
    data = {"version": VERSION, "runs": [asdict(j) for j in sorted(jobs.values(), key=lambda j: j.run_id)]}
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as out:
        json.dump(data, out, indent=1)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def _load(path: Path) -> dict[str, Job]:
    try:
        data = json.loads(path.read_text())
        if data.get("version") != VERSION:
            raise ValueError(f"version {data.get('version')!r}, this coordinator reads {VERSION}")
        jobs = [Job(**{**entry, "settings": dict(entry["settings"])}) for entry in data["runs"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(f"service.state_dir: {path} is not a FedPipe run queue ({err}); move it aside") from None
    return {j.run_id: j for j in jobs}
