"""An in-process coordinator on 127.0.0.1 for RPC-level tests, and an agent's side with raw stubs.

The model is a hand-made two-module spec, so no real model is ever loaded.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from fedpipe.v1 import fedpipe_pb2 as pb
from fedpipe.v1 import fedpipe_pb2_grpc as pb_grpc

from common import serde, transfer
from common.security import ServerSecurity
from common.types import DeviceProfile, ModelSpec, ModuleShape, Task, TaskKind, TrainPlan, UpdateMeta
from coordinator.cli import plan_options
from coordinator.config import (
    CoordinatorConfig,
    EvaluationSection,
    LoraSection,
    MetricsSection,
    RunSection,
    SelectionSection,
    ServerSection,
)
from coordinator.evaluation import Evaluator
from coordinator.metrics import CoordinatorMetrics
from coordinator.modes import Mode
from coordinator.orchestrator import Orchestrator
from coordinator.planner import uniform_plan
from coordinator.registry import Registry
from coordinator.server import Serving, start_server
from coordinator.strategy import get_strategy
from coordinator.tracking import Tracking

LABELS = ("negative", "positive")
HIDDEN = 32
RANK = 8
ALPHA = 16.0
QUERY = "enc.layer.0.attention.self.query"
VALUE = "enc.layer.0.attention.self.value"
Q_A, Q_B = f"{QUERY}.lora_A", f"{QUERY}.lora_B"
HEAD_W, HEAD_B = "classifier.weight", "classifier.bias"
SPEC = ModelSpec(
    fingerprint="sha256:tiny-bert-run",
    model_type="bert",
    task="seq-cls",
    labels=LABELS,
    candidates=(ModuleShape(QUERY, HIDDEN, HIDDEN), ModuleShape(VALUE, HIDDEN, HIDDEN)),
    heads=((HEAD_W, (2, HIDDEN)), (HEAD_B, (2,))),
    base_parameters=2 * HIDDEN * HIDDEN,
)
WIRE_NAMES = {Q_A, Q_B, f"{VALUE}.lora_A", f"{VALUE}.lora_B", HEAD_W, HEAD_B}
# float32 payload of one update: A (r x d) and B (d x r) per module, then the head weight and bias
PAYLOAD_BYTES = 4 * (2 * 2 * RANK * HIDDEN + 2 * HIDDEN + 2)  # 4360: five 1 KiB chunks, over max_chunk_bytes
CHUNK_BYTES = 1024
MAX_CHUNK_BYTES = 4096
NO_LIMIT = 1 << 30
PROFILE = DeviceProfile(
    device="cpu",
    device_name="test cpu",
    total_memory_bytes=8 * 2**30,
    free_memory_bytes=6 * 2**30,
    host_memory_bytes=8 * 2**30,
    flops_per_s=1e10,
    compute_dtype="float32",
    threads=1,
    num_train_samples=100,
    num_val_samples=10,
)
AGENT_A, AGENT_B = "agent-a", "agent-b"
SAMPLES_A, SAMPLES_B = 30, 10
RPC_TIMEOUT_S = 10.0
BASE_PATH = "tiny-bert"


# ---------------------------------------------------------------- a real coordinator in this process


class Clock:
    """The registry's clock. Once racing, every reading is a day past the last one, so every agent
    looks dead and every registration wait has timed out, whenever the run loop starts waiting."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.racing = False

    def __call__(self) -> float:
        if self.racing:
            self.offset += 86_400.0
        return time.monotonic() + self.offset


