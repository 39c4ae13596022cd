"""Heartbeat latency while 1,000 agents hold task polls open, on the asyncio transport and the threaded one.

    .venv/bin/python bench/poll_scale.py [--agents 1000] [--seconds 30]

In this process: the real coordinator admission (orchestrator not started, so every poll is a WAIT held for
its whole wait) with N agents registered, served by one of
  `asyncio`     `coordinator.server.start_server` as shipped (server.workers 64);
  `threads-64`  the previous transport, rebuilt here: grpc's threaded server over the same admission, with
                Heartbeat and GetTask as blocking handlers on 64 worker threads (the old default);
  `threads-N+32` the same with workers = agents + 32, the tuning the old design needed.
A client process (grpc.aio, the agents spread over one channel per 50) keeps every agent's poll open with
the agents' defaults (poll wait 10 s, a heartbeat every 5 s, first beats spread over the interval) and
times each Heartbeat from the moment it is due. The first 10 s are warm-up (polls opening) and not counted;
a Heartbeat not answered within 20 s counts as missed, one still waiting when the window closes as
unanswered. Settings are fixed before the run.

Writes bench/results/poll_scale.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from fedpipe.v1 import fedpipe_pb2 as pb
from fedpipe.v1 import fedpipe_pb2_grpc as pb_grpc
from harness import ROOT, machine, write_result
from upload_throughput import PROFILE  # the same hand-made CPU agent

from common import serde
from common.rpc import SERVER_OPTIONS
from common.security import ServerSecurity
from common.types import ModelSpec, ModuleShape
from coordinator.admission import Admission
from coordinator.config import CoordinatorConfig, EvaluationSection, MetricsSection, RunSection, ServerSection
from coordinator.metrics import CoordinatorMetrics
from coordinator.orchestrator import Orchestrator
from coordinator.planner import uniform_plan
from coordinator.registry import Registry
from coordinator.server import start_server
from coordinator.strategy import get_strategy

POLL_WAIT_S = 10.0  # edge_agent's poll_wait_s default
HEARTBEAT_S = 5.0  # run.heartbeat_interval_s default
WARMUP_S = 10.0
MISSED_S = 20.0
PER_CHANNEL = 50
HIDDEN = 64

LABELS = ("negative", "positive")
SPEC = ModelSpec(
    fingerprint="bench-poll",
    model_type="bench",
    task="seq-cls",
    labels=LABELS,
    candidates=tuple(ModuleShape(f"layers.{i}.proj", HIDDEN, HIDDEN) for i in range(2)),
    heads=(),
    base_parameters=2 * HIDDEN * HIDDEN,
)


def agent_id(i: int) -> str:
    return f"agent-{i:04d}"


class ThreadedPolls(pb_grpc.CoordinatorServicer):
    """The previous transport's Heartbeat and GetTask: blocking handlers, one worker thread per waiting poll."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        known, round_ = self.admission.heartbeat(request.agent_id, request.state)
        return pb.HeartbeatResponse(known=known, current_round=round_)

    def GetTask(self, request: pb.GetTaskRequest, context: grpc.ServicerContext) -> pb.GetTaskResponse:
        return serde.task_to_pb(self.admission.get_task(request.agent_id, request.wait_s))


def coordinator(agents: int, workers: int, run_dir: Path) -> Orchestrator:
    config = CoordinatorConfig(
        insecure=True,
        labels=list(LABELS),
        server=ServerSection(host="127.0.0.1", port=0, workers=workers),
        metrics=MetricsSection(port=-1),
        run=RunSection(rounds=1, min_agents=agents + 1, run_dir=run_dir, heartbeat_interval_s=HEARTBEAT_S),
        evaluation=EvaluationSection(agents=False, heldout=None, initial=False),
    )
    from coordinator.cli import plan_options

    orchestrator = Orchestrator(
        config, Registry(SPEC), uniform_plan, plan_options(config), get_strategy("rank-padding"),
        CoordinatorMetrics(), "bench",
    )  # fmt: skip
    for i in range(agents):
        orchestrator.admission.register(agent_id(i), PROFILE, SPEC)
    return orchestrator


