"""A real coordinator gRPC server on 127.0.0.1 refusing malformed uploads, each with its exact status.

Every refusal must leave the global adapter untouched and the server serving: the same agent's valid
upload is accepted afterwards, and the round's aggregate is the sample-weighted mean of the valid
updates only. The model is a hand-made two-module spec, so no real model is ever loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from fedpipe.v1 import fedpipe_pb2 as pb
from fedpipe.v1 import fedpipe_pb2_grpc as pb_grpc
from safetensors.torch import load_file

from common import serde
from common.adapters import to_peft_key
from common.metrics import CoordinatorMetrics
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
from coordinator.orchestrator import Orchestrator, RunAborted
from coordinator.planner import uniform_plan
from coordinator.registry import Registry
from coordinator.server import start_server
from coordinator.servicer import REJECT_REASONS
from coordinator.strategy import get_strategy

pytestmark = pytest.mark.integration

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
    server: grpc.Server
    channel: grpc.Channel
    stub: pb_grpc.CoordinatorStub
    clock: Clock
    runner: Runner

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
        with self.orchestrator.cond:
            self.orchestrator.cond.notify_all()
        self.runner.join(timeout=RPC_TIMEOUT_S)
        self.channel.close()
        self.server.stop(grace=None).wait(RPC_TIMEOUT_S)
        if self.runner.is_alive():
            raise RuntimeError("the orchestrator's run thread did not stop")


def coordinator_config(run_dir: Path, max_upload_bytes: int) -> CoordinatorConfig:
    """One round, two agents, small chunks, no evaluation and no metrics port."""
    return CoordinatorConfig(
        labels=list(LABELS),
        server=ServerSection(
            host="127.0.0.1",
            port=0,
            workers=8,
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


@pytest.fixture
def start_coordinator(tmp_path: Path) -> Iterator[Callable[[int], Coordinator]]:
    """Starts coordinators with a given max_upload_bytes; stops every one of them afterwards."""
    started: list[Coordinator] = []

    def start(max_upload_bytes: int) -> Coordinator:
        config = coordinator_config(tmp_path / f"run-{len(started)}", max_upload_bytes)
        clock = Clock()
        metrics = CoordinatorMetrics()
        orchestrator = Orchestrator(
            config,
            Registry(LABELS, clock=clock),
            uniform_plan,
            plan_options(config),  # exactly as the coordinator's CLI builds them
            get_strategy("rank-padding"),
            metrics,
            BASE_PATH,
        )
        server, port = start_server(orchestrator, config.server, metrics)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        runner = Runner(orchestrator)
        coordinator = Coordinator(
            config, orchestrator, server, channel, pb_grpc.CoordinatorStub(channel), clock, runner
        )
        started.append(coordinator)
        runner.start()
        return coordinator

    yield start
    for coordinator in started:
        coordinator.stop()


@pytest.fixture
def coordinator(start_coordinator: Callable[[int], Coordinator]) -> Coordinator:
    """A coordinator whose upload size limit never bites."""
    return start_coordinator(NO_LIMIT)


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
        header, payload = serde.encode_payload(self.tensors)
        if edit_payload is not None:
            payload = edit_payload(payload)
        first = pb.UploadUpdateRequest(header=serde.update_header_to_pb(self.meta, header))
        return [first, *(pb.UploadUpdateRequest(chunk=c) for c in serde.chunked(payload, chunk_bytes))]


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
    tensors = serde.decode_payload(header, chunks, NO_LIMIT, CHUNK_BYTES)  # verifies sizes and sha256
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


@dataclass(frozen=True)
class OpenRound:
    """A coordinator with round 1 open: both agents registered, tasked and holding the round-0 global."""

    coordinator: Coordinator
    a: Assignment
    b: Assignment

    @property
    def stub(self) -> pb_grpc.CoordinatorStub:
        return self.coordinator.stub


@pytest.fixture
def open_round(coordinator: Coordinator) -> OpenRound:
    """Round 1 open on a fresh coordinator."""
    for agent_id in (AGENT_A, AGENT_B):
        assert register(coordinator.stub, agent_id).chunk_bytes == CHUNK_BYTES
    return OpenRound(
        coordinator, train_assignment(coordinator.stub, AGENT_A), train_assignment(coordinator.stub, AGENT_B)
    )


# ---------------------------------------------------------------- oracles


def global_digest(orchestrator: Orchestrator) -> str:
    """sha256 over the round and every global tensor's bytes, in sorted name order."""
    global_ = orchestrator.global_
    assert global_ is not None
    named: dict[str, torch.Tensor] = dict(global_.heads)
    for module, pair in global_.lora.items():
        named[f"{module}::a"], named[f"{module}::b"] = pair.a, pair.b
    digest = hashlib.sha256(f"round {global_.round}".encode())
    for name in sorted(named):
        digest.update(name.encode())
        digest.update(serde.tensor_bytes(named[name]))
    return digest.hexdigest()


