"""Secure aggregation through real gRPC: agents driven step by step over raw stubs against an in-process
coordinator. What the coordinator holds of any one agent is uniform, the sum is the plain sum, an agent killed
after masking is recovered, too few survivors skip the round, and out-of-turn or repeated steps are refused."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from fedpipe.v1 import fedpipe_pb2 as pb
from rig import RPC_TIMEOUT_S, SPEC, Assignment, Coordinator, get_task, launch, refused, register, train_assignment

from common import linear, serde, transfer
from common.adapters import GlobalAdapter
from common.secagg import MASKED, Params, byte_chi_square
from common.types import TaskKind
from coordinator.admission import Admission
from coordinator.config import DpSection, PrivacySection, RunSection, SecureAggregationSection
from edge_agent.secagg import SecAggClient, secure_input

AGENTS = ("agent-a", "agent-b", "agent-c", "agent-d")  # complete graph, k = 3, threshold 2
BITS = 24


class SecureAgent:
    """One agent doing a secure round's steps by hand over the stub."""

    def __init__(self, coordinator: Coordinator, agent_id: str, seed: int) -> None:
        self.stub = coordinator.stub
        self.agent_id = agent_id
        self.assignment: Assignment = train_assignment(self.stub, agent_id)
        plan = self.assignment.plan
        assert plan.secure is not None, "the TRAIN task of a secure round says so"
        self.secure = plan.secure
        self.upload = self.assignment.update(seed=seed, samples=20)
        self.terms = linear.terms(self.upload.tensors, self.assignment.tensors, plan, self.secure.layout)
        self.client = SecAggClient(agent_id)
        self.encoded: torch.Tensor | None = None

    def advertise(self) -> None:
        share_key, mask_key = self.client.advertise()
        request = pb.AdvertiseKeysRequest(
            agent_id=self.agent_id, round=self.assignment.task.round, plan_id=self.assignment.plan.plan_id,
            keys=pb.PeerKeys(share_key=share_key, mask_key=mask_key),
        )  # fmt: skip
        self.stub.AdvertiseKeys(request, timeout=RPC_TIMEOUT_S)

    def task(self, kind: TaskKind) -> Any:
        task = get_task(self.stub, self.agent_id)
        assert task.kind is kind, task
        assert task.secagg is not None
        return task.secagg

    def share(self) -> dict[str, bytes]:
        step = self.task(TaskKind.SECAGG_SHARE)
        length = sum(math.prod(s) for s in self.secure.layout.values())
        params = Params(self.secure.tag, step.participants, step.neighbours, step.threshold, BITS, length)
        self.client.join(params)
        sealed = self.client.share(step.keys)
        self.stub.ShareKeys(pb.ShareKeysRequest(agent_id=self.agent_id, round=1, sealed=sealed), timeout=RPC_TIMEOUT_S)
        return sealed

    def mask(self) -> None:
        step = self.task(TaskKind.SECAGG_MASK)
        self.client.receive(step.sealed)
        self.encoded = secure_input(self.terms, self.client.params, self.secure.clip_norm, step.noise_std)
        header, encoded = transfer.encode_payload({MASKED: self.client.masked(self.encoded)})
        first = pb.UploadUpdateRequest(header=serde.update_header_to_pb(self.upload.meta, header))
        chunks = [pb.UploadUpdateRequest(chunk=c) for c in transfer.chunked(bytes(encoded), 1024)]
        answer = self.stub.UploadUpdate(iter([first, *chunks]), timeout=RPC_TIMEOUT_S)
        assert answer.accepted, answer.message

    def unmask(self) -> None:
        step = self.task(TaskKind.SECAGG_UNMASK)
        revealed = self.client.unmask(step.survivors, step.dropped)
        self.stub.Unmask(serde.revealed_to_pb(self.agent_id, 1, revealed), timeout=RPC_TIMEOUT_S)


def secure_coordinator(tmp_path: Path, dp: DpSection | None = None) -> Coordinator:
    run = RunSection(
        rounds=1, min_agents=4, round_deadline_s=20.0, registration_timeout_s=10.0, agent_timeout_s=60.0,
        run_dir=tmp_path / "run", finish_grace_s=0.0,
    )  # fmt: skip
    secure = SecureAggregationSection(enabled=True, step_deadline_s=3.0, fraction_bits=BITS, signed_keys=False)
    privacy = PrivacySection(secure_aggregation=secure, dp=dp or DpSection())
    coordinator = launch(tmp_path / "run", run=run, privacy=privacy)
    for agent in AGENTS:
        register(coordinator.stub, agent)
    return coordinator


