"""The asyncio transport: task polls and uploads that wait hold no worker thread, so heartbeats and
registrations are answered at once however many are open, with the fewest worker threads the config allows."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from fedpipe.v1 import fedpipe_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from rig import launch, register

from common import serde
from common.security import ServerSecurity
from common.types import TaskKind
from coordinator.config import RunSection, ServerSection
from coordinator.server import start_server

POLLS = 40
WAIT_S = 6.0


def observed(registry: CollectorRegistry, method: str, code: str) -> float | None:
    """Calls of method timed under code; the server times a call as its handler ends, which may be just
    after the client has its answer, so this waits up to 5 s for the first."""
    end = time.monotonic() + 5.0
    while True:
        count = registry.get_sample_value("fedpipe_rpc_duration_seconds_count", {"method": method, "code": code})
        if count is not None or time.monotonic() > end:
            return count
        time.sleep(0.05)


def test_open_polls_hold_no_worker_thread(tmp_path: Path) -> None:
    # Arrange: 4 worker threads (the least allowed) and 40 agents; the run never starts, so polls wait.
    run = RunSection(rounds=1, min_agents=1000, registration_timeout_s=120, run_dir=tmp_path, finish_grace_s=0)
    server = ServerSection(host="127.0.0.1", port=0, workers=4, max_calls_per_agent=2)
    coordinator = launch(tmp_path, run=run, server=server)
    try:
        agents = [f"agent-{i:02d}" for i in range(POLLS)]
        for agent in agents:
            register(coordinator.stub, agent)
        # Act: every agent holds a poll open, ten times the worker threads.
        polls = [
            coordinator.stub.GetTask.future(pb.GetTaskRequest(agent_id=agent, wait_s=WAIT_S), timeout=WAIT_S + 30)
            for agent in agents
        ]
        time.sleep(0.5)  # the polls reach the server
        start = time.monotonic()
        beats = [
            coordinator.stub.Heartbeat(pb.HeartbeatRequest(agent_id=agent, state="idle"), timeout=WAIT_S)
            for agent in agents
        ]
        late = register(coordinator.stub, "agent-late")  # a handler on a worker thread, while the polls wait
        answered_in = time.monotonic() - start
        still_waiting = sum(not poll.done() for poll in polls)
        registry = coordinator.orchestrator.metrics.registry
        open_during = registry.get_sample_value("fedpipe_task_polls_open")
        lag = registry.get_sample_value("fedpipe_event_loop_lag_seconds")
        tasks = [serde.task_from_pb(poll.result()) for poll in polls]
        end = time.monotonic() + 5.0  # each poll's count goes as its coroutine ends, just after its answer
        while registry.get_sample_value("fedpipe_task_polls_open") and time.monotonic() < end:
            time.sleep(0.05)
        open_after = registry.get_sample_value("fedpipe_task_polls_open")
    finally:
        coordinator.stop()

    # Assert: 40 heartbeats and a registration answered well before the polls' wait ran out, with every
    # poll still open meanwhile; then each poll answered WAIT at its end.
    assert all(beat.known for beat in beats)
    assert late.run_id == coordinator.orchestrator.run_id
    assert answered_in < WAIT_S / 2, f"heartbeats took {answered_in:.2f}s with {POLLS} polls open on 4 threads"
    assert still_waiting == POLLS
    assert open_during == POLLS and open_after == 0  # the operator's view of the same
    assert lag is not None and 0.0 <= lag < WAIT_S  # the loop's timer ran (lag measured after its first second)
    assert [task.kind for task in tasks] == [TaskKind.WAIT] * POLLS


def test_a_poll_its_client_gives_up_on_ends_on_the_server_at_once(tmp_path: Path) -> None:
    # Arrange: a coordinator that never starts its run, so a poll waits its whole wait.
    run = RunSection(rounds=1, min_agents=1000, registration_timeout_s=120, run_dir=tmp_path, finish_grace_s=0)
    coordinator = launch(tmp_path, run=run)
    try:
        register(coordinator.stub, "agent-a")
        # Act: a poll whose client gives up after 0.3 s of a 20 s wait, then a fresh one.
        try:
            coordinator.stub.GetTask(pb.GetTaskRequest(agent_id="agent-a", wait_s=20.0), timeout=0.3)
            gave_up = False
        except grpc.RpcError as err:
            gave_up = err.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        start = time.monotonic()
        task = serde.task_from_pb(coordinator.stub.GetTask(pb.GetTaskRequest(agent_id="agent-a", wait_s=0.0)))
        took = time.monotonic() - start
        samples = observed(coordinator.orchestrator.metrics.registry, "GetTask", "CANCELLED")
    finally:
        coordinator.stop()

    # Assert: the abandoned poll ended on the server as cancelled (timed under its own code), not after 20 s.
    assert gave_up
    assert task.kind is TaskKind.WAIT and took < 2.0
    assert samples == 1.0


def test_health_check_of_an_unknown_service_is_not_found_and_timed_so(tmp_path: Path) -> None:
    run = RunSection(rounds=1, min_agents=1000, registration_timeout_s=120, run_dir=tmp_path, finish_grace_s=0)
    coordinator = launch(tmp_path, run=run)
    try:
        health = health_pb2_grpc.HealthStub(coordinator.channel)
        known = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        samples = observed(coordinator.orchestrator.metrics.registry, "Check", "NOT_FOUND")
    finally:
        coordinator.stop()
    assert known == health_pb2.HealthCheckResponse.SERVING
    assert unknown.value.code() is grpc.StatusCode.NOT_FOUND
    assert samples == 1.0


def test_a_start_that_cannot_bind_leaves_nothing_running(tmp_path: Path) -> None:
    # Arrange: a port that is taken.
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    section = ServerSection(host="127.0.0.1", port=taken.getsockname()[1], workers=4, max_calls_per_agent=2)
    run = RunSection(rounds=1, min_agents=1000, registration_timeout_s=120, run_dir=tmp_path, finish_grace_s=0)
    coordinator = launch(tmp_path, run=run)
    admission, metrics = coordinator.orchestrator.admission, coordinator.orchestrator.metrics
    try:
        threads, fds = threading.active_count(), len(os.listdir("/proc/self/fd"))
        # Act: five starts on it.
        errors = []
        for _ in range(5):
            with pytest.raises(OSError) as failed:
                start_server(admission, section, metrics, ServerSecurity.insecure())
            errors.append(str(failed.value))
        after_threads, after_fds = threading.active_count(), len(os.listdir("/proc/self/fd"))
        watchers = len(admission.state.watchers)
    finally:
        coordinator.stop()
        taken.close()
    # Assert: each says which address, and no thread, descriptor or round-state watcher is left behind.
    assert all(f"127.0.0.1:{section.port}" in error for error in errors)
    assert after_threads == threads
    assert after_fds <= fds + 1  # (slack for one descriptor the runtime opens lazily)
    assert watchers == 1  # the running server's own


def test_uploads_waiting_on_their_bytes_hold_no_worker_thread(tmp_path: Path) -> None:
    # Arrange: 4 worker threads, and 8 uploads whose clients send nothing yet (a stalled link).
    run = RunSection(rounds=1, min_agents=1000, registration_timeout_s=120, run_dir=tmp_path, finish_grace_s=0)
    server = ServerSection(host="127.0.0.1", port=0, workers=4, max_calls_per_agent=2)
    coordinator = launch(tmp_path, run=run, server=server)
    release = threading.Event()

    def stalled() -> Iterator[pb.UploadUpdateRequest]:
        release.wait(30)
        yield from ()

    try:
        uploads = [coordinator.stub.UploadUpdate.future(stalled(), timeout=60) for _ in range(8)]
        time.sleep(0.5)  # the streams are open on the server
        # Act: a registration, which runs on a worker thread.
        start = time.monotonic()
        registered = register(coordinator.stub, "agent-new")
        took = time.monotonic() - start
        pending = sum(not upload.done() for upload in uploads)
        release.set()
        codes = []
        for upload in uploads:
            with pytest.raises(grpc.RpcError) as refused:
                upload.result()
            codes.append(refused.value.code())
    finally:
        release.set()
        coordinator.stop()

    # Assert: answered at once with the 8 uploads still open; each then refused for its missing header.
    assert registered.run_id and took < 2.0 and pending == 8
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 8
