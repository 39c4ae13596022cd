"""A real coordinator gRPC server on 127.0.0.1 refusing malformed uploads, each with its exact status.

Every refusal must leave the global adapter untouched and the server serving: the same agent's valid
upload is accepted afterwards, and the round's aggregate is the sample-weighted mean of the valid
updates only. The coordinator and the agent's side come from rig.py.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
import torch
import xxhash
from fedpipe.v1 import fedpipe_pb2 as pb
from fedpipe.v1 import fedpipe_pb2_grpc as pb_grpc
from rig import (
    AGENT_A,
    AGENT_B,
    ALPHA,
    BASE_PATH,
    CHUNK_BYTES,
    HEAD_B,
    HEAD_W,
    HIDDEN,
    MAX_CHUNK_BYTES,
    NO_LIMIT,
    PAYLOAD_BYTES,
    Q_A,
    Q_B,
    QUERY,
    RANK,
    RPC_TIMEOUT_S,
    SAMPLES_A,
    SAMPLES_B,
    SPEC,
    VALUE,
    WIRE_NAMES,
    Assignment,
    Coordinator,
    Upload,
    get_task,
    launch,
    refused,
    register,
    train_assignment,
    upload,
)
from safetensors.torch import load_file

from common import transfer
from common.adapters import GlobalAdapter, to_peft_key
from common.types import TaskKind
from coordinator.orchestrator import Orchestrator
from coordinator.round_state import RunAborted
from coordinator.servicer import REJECT_REASONS

pytestmark = pytest.mark.integration


@pytest.fixture
def start_coordinator(tmp_path: Path) -> Iterator[Callable[[int], Coordinator]]:
    """Starts coordinators with a given max_upload_bytes; stops every one of them afterwards."""
    started: list[Coordinator] = []

    def start(max_upload_bytes: int) -> Coordinator:
        started.append(launch(tmp_path / f"run-{len(started)}", max_upload_bytes))
        return started[-1]

    yield start
    for coordinator in started:
        coordinator.stop()


@pytest.fixture
def coordinator(start_coordinator: Callable[[int], Coordinator]) -> Coordinator:
    """A coordinator whose upload size limit never bites."""
    return start_coordinator(NO_LIMIT)


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
    global_ = orchestrator.state.global_
    assert isinstance(global_, GlobalAdapter)
    named: dict[str, torch.Tensor] = dict(global_.heads)
    for module, pair in global_.lora.items():
        named[f"{module}::a"], named[f"{module}::b"] = pair.a, pair.b
    digest = hashlib.sha256(f"round {global_.round}".encode())
    for name in sorted(named):
        digest.update(name.encode())
        digest.update(transfer.tensor_bytes(named[name]))
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
    """The round-1 global is the sample-weighted mean of exactly these two updates: heads as they are, the
    adapter as the best rank-RANK approximation of the mean of the products (B folded by alpha / r)."""
    global_ = orchestrator.state.global_
    assert isinstance(global_, GlobalAdapter) and global_.round == 1
    wa, wb = a.meta.samples, b.meta.samples
    torch.testing.assert_close(global_.heads[HEAD_W], weighted_mean((a.tensors[HEAD_W], wa), (b.tensors[HEAD_W], wb)))
    products = [(u.tensors[Q_B].double() @ u.tensors[Q_A].double() * (ALPHA / RANK), u.meta.samples) for u in (a, b)]
    mean = weighted_mean(*products).double()
    u, s, vh = torch.linalg.svd(mean)
    best = (u[:, :RANK] * s[:RANK]) @ vh[:RANK]
    pair = global_.lora[QUERY]
    torch.testing.assert_close(pair.b.double() @ pair.a.double(), best, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- the download


def test_download_is_a_verified_chunked_copy_of_the_global(open_round: OpenRound) -> None:
    # Prepare
    global_ = open_round.coordinator.orchestrator.state.global_
    assert isinstance(global_, GlobalAdapter) and global_.round == 0

    # Execute: the fixture downloaded through the real server
    a = open_round.a

    # Assert: header first, 1 KiB chunks, the bytes match the declared size and checksum
    assert (a.task.round, a.task.global_round) == (1, 0)
    assert [info.name for info in a.header.tensors] == [Q_A, Q_B, f"{VALUE}.lora_A", f"{VALUE}.lora_B", HEAD_W, HEAD_B]
    assert a.header.total_bytes == PAYLOAD_BYTES
    assert [len(chunk) for chunk in a.chunks] == [CHUNK_BYTES] * 4 + [PAYLOAD_BYTES - 4 * CHUNK_BYTES]
    assert xxhash.xxh3_128(b"".join(a.chunks)).digest() == a.header.xxh3_128
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


def nan_in_query_b(payload: bytes) -> bytes:
    """The payload with a NaN written over query.lora_B's second value (it follows query.lora_A), the header's
    checksum left as it was."""
    at = 4 * RANK * HIDDEN + 4
    return payload[:at] + struct.pack("<f", float("nan")) + payload[at + 4 :]


def poisoned(value: torch.Tensor, bad: float) -> torch.Tensor:
    """A copy of value with one element replaced by bad."""
    copy = value.clone()
    copy.view(-1)[1] = bad
    return copy


def with_header_edit(
    messages: list[pb.UploadUpdateRequest], edit: Callable[[pb.PayloadHeader], None]
) -> list[pb.UploadUpdateRequest]:
    """The stream with its payload header edited in place (sizes and checksum left as they were)."""
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
    sits_out: bool = False  # refused for what it holds: its agent is not asked again this round


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
            sits_out=True,
        ),
        id="nan",
    ),
    pytest.param(
        Refusal(
            lambda u: u.with_tensor(HEAD_B, poisoned(u.tensors[HEAD_B], float("-inf"))).messages(),
            INVALID,
            r"tensors\[classifier\.bias\]: holds NaN or Inf values",
            sits_out=True,
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
            r"payload\.xxh3_128: checksum does not match the bytes received",
        ),
        id="corrupted-bytes-wrong-checksum",
    ),
    pytest.param(
        # The coordinator screens each tensor as its bytes arrive, before the checksum is known: a NaN that is
        # only corruption must be answered as corruption, and must not make the agent sit the round out.
        Refusal(
            lambda u: u.messages(edit_payload=nan_in_query_b),
            DATA_LOSS,
            r"payload\.xxh3_128: checksum does not match the bytes received",
        ),
        id="corruption-that-reads-as-nan",
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
            r"samples: 1000000 exceeds the \d+ this plan allows",
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
    if case.sits_out:
        # The agent is not asked to retrain what it would send again: it sits the round out, and the round
        # (quorum 2) closes without aggregating once agent-b uploaded.
        code, details = refused(lambda: upload(open_round.stub, valid_a.messages()))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "sits out round 1" in details
        assert upload(open_round.stub, valid_b.messages()).message == "accepted for round 1 (1/2)"
        summary = open_round.coordinator.finished()
        assert global_digest(orchestrator) == before
        assert "1 of the 2 updates needed" in summary["rounds"][0]["failure"]
        return
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
    global_ = coordinator.orchestrator.state.global_
    assert isinstance(global_, GlobalAdapter)
    saved = state[to_peft_key(Q_B)].double() @ state[to_peft_key(Q_A)].double() * (ALPHA / RANK)
    held = global_.lora[QUERY].b.double() @ global_.lora[QUERY].a.double()
    torch.testing.assert_close(saved, held, atol=1e-6, rtol=1e-5)
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