def linear_mean(before: GlobalAdapter, agents: Mapping[str, SecureAgent], clip: float = 0.0) -> GlobalAdapter:
    """The plain mean of the agents' laid-out changes: what the masked sum must give."""
    plans = {a: agent.assignment.plan for a, agent in agents.items()}
    layout = linear.layout(before, plans, SPEC)
    sums = {name: torch.zeros_like(count) for name, count in layout.items()}
    for agent in agents.values():
        terms = linear.clip(agent.terms, clip)[0] if clip else agent.terms
        for name, value in terms.items():
            sums[name] += value
    return linear.apply_mean(before, sums, layout, SPEC)


def differences(after: GlobalAdapter, reference: GlobalAdapter) -> torch.Tensor:
    parts = [(after.lora[m].a - reference.lora[m].a).flatten() for m in reference.lora]
    parts += [(after.lora[m].b - reference.lora[m].b).flatten() for m in reference.lora]
    parts += [(after.heads[h] - reference.heads[h]).flatten() for h in reference.heads]
    return torch.cat(parts).double()


def test_the_coordinator_holds_only_uniform_masked_vectors_and_unmasks_the_plain_sum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: record everything admission is handed to finish an upload with
    held: list[dict[str, torch.Tensor]] = []
    finish = Admission.finish_update

    def recording(self: Admission, opened: Any, tensors: Mapping[str, torch.Tensor], screened: Any = None) -> Any:
        held.append({name: t.clone() for name, t in tensors.items()})
        return finish(self, opened, tensors, screened)

    monkeypatch.setattr(Admission, "finish_update", recording)
    coordinator = secure_coordinator(tmp_path)
    try:
        # Execute: all four train, advertise, share, mask; agent-c is killed before it unmasks
        agents = {a: SecureAgent(coordinator, a, seed=i) for i, a in enumerate(AGENTS)}
        before = coordinator.orchestrator.state.global_
        assert isinstance(before, GlobalAdapter)
        for agent in agents.values():
            agent.advertise()
        sealed = agents["agent-a"].share()
        # a second, different set of shares from the same agent, and shares for a round that is not open
        other = agents["agent-a"].client.share(agents["agent-a"].client.peers)
        code, details = refused(
            lambda: coordinator.stub.ShareKeys(pb.ShareKeysRequest(agent_id="agent-a", round=1, sealed=other))
        )
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "already sent its shares" in details
        code, details = refused(
            lambda: coordinator.stub.ShareKeys(pb.ShareKeysRequest(agent_id="agent-a", round=2, sealed=sealed))
        )
        assert code is grpc.StatusCode.FAILED_PRECONDITION and "no secure round 2" in details
        for name in ("agent-b", "agent-c", "agent-d"):
            agents[name].share()
        for agent in agents.values():
            agent.mask()
        for name in ("agent-a", "agent-b", "agent-d"):
            agents[name].unmask()
        summary = coordinator.finished()
        after = coordinator.orchestrator.state.global_
    finally:
        coordinator.stop()

    # Assert: admission held one int64 vector per agent, each uniform, none the agent's own encoding
    assert len(held) == 4 and all(list(t) == [MASKED] and t[MASKED].dtype == torch.int64 for t in held)
    for tensors, agent in zip(held, agents.values(), strict=True):
        assert byte_chi_square(tensors[MASKED]) < 400.0
        assert agent.encoded is not None and byte_chi_square(agent.encoded) > 400.0
    # the new global is the plain mean of all four changes (agent-c's self-mask rebuilt from the others' shares)
    assert isinstance(after, GlobalAdapter)
    assert float(differences(after, linear_mean(before, agents)).abs().max()) < 1e-5
    assert summary["rounds"][0]["failure"] is None and sorted(summary["rounds"][0]["agents"]) == list(AGENTS)
    registry = coordinator.orchestrator.metrics.registry
    assert registry.get_sample_value("fedpipe_rounds_completed_total") == 1
    assert registry.get_sample_value("fedpipe_secagg_participants") == 4
    assert registry.get_sample_value("fedpipe_secagg_missed_total", {"agent": "agent-c", "stage": "unmask"}) == 1
    assert registry.get_sample_value("fedpipe_secagg_missed_total", {"agent": "agent-a", "stage": "unmask"}) == 0
    assert (registry.get_sample_value("fedpipe_secagg_step_seconds", {"stage": "unmask"}) or 0.0) >= 3.0  # for c