def weighted_mean(*weighted: tuple[torch.Tensor, int]) -> torch.Tensor:
    """sum w_i x_i / sum w_i, computed independently of the strategy code."""
    total = sum(weight for _, weight in weighted)
    acc = torch.zeros_like(weighted[0][0], dtype=torch.float64)
    for tensor, weight in weighted:
        acc += tensor.double() * weight
    return (acc / total).float()


def rejected(orchestrator: Orchestrator, code: grpc.StatusCode) -> float:
    """fedpipe_updates_rejected_total for the reason the servicer files this status under."""
    value = orchestrator.metrics.registry.get_sample_value(
        "fedpipe_updates_rejected_total", {"reason": REJECT_REASONS[code]}
    )
    return float(value or 0.0)


def assert_aggregated(orchestrator: Orchestrator, a: Upload, b: Upload) -> None:
    """The round-1 global is the sample-weighted mean of exactly these two updates (B folded by alpha / r)."""
    global_ = orchestrator.global_
    assert global_ is not None and global_.round == 1
    wa, wb = a.meta.samples, b.meta.samples
    torch.testing.assert_close(global_.heads[HEAD_W], weighted_mean((a.tensors[HEAD_W], wa), (b.tensors[HEAD_W], wb)))
    torch.testing.assert_close(global_.lora[QUERY].a, weighted_mean((a.tensors[Q_A], wa), (b.tensors[Q_A], wb)))
    folded_b = weighted_mean((a.tensors[Q_B], wa), (b.tensors[Q_B], wb)) * (ALPHA / RANK)
    torch.testing.assert_close(global_.lora[QUERY].b, folded_b)


# ---------------------------------------------------------------- the download


def test_download_is_a_verified_chunked_copy_of_the_global(open_round: OpenRound) -> None:
    # Prepare
    global_ = open_round.coordinator.orchestrator.global_
    assert global_ is not None and global_.round == 0

    # Execute: the fixture downloaded through the real server
    a = open_round.a

    # Assert: header first, 1 KiB chunks, the bytes match the declared size and sha256
    assert (a.task.round, a.task.global_round) == (1, 0)
    assert [info.name for info in a.header.tensors] == [Q_A, Q_B, f"{VALUE}.lora_A", f"{VALUE}.lora_B", HEAD_W, HEAD_B]
    assert a.header.total_bytes == PAYLOAD_BYTES
    assert [len(chunk) for chunk in a.chunks] == [CHUNK_BYTES] * 4 + [PAYLOAD_BYTES - 4 * CHUNK_BYTES]
    assert hashlib.sha256(b"".join(a.chunks)).digest() == a.header.sha256
    # ... and decode to the global adapter as peft loads it: A as is, B unfolded by r / alpha
    assert set(a.tensors) == WIRE_NAMES
    torch.testing.assert_close(a.tensors[Q_A], global_.lora[QUERY].a)
    torch.testing.assert_close(a.tensors[Q_B], global_.lora[QUERY].b / (ALPHA / RANK))
    torch.testing.assert_close(a.tensors[HEAD_W], global_.heads[HEAD_W])
    assert a.tensors[HEAD_W].abs().sum() > 0, "a random head, so a mix-up of tensors shows"


# ---------------------------------------------------------------- malformed uploads


def flip_byte(payload: bytes) -> bytes:
    """The payload with one byte changed in the middle: same size, wrong checksum."""
    middle = len(payload) // 2
    return payload[:middle] + bytes([payload[middle] ^ 0xFF]) + payload[middle + 1 :]


def poisoned(value: torch.Tensor, bad: float) -> torch.Tensor:
    """A copy of value with one element replaced by bad."""
    copy = value.clone()
    copy.view(-1)[1] = bad
    return copy


def with_header_edit(
    messages: list[pb.UploadUpdateRequest], edit: Callable[[pb.PayloadHeader], None]
) -> list[pb.UploadUpdateRequest]:
    """The stream with its payload header edited in place (sizes and sha256 left as they were)."""
    edit(messages[0].header.payload)
    return messages