class Runner(threading.Thread):
    """Orchestrator.run() in the background, keeping its summary or its exception."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        super().__init__(name="orchestrator-run", daemon=True)
        self.orchestrator = orchestrator
        self.summary: dict[str, Any] | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.summary = self.orchestrator.run()
        except BaseException as err:
            self.error = err


@dataclass
class Coordinator:
    """A serving coordinator, its run loop and a raw stub talking to it."""

    config: CoordinatorConfig
    orchestrator: Orchestrator
    serving: Serving
    channel: grpc.Channel
    stub: pb_grpc.CoordinatorStub
    clock: Clock
    runner: Runner
    address: str

    def finished(self) -> dict[str, Any]:
        """The run's summary once run() returned by itself."""
        self.runner.join(timeout=RPC_TIMEOUT_S)
        assert not self.runner.is_alive(), "the run loop did not finish"
        assert self.runner.error is None, f"the run loop failed: {self.runner.error!r}"
        assert self.runner.summary is not None
        return self.runner.summary

    def stop(self) -> None:
        """End the run loop (agents look long dead, registration long over), then the server."""
        self.clock.racing = True
        with self.orchestrator.registry.changed:
            self.orchestrator.registry.changed.notify_all()
        with self.orchestrator.state.cond:
            self.orchestrator.state.notify()
        self.runner.join(timeout=RPC_TIMEOUT_S)
        self.channel.close()
        self.serving.stop(grace_s=None)
        if self.runner.is_alive():
            raise RuntimeError("the orchestrator's run thread did not stop")


def coordinator_config(run_dir: Path, max_upload_bytes: int) -> CoordinatorConfig:
    """One round, two agents, small chunks, no evaluation and no metrics port."""
    return CoordinatorConfig(
        insecure=True,
        labels=list(LABELS),
        server=ServerSection(
            host="127.0.0.1",
            port=0,
            workers=16,
            max_upload_bytes=max_upload_bytes,
            max_chunk_bytes=MAX_CHUNK_BYTES,
            chunk_bytes=CHUNK_BYTES,
        ),
        metrics=MetricsSection(port=-1),
        run=RunSection(
            rounds=1,
            min_agents=2,
            round_deadline_s=10.0,
            registration_timeout_s=10.0,
            agent_timeout_s=30.0,
            run_dir=run_dir,
            finish_grace_s=0.0,
        ),
        lora=LoraSection(rank=RANK, alpha=ALPHA, dropout=0.0, targets=["query", "value"]),
        selection=SelectionSection(mode="all"),
        evaluation=EvaluationSection(agents=False, heldout=None, initial=False),
    )


def launch(
    run_dir: Path,
    max_upload_bytes: int = NO_LIMIT,
    security: ServerSecurity | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    spec: ModelSpec = SPEC,
    mode: Mode | None = None,
    evaluator: Evaluator | None = None,
    tracking: Tracking | None = None,
    **sections: Any,
) -> Coordinator:
    """A serving coordinator with its run loop started; plaintext unless security and credentials are given.

    sections replace parts of the config, e.g. run=RunSection(...); call stop() when done.
    """
    config = coordinator_config(run_dir, max_upload_bytes).model_copy(update=sections)
    clock = Clock()
    metrics = CoordinatorMetrics()
    orchestrator = Orchestrator(
        config,
        Registry(spec, clock=clock),
        uniform_plan,
        plan_options(config),  # exactly as the coordinator's CLI builds them
        get_strategy("rank-padding"),
        metrics,
        BASE_PATH,
        evaluator=evaluator,
        mode=mode,
        tracking=tracking,
    )
    serving = start_server(orchestrator.admission, config.server, metrics, security or ServerSecurity.insecure())
    address = f"127.0.0.1:{serving.port}"
    channel = grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials)
    runner = Runner(orchestrator)
    coordinator = Coordinator(
        config, orchestrator, serving, channel, pb_grpc.CoordinatorStub(channel), clock, runner, address
    )
    runner.start()
    return coordinator


# ---------------------------------------------------------------- an agent's side, with raw stubs


@dataclass(frozen=True)
class Upload:
    """One upload, before it is turned into a stream; the with_* helpers return edited copies."""

    meta: UpdateMeta
    tensors: Mapping[str, torch.Tensor]

    def with_meta(self, **changes: Any) -> Upload:
        return replace(self, meta=replace(self.meta, **changes))

    def with_tensor(self, name: str, value: torch.Tensor) -> Upload:
        return replace(self, tensors={**self.tensors, name: value})

    def without(self, name: str) -> Upload:
        return replace(self, tensors={k: v for k, v in self.tensors.items() if k != name})

    def messages(
        self, chunk_bytes: int = CHUNK_BYTES, edit_payload: Callable[[bytes], bytes] | None = None
    ) -> list[pb.UploadUpdateRequest]:
        """Header then chunks, as an agent sends them; edit_payload changes the bytes after the header."""
        header, encoded = transfer.encode_payload(self.tensors)
        payload = bytes(encoded) if edit_payload is None else edit_payload(bytes(encoded))
        first = pb.UploadUpdateRequest(header=serde.update_header_to_pb(self.meta, header))
        return [first, *(pb.UploadUpdateRequest(chunk=c) for c in transfer.chunked(payload, chunk_bytes))]