def test_fewer_survivors_than_the_threshold_skip_the_round(tmp_path: Path) -> None:
    coordinator = secure_coordinator(tmp_path)
    try:
        agents = {a: SecureAgent(coordinator, a, seed=i) for i, a in enumerate(AGENTS)}
        before = coordinator.orchestrator.state.global_
        for agent in agents.values():
            agent.advertise()
        for agent in agents.values():
            agent.share()
        agents["agent-a"].mask()  # the others drop after sharing: 1 survivor, threshold 2
        summary = coordinator.finished()
        after = coordinator.orchestrator.state.global_
    finally:
        coordinator.stop()
    failure = summary["rounds"][0]["failure"]
    assert "under the threshold 2" in failure, failure
    assert after is before  # nothing published
    registry = coordinator.orchestrator.metrics.registry
    assert registry.get_sample_value("fedpipe_rounds_failed_total", {"reason": "secure_aggregation"}) == 1
    for name in ("agent-b", "agent-c", "agent-d"):
        assert registry.get_sample_value("fedpipe_secagg_missed_total", {"agent": name, "stage": "masking"}) == 1


def test_dp_under_secure_aggregation_splits_the_noise_across_agents(tmp_path: Path) -> None:
    # Prepare: z = 2, C = 0.5; each of 4 agents adds sd z C / sqrt(4), so the mean carries z C / 4
    z, clip = 2.0, 0.5
    coordinator = secure_coordinator(tmp_path, DpSection(enabled=True, clip_norm=clip, noise_multiplier=z))
    try:
        agents = {a: SecureAgent(coordinator, a, seed=i) for i, a in enumerate(AGENTS)}
        before = coordinator.orchestrator.state.global_
        assert isinstance(before, GlobalAdapter)
        assert all(agent.secure.clip_norm == clip for agent in agents.values())
        for agent in agents.values():
            agent.advertise()
        for agent in agents.values():
            agent.share()
        for agent in agents.values():
            agent.mask()
        for agent in agents.values():
            agent.unmask()
        summary = coordinator.finished()
        after = coordinator.orchestrator.state.global_
    finally:
        coordinator.stop()
    assert isinstance(after, GlobalAdapter)
    noise = differences(after, linear_mean(before, agents, clip))
    expected = z * clip / 4
    assert abs(float(noise.std()) - expected) < 4 * expected / math.sqrt(2 * noise.numel())
    assert summary["privacy"]["rounds"] == 1 and summary["privacy"]["noise_multiplier"] == z


def test_an_agent_whose_keys_come_after_the_deadline_waits_for_the_next_round(tmp_path: Path) -> None:
    # Prepare: four planned, three advertise within the 3 s training deadline
    run = RunSection(
        rounds=1, min_agents=3, round_deadline_s=3.0, registration_timeout_s=10.0, agent_timeout_s=60.0,
        run_dir=tmp_path / "run", finish_grace_s=0.0,
    )  # fmt: skip
    secure = SecureAggregationSection(enabled=True, step_deadline_s=3.0, fraction_bits=BITS, signed_keys=False)
    coordinator = launch(tmp_path / "run", run=run, privacy=PrivacySection(secure_aggregation=secure))
    try:
        for agent in AGENTS:
            register(coordinator.stub, agent)
        agents = {a: SecureAgent(coordinator, a, seed=i) for i, a in enumerate(AGENTS)}
        for name in AGENTS[:3]:
            agents[name].advertise()
        step = agents["agent-a"].task(TaskKind.SECAGG_SHARE)  # keys closed with the three

        # Execute: the late one polls, then tries to advertise anyway
        late = get_task(coordinator.stub, "agent-d", wait_s=0.2)
        code, details = refused(agents["agent-d"].advertise)
    finally:
        coordinator.stop()

    # Assert
    assert step.participants == ("agent-a", "agent-b", "agent-c")
    assert late.kind is TaskKind.WAIT and "closed its keys without yours" in late.message
    assert code is grpc.StatusCode.FAILED_PRECONDITION and "took its keys already" in details