def huge_query_a(header: pb.PayloadHeader) -> None:
    """Declare query.lora_A as 8 x 2^30 floats (32 GiB), total_bytes to match, and send no chunk."""
    del header.tensors[0].shape[:]
    header.tensors[0].shape.extend([RANK, 2**30])
    header.total_bytes = header.total_bytes - 4 * RANK * HIDDEN + 4 * RANK * 2**30


def unknown_dtype(header: pb.PayloadHeader) -> None:
    """Name a dtype FedPipe does not carry."""
    header.tensors[0].dtype = "int8"


@dataclass(frozen=True)
class Refusal:
    """A malformed upload built from a valid one, and the status and message the server must answer."""

    build: Callable[[Upload], list[pb.UploadUpdateRequest]]
    code: grpc.StatusCode
    details: str  # regular expression the status details must contain
    after_accepted: bool = False  # the agent's valid update was accepted before this one


INVALID, DATA_LOSS = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DATA_LOSS
ESC_QA = re.escape(Q_A)

REFUSALS = [
    pytest.param(
        Refusal(
            lambda u: u.with_tensor(Q_A, torch.zeros(RANK - 1, HIDDEN)).messages(),
            INVALID,
            rf"payload\.tensors\[{ESC_QA}\]\.shape: expected \(8, 32\), got \(7, 32\)",
        ),
        id="wrong-shape",
    ),
    pytest.param(
        Refusal(
            lambda u: with_header_edit(u.messages()[:1], huge_query_a),
            INVALID,
            rf"payload\.tensors\[{ESC_QA}\]\.shape: expected \(8, 32\), got \(8, 1073741824\)",
        ),
        id="huge-declared-shape-refused-from-header",
    ),
    pytest.param(
        Refusal(
            lambda u: u.with_tensor(HEAD_W, u.tensors[HEAD_W].half()).messages(),
            INVALID,
            r"payload\.tensors\[classifier\.weight\]\.dtype: expected float32, got float16",
        ),
        id="wrong-dtype-float16",
    ),
    pytest.param(
        Refusal(
            lambda u: with_header_edit(u.messages(), unknown_dtype),
            INVALID,
            rf"payload\.tensors\[{ESC_QA}\]\.dtype: 'int8' is not one of",
        ),
        id="unknown-dtype-name",
    ),
    pytest.param(
        Refusal(
            lambda u: u.with_tensor(Q_B, poisoned(u.tensors[Q_B], float("nan"))).messages(),
            INVALID,
            rf"tensors\[{re.escape(Q_B)}\]: holds NaN or Inf values",
        ),
        id="nan",
    ),
    pytest.param(
        Refusal(
            lambda u: u.with_tensor(HEAD_B, poisoned(u.tensors[HEAD_B], float("-inf"))).messages(),
            INVALID,
            r"tensors\[classifier\.bias\]: holds NaN or Inf values",
        ),
        id="inf",
    ),
    pytest.param(
        Refusal(lambda u: u.without(HEAD_B).messages(), INVALID, r"payload\.tensors: missing classifier\.bias"),
        id="missing-tensor",
    ),
    pytest.param(
        Refusal(
            lambda u: u.with_tensor("enc.layer.0.attention.self.key.lora_A", torch.zeros(RANK, HIDDEN)).messages(),
            INVALID,
            r"payload\.tensors: not in the plan: \['enc\.layer\.0\.attention\.self\.key\.lora_A'\]",
        ),
        id="extra-tensor",
    ),
    pytest.param(
        Refusal(
            lambda u: u.messages(edit_payload=lambda p: p[:-8]),
            DATA_LOSS,
            rf"payload: stream ended after {PAYLOAD_BYTES - 8} of {PAYLOAD_BYTES} bytes",
        ),
        id="truncated-stream",
    ),
    pytest.param(
        Refusal(
            lambda u: u.messages(edit_payload=lambda p: p + bytes(8)),
            DATA_LOSS,
            rf"payload: more bytes than the declared {PAYLOAD_BYTES}",
        ),
        id="overlong-stream",
    ),
    pytest.param(
        Refusal(
            lambda u: u.messages(edit_payload=flip_byte),
            DATA_LOSS,
            r"payload\.sha256: checksum does not match the bytes received",
        ),
        id="corrupted-bytes-wrong-sha256",
    ),
    pytest.param(
        Refusal(
            lambda u: u.messages(chunk_bytes=PAYLOAD_BYTES),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            rf"chunk of {PAYLOAD_BYTES} bytes exceeds the limit of {MAX_CHUNK_BYTES}",
        ),
        id="oversize-chunk",
    ),
    pytest.param(
        Refusal(
            lambda u: u.with_meta(agent_id="agent-ghost").messages(),
            grpc.StatusCode.NOT_FOUND,
            r"agent 'agent-ghost' is not registered",
        ),
        id="unknown-agent",
    ),
    pytest.param(
        Refusal(lambda u: u.with_meta(agent_id="").messages(), INVALID, r"header\.agent_id: empty"),
        id="empty-agent-id",
    ),
    pytest.param(
        Refusal(
            lambda u: u.with_meta(train_loss=float("nan")).messages(),
            INVALID,
            r"header\.train_loss: must be a finite number",
        ),
        id="nan-train-loss",
    ),
    pytest.param(
        Refusal(
            lambda u: u.with_meta(train_seconds=-5.0).messages(),
            INVALID,
            r"header\.train_seconds: must be finite and >= 0",
        ),
        id="negative-train-seconds",
    ),
    pytest.param(
        Refusal(
            lambda u: u.with_meta(samples=10**6).messages(),
            INVALID,
            r"samples: 1000000 exceeds the \d+ this plan allows on the agent's data",
        ),
        id="inflated-samples",
    ),
    pytest.param(
        Refusal(
            lambda u: u.with_meta(round=0).messages(),
            grpc.StatusCode.FAILED_PRECONDITION,
            r"round 0 is not open for uploads \(open round: 1\)",
        ),
        id="stale-round",
    ),
    pytest.param(
        Refusal(
            lambda u: u.with_meta(round=2).messages(),
            grpc.StatusCode.FAILED_PRECONDITION,
            r"round 2 is not open for uploads \(open round: 1\)",
        ),
        id="future-round",
    ),
    pytest.param(
        Refusal(
            lambda u: u.with_meta(plan_id="r1-agent-a-0000000000").messages(),
            INVALID,
            r"plan_id: 'r1-agent-a-0000000000' is not this round's plan for agent-a",
        ),
        id="wrong-plan-id",
    ),
    pytest.param(
        Refusal(
            lambda u: u.with_meta(samples=0).messages(),
            INVALID,
            r"samples: must be positive",
        ),
        id="zero-samples",
    ),
    pytest.param(
        Refusal(lambda u: u.messages()[1:], INVALID, r"header: an upload must start with its header"),
        id="chunks-without-header",
    ),
    pytest.param(
        Refusal(lambda u: [], INVALID, r"header: an upload must start with its header"),
        id="empty-stream",
    ),
    pytest.param(
        Refusal(
            lambda u: [*u.messages()[:2], u.messages()[0], *u.messages()[2:]],
            INVALID,
            r"message\[2\]: only chunks may follow the header",
        ),
        id="second-header-mid-stream",
    ),
    pytest.param(
        Refusal(
            lambda u: u.messages(),
            grpc.StatusCode.ALREADY_EXISTS,
            r"agent agent-a already uploaded round 1",
            after_accepted=True,
        ),
        id="duplicate-after-accepted",
    ),
]