def serve(arm: str, orchestrator: Orchestrator, workers: int) -> tuple[int, Any]:
    """Start the arm's server; (port, stop function)."""
    if arm == "asyncio":
        section = orchestrator.config.server.model_copy(update={"workers": workers})
        serving = start_server(orchestrator.admission, section, orchestrator.metrics, ServerSecurity.insecure())
        return serving.port, lambda: serving.stop(grace_s=0)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=list(SERVER_OPTIONS))
    polls = ThreadedPolls(orchestrator.admission)  # type: ignore[abstract]  # only these two methods are called
    pb_grpc.add_CoordinatorServicer_to_server(polls, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return port, lambda: server.stop(0).wait(10)


def run_arm(arm: str, agents: int, workers: int, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        orchestrator = coordinator(agents, workers, Path(tmp))
        port, stop = serve(arm, orchestrator, workers)
        try:
            command = [sys.executable, __file__, "--client", str(port), "--agents", str(agents),
                       "--seconds", str(seconds)]  # fmt: skip
            print(f"{arm}: {agents} agents, {workers} workers, {seconds:g} s measured", flush=True)
            done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=seconds + 120)
        finally:
            stop()
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return {"arm": arm, "agents": agents, "workers": workers, **figures}


# ---------------------------------------------------------------- the client process


async def client(port: int, agents: int, seconds: float) -> dict[str, Any]:
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=list(SERVER_OPTIONS))
                for _ in range((agents + PER_CHANNEL - 1) // PER_CHANNEL)]  # fmt: skip
    stubs = [pb_grpc.CoordinatorStub(channel) for channel in channels]
    loop = asyncio.get_running_loop()
    start = loop.time()
    measure_from, end = start + WARMUP_S, start + WARMUP_S + seconds
    latencies: list[float] = []
    missed = errors = polls = 0
    outstanding: set[int] = set()  # agents whose measured beat is in flight
    rng = random.Random(0)

    async def poller(i: int) -> None:
        nonlocal polls, errors
        stub = stubs[i // PER_CHANNEL]
        while loop.time() < end:
            try:
                request = pb.GetTaskRequest(agent_id=agent_id(i), wait_s=POLL_WAIT_S)
                await stub.GetTask(request, timeout=POLL_WAIT_S + 30)
                polls += 1
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED and loop.time() < end:
                    errors += 1

    async def beater(i: int) -> None:
        nonlocal missed, errors
        stub = stubs[i // PER_CHANNEL]
        due = start + rng.uniform(0, HEARTBEAT_S)
        while due < end:
            await asyncio.sleep(max(0.0, due - loop.time()))
            if due >= measure_from:
                outstanding.add(i)
            try:
                await stub.Heartbeat(pb.HeartbeatRequest(agent_id=agent_id(i), state="idle"), timeout=MISSED_S)
                if due >= measure_from:
                    latencies.append(loop.time() - due)
            except grpc.aio.AioRpcError as err:
                if due >= measure_from:
                    if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        missed += 1
                    else:
                        errors += 1
            outstanding.discard(i)
            due += HEARTBEAT_S
            due = max(due, loop.time())  # a late beat does not bunch the next ones up

    tasks = [asyncio.ensure_future(poller(i)) for i in range(agents)]
    tasks += [asyncio.ensure_future(beater(i)) for i in range(agents)]
    await asyncio.sleep(end - loop.time())
    unanswered = len(outstanding)  # beats still waiting when the measurement ended
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close(None)
    latencies.sort()

    def quantile(q: float) -> float | None:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None

    return {
        "heartbeats": len(latencies),
        "missed": missed,
        "unanswered_at_end": unanswered,
        "errors": errors,
        "polls_answered": polls,
        "p50_ms": None if not latencies else 1e3 * statistics.median(latencies),
        "p99_ms": None if not latencies else 1e3 * quantile(0.99),  # type: ignore[operator]
        "max_ms": None if not latencies else 1e3 * latencies[-1],
    }


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--client", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        print(json.dumps(asyncio.run(client(args.client, args.agents, args.seconds))))
        return
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    arms = [("asyncio", 64), ("threads", 64), ("threads", args.agents + 32)]
    results = []
    for arm, workers in arms:
        result = run_arm(arm, args.agents, workers, args.seconds)
        print(json.dumps(result), flush=True)
        results.append(result)
    settings = {
        "poll_wait_s": POLL_WAIT_S,
        "heartbeat_s": HEARTBEAT_S,
        "warmup_s": WARMUP_S,
        "missed_after_s": MISSED_S,
    }
    write_result(ROOT / "bench" / "results" / "poll_scale.json", {"machine": machine(), **settings, "results": results})
    print("| transport | workers | heartbeats answered | p50 | p99 | max | missed (>20 s) | unanswered at end |")
    for r in results:
        print(f"| {r['arm']} | {r['workers']} | {r['heartbeats']} | {fmt(r['p50_ms'])} | {fmt(r['p99_ms'])} | "
              f"{fmt(r['max_ms'])} | {r['missed']} | {r['unanswered_at_end']} |")  # fmt: skip


if __name__ == "__main__":
    main()
