"""Load: N light in-process agents register, beat and upload small adapters concurrently to a real
coordinator gRPC server on 127.0.0.1, for two rounds; every update is counted exactly once.

Each agent is a thread with its own CoordinatorClient (the real agent's client) and channel; it trains
nothing, it uploads the global it downloaded plus seeded noise. Every agent also re-sends one of its
uploads with identical bytes right after it (as a retry after a lost answer would), which the
coordinator must acknowledge as a replay and not count again, also when that upload closed the round.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from rig import PROFILE, SPEC, launch

from common.rpc import RetryPolicy
from common.types import Task, TaskKind, UpdateMeta
from coordinator.config import RunSection, ServerSection
from coordinator.servicer import REJECT_REASONS
from edge_agent.client import CoordinatorClient
from edge_agent.metrics import AgentMetrics

pytestmark = pytest.mark.integration

T = TypeVar("T")

N = 200
ROUNDS = 2
POLL_S = 2.0  # get_task long-poll
SAMPLES = 8
WAIT_S = 90.0  # bound on any one wait of the test: start barrier, joining the agents
REPLAY_ROUND = 1
ACCEPTED = re.compile(r"accepted for round (\d+) \((\d+)/(\d+)\)")


def agent_id(index: int) -> str:
    return f"load-{index:03d}"


class Swarm:
    """What the agent threads share: the start barrier and the wall-clock marks."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.stop = threading.Event()
        self.lock = threading.Condition()
        self.start = threading.Barrier(N, action=self._started, timeout=WAIT_S)
        self.started = 0.0
        self.registered: list[float] = []
        self.first_task: dict[int, float] = {}  # round -> first TRAIN task received
        self.last_ack: dict[int, float] = {}  # round -> last upload (or replay) acknowledged
        self.latency: dict[str, float] = {}  # method -> slowest call, retries included

    def _started(self) -> None:
        self.started = time.monotonic()

    def timed(self, method: str, call: Callable[..., T], *args: Any) -> T:
        """call(*args), keeping the slowest non-polling RPC."""
        start = time.monotonic()
        result = call(*args)
        elapsed = time.monotonic() - start
        with self.lock:
            self.latency[method] = max(self.latency.get(method, 0.0), elapsed)
        return result

    def mark(self, marks: dict[int, float], round_: int, first: bool) -> None:
        now = time.monotonic()
        with self.lock:
            if not first or round_ not in marks:
                marks[round_] = now

    def report(self, retries: float) -> str:
        """The one LOAD line: wall times measured here, n/a for what never happened."""

        def span(start: float | None, end: float | None) -> str:
            return "n/a" if start is None or end is None else f"{end - start:.2f}s"

        rounds = ", ".join(
            f"round {r} {span(self.first_task.get(r), self.last_ack.get(r))}" for r in range(1, ROUNDS + 1)
        )
        registration = span(self.started or None, max(self.registered, default=None))
        slowest = ", ".join(f"{m} {s * 1000:.0f}" for m, s in sorted(self.latency.items(), key=lambda i: -i[1]))
        return (
            f"LOAD: {N} agents, registration {registration}, {rounds}, "
            f"max RPC latency {max(self.latency.values(), default=0.0) * 1000:.0f} ms "
            f"(by method, ms: {slowest or 'none'}), client retries {retries:.0f}"
        )


@dataclass
class Outcome:
    """What one simulated agent was told."""

    uploads: dict[int, str] = field(default_factory=dict)  # round -> the coordinator's message
    replays: dict[int, str] = field(default_factory=dict)
    finished: bool = False


class Agent(threading.Thread):
    """A light agent: register, one heartbeat, then poll, download, upload noise, until FINISHED."""

    def __init__(self, index: int, swarm: Swarm) -> None:
        super().__init__(name=agent_id(index), daemon=True)
        self.index = index
        self.swarm = swarm
        self.outcome = Outcome()
        self.metrics = AgentMetrics()
        self.error: BaseException | None = None

    def run(self) -> None:
        client = CoordinatorClient(self.swarm.address, self.name, self.metrics, retry=RetryPolicy(give_up_s=30))
        try:
            self._run(client)
        except BaseException as err:
            self.error = err
            self.swarm.start.abort()  # nobody waits for an agent that is gone, and the others stop
            self.swarm.stop.set()
        finally:
            client.close()

    def _run(self, client: CoordinatorClient) -> None:
        swarm = self.swarm
        swarm.start.wait()
        swarm.timed("Register", client.register, PROFILE, SPEC, "load-test")
        with swarm.lock:
            swarm.registered.append(time.monotonic())
        assert swarm.timed("Heartbeat", client.heartbeat, "idle"), "a registered agent must be known"
        while not swarm.stop.is_set():
            task = client.get_task(POLL_S)
            if task.kind is TaskKind.FINISHED:
                self.outcome.finished = True
                return
            if task.kind is not TaskKind.WAIT:
                self._train(client, task)

    def _train(self, client: CoordinatorClient, task: Task) -> None:
        """Download, add seeded noise, upload; in REPLAY_ROUND send the same upload again."""
        swarm = self.swarm
        assert task.kind is TaskKind.TRAIN and task.plan is not None, task
        assert task.round not in self.outcome.uploads, f"a second TRAIN task for round {task.round}: {task}"
        swarm.mark(swarm.first_task, task.round, first=True)
        sent = swarm.timed("DownloadGlobal", client.download, task.global_round, task.plan.plan_id)
        generator = torch.Generator().manual_seed(self.index * 1000 + task.round)
        tensors = {n: t + 0.01 * torch.randn(t.shape, generator=generator, dtype=t.dtype) for n, t in sent.items()}
        meta = UpdateMeta(
            agent_id=self.name,
            round=task.round,
            plan_id=task.plan.plan_id,
            samples=SAMPLES,
            steps=1,
            train_seconds=0.01,
            train_loss=0.69,
            peak_memory_bytes=1,
        )
        self.outcome.uploads[task.round] = swarm.timed("UploadUpdate", client.upload, meta, tensors)
        if task.round == REPLAY_ROUND:
            self.outcome.replays[task.round] = swarm.timed("UploadUpdate", client.upload, meta, tensors)
        swarm.mark(swarm.last_ack, task.round, first=False)