@pytest.mark.parametrize("case", REFUSALS)
def test_malformed_upload_is_refused_and_changes_nothing(open_round: OpenRound, case: Refusal) -> None:
    # Prepare: agent-a's valid update, a different one to spoil, and agent-b's
    orchestrator = open_round.coordinator.orchestrator
    valid_a = open_round.a.update(seed=1, samples=SAMPLES_A)
    spoiled = open_round.a.update(seed=2, samples=SAMPLES_A)
    valid_b = open_round.b.update(seed=3, samples=SAMPLES_B)
    if case.after_accepted:
        assert upload(open_round.stub, valid_a.messages()).message == "accepted for round 1 (1/2)"
    before = global_digest(orchestrator)

    # Execute
    code, details = refused(lambda: upload(open_round.stub, case.build(spoiled)))

    # Assert: the exact status, a message naming the problem, the global untouched, the refusal counted
    assert code == case.code, details
    assert re.search(case.details, details), details
    assert global_digest(orchestrator) == before
    assert rejected(orchestrator, code) == 1
    # The server still serves, and nothing of the refused upload was kept: agent-a's valid update is
    # accepted as the round's first, and the aggregate is the mean of the two valid updates only.
    if not case.after_accepted:
        assert upload(open_round.stub, valid_a.messages()).message == "accepted for round 1 (1/2)"
    assert upload(open_round.stub, valid_b.messages()).message == "accepted for round 1 (2/2)"
    open_round.coordinator.finished()
    assert_aggregated(orchestrator, valid_a, valid_b)