@dataclass(frozen=True)
class Assignment:
    """An agent's TRAIN task and the global adapter it downloaded for it."""

    agent_id: str
    task: Task
    plan: TrainPlan
    header: pb.PayloadHeader
    chunks: list[bytes]
    tensors: dict[str, torch.Tensor]

    def update(self, seed: int, samples: int) -> Upload:
        """A plausible trained update: the download plus seeded noise, in float32."""
        generator = torch.Generator().manual_seed(seed)
        tensors = {n: t + 0.1 * torch.randn(t.shape, generator=generator) for n, t in self.tensors.items()}
        meta = UpdateMeta(
            agent_id=self.agent_id,
            round=self.task.round,
            plan_id=self.plan.plan_id,
            samples=samples,
            steps=3,
            train_seconds=0.5,
            train_loss=0.69,
            peak_memory_bytes=2**20,
        )
        return Upload(meta, tensors)


def train_round(coordinator: Coordinator, agents: Mapping[str, int]) -> None:
    """Each agent (id -> samples) takes its TRAIN task, downloads the global and uploads a plausible update."""
    for agent, samples in agents.items():
        assignment = train_assignment(coordinator.stub, agent)
        answer = upload(coordinator.stub, assignment.update(seed=len(agent), samples=samples).messages())
        assert answer.accepted, answer.message


def register(stub: pb_grpc.CoordinatorStub, agent_id: str, spec: ModelSpec = SPEC) -> pb.RegisterResponse:
    """Register with the test profile and a model spec."""
    request = pb.RegisterRequest(
        agent_id=agent_id,
        profile=serde.profile_to_pb(PROFILE),
        model=serde.spec_to_pb(spec),
        agent_version="test",
    )
    return stub.Register(request, timeout=RPC_TIMEOUT_S)


def get_task(stub: pb_grpc.CoordinatorStub, agent_id: str, wait_s: float = 5.0) -> Task:
    """Long-poll for the agent's task."""
    response = stub.GetTask(pb.GetTaskRequest(agent_id=agent_id, wait_s=wait_s), timeout=wait_s + RPC_TIMEOUT_S)
    return serde.task_from_pb(response)


def train_assignment(stub: pb_grpc.CoordinatorStub, agent_id: str) -> Assignment:
    """Get the TRAIN task and download the global it names; the stream must be a header then chunks."""
    task = get_task(stub, agent_id)
    assert task.kind is TaskKind.TRAIN, task
    assert task.plan is not None
    request = pb.DownloadGlobalRequest(agent_id=agent_id, global_round=task.global_round, plan_id=task.plan.plan_id)
    parts = list(stub.DownloadGlobal(request, timeout=RPC_TIMEOUT_S))
    assert parts and parts[0].WhichOneof("part") == "header"
    assert all(part.WhichOneof("part") == "chunk" for part in parts[1:])
    header, chunks = parts[0].header, [part.chunk for part in parts[1:]]
    tensors = transfer.decode_payload(header, chunks, NO_LIMIT, CHUNK_BYTES)  # verifies sizes and sha256
    return Assignment(agent_id, task, task.plan, header, chunks, tensors)


def upload(stub: pb_grpc.CoordinatorStub, messages: list[pb.UploadUpdateRequest]) -> pb.UploadUpdateResponse:
    """Send an upload stream as given."""
    return stub.UploadUpdate(iter(messages), timeout=RPC_TIMEOUT_S)


def refused(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """The status code and details of a call that must fail."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    assert isinstance(error, grpc.Call)
    return error.code(), error.details() or ""


def processes() -> list[tuple[int, int, str]]:
    """(pid, parent pid, command line) of every process on this machine (from /proc), this one left out."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # it ended while we looked
        found.append((int(entry.name), parent, command))
    return found


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains text."""
    return [pid for pid, _, command in processes() if text in command]