def counter(registry_value: float | None) -> float:
    return float(registry_value or 0.0)


def test_200_agents_register_beat_and_upload_concurrently_each_update_counted_once(tmp_path: Path) -> None:
    # Prepare
    run_dir = tmp_path / "run"
    coordinator = launch(
        run_dir,
        run=RunSection(
            rounds=ROUNDS,
            min_agents=N,
            round_deadline_s=120,
            registration_timeout_s=60,
            agent_timeout_s=60,
            heartbeat_interval_s=5,
            run_dir=run_dir,
            finish_grace_s=5,
        ),
        # 32 worker threads for 200 agents: waiting polls hold none (the asyncio transport)
        server=ServerSection(host="127.0.0.1", port=0, workers=32, chunk_bytes=1024, max_chunk_bytes=4096),
    )
    swarm = Swarm(coordinator.address)
    agents = [Agent(index, swarm) for index in range(N)]
    ids = sorted(agent.name for agent in agents)

    # Execute
    try:
        for agent in agents:
            agent.start()
        end = time.monotonic() + 2 * WAIT_S
        for agent in agents:
            agent.join(timeout=max(end - time.monotonic(), 0.0))
        errors = {agent.name: agent.error for agent in agents if agent.error is not None}
        summary = coordinator.finished() if not errors else {}  # an agent's error says more than the run's
    finally:
        swarm.stop.set()
        for agent in agents:
            agent.join(timeout=WAIT_S)
        coordinator.stop()
    retries = sum(
        counter(agent.metrics.registry.get_sample_value("fedpipe_edge_rpc_retries_total", {"method": m}))
        for agent in agents
        for m in ("Register", "GetTask", "DownloadGlobal", "UploadUpdate")
    )
    print(swarm.report(retries))

    # Assert
    assert not errors, f"{len(errors)} agents failed, e.g. {next(iter(errors.items()))}"
    assert not [agent.name for agent in agents if agent.is_alive()], "every agent thread ended"
    assert all(agent.outcome.finished for agent in agents), "every agent heard FINISHED"
    assert [r["round"] for r in summary["rounds"]] == list(range(1, ROUNDS + 1))
    for record in summary["rounds"]:
        assert sorted(record["agents"]) == ids and not record["dropped"], record["round"]
    lines = (run_dir / "rounds.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["round"] for r in records] == list(range(1, ROUNDS + 1))
    for record in records:
        assert sorted(record["agents"]) == ids and record["dropped"] == [], record["round"]
        assert record["samples"] == N * SAMPLES
    for round_ in range(1, ROUNDS + 1):  # each accepted update took exactly one place in its round's count
        seen = [ACCEPTED.fullmatch(agent.outcome.uploads[round_]) for agent in agents]
        assert all(m is not None and m.group(1) == str(round_) and m.group(3) == str(N) for m in seen), round_
        assert sorted(int(m.group(2)) for m in seen if m is not None) == list(range(1, N + 1))
    for agent in agents:
        assert list(agent.outcome.replays) == [REPLAY_ROUND], agent.name
        assert all("replay" in message for message in agent.outcome.replays.values()), agent.outcome.replays
    sample = coordinator.orchestrator.metrics.registry.get_sample_value
    accepted = {a: counter(sample("fedpipe_updates_accepted_total", {"agent": a})) for a in ids}
    replayed = {a: counter(sample("fedpipe_updates_replayed_total", {"agent": a})) for a in ids}
    assert sum(accepted.values()) == ROUNDS * N
    assert {a: n for a, n in accepted.items() if n != ROUNDS} == {}
    assert {a: n for a, n in replayed.items() if n != 1} == {}
    assert counter(sample("fedpipe_rounds_completed_total")) == ROUNDS
    rejected = {r: counter(sample("fedpipe_updates_rejected_total", {"reason": r})) for r in REJECT_REASONS.values()}
    assert sum(rejected.values()) == 0, rejected