def test_plan_over_max_upload_bytes_aborts_the_run_before_any_task(
    start_coordinator: Callable[[int], Coordinator],
) -> None:
    # Prepare: a limit under one honest update, so no planned update could ever be accepted
    coordinator = start_coordinator(MAX_CHUNK_BYTES)

    # Execute
    for agent_id in (AGENT_A, AGENT_B):
        register(coordinator.stub, agent_id)
    coordinator.runner.join(timeout=RPC_TIMEOUT_S)

    # Assert: the run stops with both sizes named instead of failing every round at its deadline,
    # and no agent was ever handed a TRAIN task
    assert not coordinator.runner.is_alive()
    assert isinstance(coordinator.runner.error, RunAborted)
    message = str(coordinator.runner.error)
    assert f"planned update is {PAYLOAD_BYTES} bytes, over server.max_upload_bytes {MAX_CHUNK_BYTES}" in message
    assert get_task(coordinator.stub, AGENT_A, wait_s=0.0).kind is TaskKind.WAIT


# ---------------------------------------------------------------- a valid round


def test_round_of_two_agents_is_their_sample_weighted_mean_written_as_a_peft_adapter(open_round: OpenRound) -> None:
    # Prepare
    coordinator = open_round.coordinator
    a = open_round.a.update(seed=1, samples=SAMPLES_A)
    b = open_round.b.update(seed=3, samples=SAMPLES_B)

    # Execute
    first = upload(open_round.stub, a.messages())
    second = upload(open_round.stub, b.messages())
    summary = coordinator.finished()

    # Assert: both accepted, the new global is the weighted mean
    assert (first.accepted, first.round, first.message) == (True, 1, "accepted for round 1 (1/2)")
    assert (second.accepted, second.round, second.message) == (True, 1, "accepted for round 1 (2/2)")
    assert summary["final_round"] == 1
    assert summary["rounds"][0]["agents"] == (AGENT_A, AGENT_B)
    assert summary["rounds"][0]["samples"] == SAMPLES_A + SAMPLES_B
    assert_aggregated(coordinator.orchestrator, a, b)
    # ... and rounds/0001 holds it as a peft adapter, B unfolded back to peft's scale
    directory = coordinator.config.run.run_dir / "rounds" / "0001"
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == BASE_PATH
    assert (config["r"], config["lora_alpha"]) == (RANK, ALPHA)
    assert config["target_modules"] == [QUERY, VALUE] and config["modules_to_save"] == ["classifier"]
    state = load_file(str(directory / "adapter_model.safetensors"))
    assert set(state) == {to_peft_key(name) for name in WIRE_NAMES}
    expected_b = weighted_mean((a.tensors[Q_B], SAMPLES_A), (b.tensors[Q_B], SAMPLES_B))
    torch.testing.assert_close(state[to_peft_key(Q_B)], expected_b)
    expected_head = weighted_mean((a.tensors[HEAD_W], SAMPLES_A), (b.tensors[HEAD_W], SAMPLES_B))
    torch.testing.assert_close(state[to_peft_key(HEAD_W)], expected_head)
    plans = json.loads((directory / "plans.json").read_text())
    assert {agent: entry["measured"]["samples"] for agent, entry in plans.items()} == {
        AGENT_A: SAMPLES_A,
        AGENT_B: SAMPLES_B,
    }
    assert all(entry["predicted"]["peak_memory_bytes"] > 0 for entry in plans.values())


# ---------------------------------------------------------------- registration


def test_registration_with_another_model_is_refused(coordinator: Coordinator) -> None:
    # Prepare: agent-a fixes the run's model
    register(coordinator.stub, AGENT_A)
    other = replace(SPEC, fingerprint="sha256:other-base")

    # Execute
    code, details = refused(lambda: register(coordinator.stub, AGENT_B, other))

    # Assert: both fingerprints named; agent-b may still join with the run's model
    assert code == grpc.StatusCode.FAILED_PRECONDITION, details
    assert "sha256:other-base" in details and SPEC.fingerprint in details, details
    assert set(coordinator.orchestrator.registry.all()) == {AGENT_A}
    assert register(coordinator.stub, AGENT_B).run_id == coordinator.orchestrator.run_id
