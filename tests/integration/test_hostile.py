"""One hostile agent against a coordinator with its defaults, over real gRPC and mTLS on 127.0.0.1.

Mallory holds one valid certificate of the run's CA and a client of the tests' own; two or three honest
agents (agent-a, agent-b, agent-c, each over its own certificate) go on beside it. Every attack is refused
with a named status or neutralised, the coordinator keeps serving, honest calls go through during the
floods, and where a defence can be switched off a second case shows the attack would have worked.
RELIABILITY.md has the table of attacks and outcomes.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from io import StringIO
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from fedpipe.v1 import fedpipe_pb2 as pb
from fedpipe.v1 import fedpipe_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rig import (
    HEAD_B,
    PROFILE,
    Q_B,
    QUERY,
    RPC_TIMEOUT_S,
    SPEC,
    VALUE,
    Assignment,
    Coordinator,
    Upload,
    coordinator_config,
    get_task,
    launch,
    refused,
    register,
    train_assignment,
    upload,
)

from common import serde
from common.certs import agent_paths, create_ca, issue, write_bundle
from common.logs import EscapeControl
from common.security import ServerSecurity, server_security, token_digest
from common.types import CalibrationPoint, DeviceProfile, ModelSpec, ModuleShape, Quantization, TaskKind
from coordinator.config import EvaluationSection, LoraSection, SelectionSection, ServerSection, UpdatesSection
from coordinator.guard import CallLimits

pytestmark = pytest.mark.integration

HONEST = ("agent-a", "agent-b", "agent-c")
MALLORY = "mallory"
FORGED_CN = "mallory\n00:00:00 coordinator INFO run complete"  # a CN holds at most 64 characters
FLOOD = 100
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run's CA with certificates for the honest agents and mallory, and one whose name holds a newline."""
    out = tmp_path_factory.mktemp("pki")
    write_bundle(out, [*HONEST, MALLORY])
    ca = create_ca()
    forged = issue(ca, FORGED_CN)
    (out / "forged-ca.crt").write_bytes(ca.cert_pem)
    (out / "forged.crt").write_bytes(forged.cert_pem)
    (out / "forged.key").write_bytes(forged.key_pem)
    return out


def credentials(pki: Path, agent: str) -> grpc.ChannelCredentials:
    crt, key = agent_paths(pki, agent)
    return grpc.ssl_channel_credentials((pki / "ca.crt").read_bytes(), key.read_bytes(), crt.read_bytes())


def mtls(pki: Path, client_ca: Path | None = None) -> ServerSecurity:
    return server_security(
        False, pki / "coordinator.crt", pki / "coordinator.key", "mtls", client_ca or pki / "ca.crt", tokens=None
    )


class Run:
    """A coordinator with mTLS and one stub per agent, each over that agent's own certificate."""

    def __init__(self, coordinator: Coordinator, pki: Path) -> None:
        self.coordinator = coordinator
        self.pki = pki
        self.channels: list[grpc.Channel] = []
        self.stubs = {agent: self.stub(agent) for agent in (*HONEST, MALLORY)}

    def stub(self, agent: str) -> pb_grpc.CoordinatorStub:
        channel = grpc.secure_channel(self.coordinator.address, credentials(self.pki, agent))
        self.channels.append(channel)
        return pb_grpc.CoordinatorStub(channel)

    def __getitem__(self, agent: str) -> pb_grpc.CoordinatorStub:
        return self.stubs[agent]

    @property
    def state(self) -> Any:
        return self.coordinator.orchestrator.state

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.coordinator.orchestrator.metrics.registry.get_sample_value(name, labels or {})
        return float(value or 0.0)

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


@pytest.fixture
def start(tmp_path: Path, pki: Path) -> Iterator[Callable[..., Run]]:
    """Start mTLS coordinators with config sections replaced; stop them all afterwards."""
    started: list[Run] = []

    def run(min_agents: int = 3, quorum: int = 0, **sections: Any) -> Run:
        run_dir = tmp_path / f"run-{len(started)}"
        changes = {"min_agents": min_agents, "quorum": quorum}
        defaults = coordinator_config(run_dir, 1 << 30).run.model_copy(update=changes)
        sections.setdefault("run", defaults)
        coordinator = launch(run_dir, security=mtls(pki), credentials=credentials(pki, HONEST[0]), **sections)
        started.append(Run(coordinator, pki))
        return started[-1]

    yield run
    for each in started:
        each.close()
        each.coordinator.stop()


def open_round(run: Run, agents: tuple[str, ...]) -> dict[str, Assignment]:
    for agent in agents:
        register(run[agent], agent)
    return {agent: train_assignment(run[agent], agent) for agent in agents}


def honest_update(assignment: Assignment, seed: int) -> Upload:
    return assignment.update(seed=seed, samples=30)


def heartbeat_seconds(stub: pb_grpc.CoordinatorStub, agent: str) -> float:
    start = time.perf_counter()
    stub.Heartbeat(pb.HeartbeatRequest(agent_id=agent, state="idle"), timeout=RPC_TIMEOUT_S)
    return time.perf_counter() - start


def registered(run: Run) -> set[str]:
    return set(run.coordinator.orchestrator.registry.all())


# ---------------------------------------------------------------- crash and abort from one Register

POINT = CalibrationPoint(16, 64, 8, Quantization.NONE, 0.6, 900 * 2**20, 150_000)


@pytest.mark.parametrize(
    ("profile", "field"),
    [
        (replace(PROFILE, flops_per_s=5e-324), "profile.flops_per_s"),
        (replace(PROFILE, flops_per_s=math.inf), "profile.flops_per_s"),
        (replace(PROFILE, total_memory_bytes=2**64 - 1), "profile.total_memory_bytes"),
        (replace(PROFILE, num_train_samples=10**9), "profile.num_train_samples"),
        (replace(PROFILE, calibration=(replace(POINT, seq_len=0),)), "profile.calibration[0].seq_len"),
        (replace(PROFILE, calibration=(replace(POINT, step_seconds=1e-300),)), "profile.calibration[0].step_seconds"),
        (replace(PROFILE, calibration=(POINT,) * 50_000), "profile.calibration"),
        (replace(PROFILE, device_name="x" * 4_000_000), "profile.device_name"),
    ],
    ids=["flops-5e-324", "flops-inf", "memory-2^64-1", "billion-samples", "seq-len-0", "step-1e-300",
         "50000-calibration-points", "4MB-device-name"],
)  # fmt: skip
def test_an_impossible_profile_is_refused_naming_the_field(
    start: Callable[..., Run], profile: DeviceProfile, field: str
) -> None:
    # Prepare
    run = start()
    request = pb.RegisterRequest(agent_id=MALLORY, profile=serde.profile_to_pb(profile), model=serde.spec_to_pb(SPEC))

    # Execute
    code, details = refused(lambda: run[MALLORY].Register(request, timeout=RPC_TIMEOUT_S))
    for agent in HONEST:
        register(run[agent], agent)

    # Assert: refused before the registry saw it; the honest agents register and get their tasks
    assert code == INVALID and details.startswith(field), details
    assert registered(run) == set(HONEST)
    assert get_task(run[HONEST[0]], HONEST[0]).kind is TaskKind.TRAIN


@pytest.mark.parametrize(
    "spec",
    [
        replace(SPEC, fingerprint="sha256:not-the-run"),
        replace(SPEC, candidates=(ModuleShape(QUERY, 0, 0), ModuleShape(VALUE, 0, 0))),
        replace(SPEC, heads=(("classifier.weight", (2, 2**27)),)),
    ],
    ids=["fake-fingerprint", "zero-width-modules", "head-of-2^28-weights"],
)
def test_the_first_registrant_cannot_define_the_model(start: Callable[..., Run], spec: ModelSpec) -> None:
    # Prepare
    run = start()

    # Execute: mallory registers first
    code, details = refused(lambda: register(run[MALLORY], MALLORY, spec))
    for agent in HONEST:
        register(run[agent], agent)
    state_file = run.coordinator.config.run.run_dir / "state" / "state.json"
    deadline = time.monotonic() + RPC_TIMEOUT_S
    while not state_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)

    # Assert: refused with both fingerprints named; the run goes on with the coordinator's model, small state
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert spec.fingerprint in details and SPEC.fingerprint in details
    assert registered(run) == set(HONEST)
    assert state_file.exists() and sum(p.stat().st_size for p in state_file.parent.iterdir()) < 1 << 20


# ---------------------------------------------------------------- poisoning


@pytest.mark.parametrize(
    ("tensor", "value", "message"),
    [
        (HEAD_B, 1e6, r"holds \|value\| 1e\+06 over updates.max_abs_value 10000"),
        (Q_B, 3e38, r"holds \|value\| 3e\+38 over updates.max_abs_value 10000"),
    ],
    ids=["classifier-bias-1e6", "lora-b-3e38"],
)
def test_a_well_formed_poisoned_update_is_refused_and_the_round_goes_on(
    start: Callable[..., Run], tensor: str, value: float, message: str
) -> None:
    # Prepare: two honest updates are quorum
    run = start(min_agents=3, quorum=2)
    tasks = open_round(run, (*HONEST[:2], MALLORY))
    poison = tasks[MALLORY].update(seed=9, samples=30)
    spoiled = poison.tensors[tensor].clone()
    spoiled.view(-1)[0] = value

    # Execute
    code, details = refused(lambda: upload(run[MALLORY], poison.with_tensor(tensor, spoiled).messages()))
    told = get_task(run[MALLORY], MALLORY, wait_s=0.0)
    honest = [honest_update(tasks[agent], seed) for seed, agent in enumerate(HONEST[:2])]
    for agent, update in zip(HONEST[:2], honest, strict=True):
        upload(run[agent], update.messages())
    summary = run.coordinator.finished()

    # Assert: refused with the figure named, mallory told it sits out; the round is the honest two's mean
    assert code == INVALID and re.search(message, details), details
    assert told.kind is TaskKind.WAIT and told.message.startswith("sitting out round 1")
    assert sorted(summary["rounds"][0]["agents"]) == list(HONEST[:2])
    bias = run.state.global_.heads[HEAD_B]
    torch.testing.assert_close(bias, (honest[0].tensors[HEAD_B] + honest[1].tensors[HEAD_B]) / 2)


def test_with_the_value_bound_off_an_overflowing_aggregate_is_refused_and_the_last_good_global_stays(
    start: Callable[..., Run], tmp_path: Path
) -> None:
    # Prepare: no value bound; a LoRA B of 3e38 is finite, folding it by alpha / r overflows to Inf
    run = start(min_agents=2, updates=UpdatesSection(max_abs_value=0.0))
    tasks = open_round(run, (HONEST[0], MALLORY))
    poison = tasks[MALLORY].update(seed=9, samples=30)
    huge = torch.full_like(poison.tensors[Q_B], 3e38)

    # Execute
    accepted = upload(run[MALLORY], poison.with_tensor(Q_B, huge).messages())
    upload(run[HONEST[0]], honest_update(tasks[HONEST[0]], 1).messages())
    summary = run.coordinator.finished()

    # Assert: admitted (the defence is off), but the aggregate is refused and never written
    assert accepted.accepted
    failure = summary["rounds"][0]["failure"]
    assert "folded update" in failure and "NaN or Inf" in failure, failure
    assert run.metric("fedpipe_rounds_failed_total", {"reason": "non_finite"}) == 1
    global_ = run.state.global_
    assert global_.round == 0 and all(bool(torch.isfinite(p.b).all()) for p in global_.lora.values())


def test_an_update_far_over_the_round_median_norm_is_left_out(start: Callable[..., Run]) -> None:
    # Prepare: three honest updates and mallory's, 100 times larger (finite, within the value bound)
    run = start(min_agents=4)
    tasks = open_round(run, (*HONEST, MALLORY))
    big = tasks[MALLORY].update(seed=9, samples=30)
    big = Upload(big.meta, {n: t + 10.0 * torch.ones_like(t) for n, t in tasks[MALLORY].tensors.items()})

    # Execute
    for seed, agent in enumerate(HONEST):
        upload(run[agent], honest_update(tasks[agent], seed).messages())
    upload(run[MALLORY], big.messages())
    summary = run.coordinator.finished()
    told = get_task(run[MALLORY], MALLORY, wait_s=0.0)

    # Assert: aggregated from the honest three only, mallory counted and told
    record = summary["rounds"][0]
    assert sorted(record["agents"]) == list(HONEST) and record["refused"] == (MALLORY,)
    assert run.metric("fedpipe_updates_screened_total", {"agent": MALLORY, "action": "rejected"}) == 1
    assert told.kind in (TaskKind.WAIT, TaskKind.FINISHED)


def test_a_change_spent_on_one_small_tensor_is_left_out_though_its_whole_norm_passes(
    start: Callable[..., Run],
) -> None:
    # Prepare: honest updates move every tensor a little; mallory moves only the bias, by 5 x an honest
    # update's whole norm (under 10 x the median of whole norms, far over 10 x the bias's median change)
    run = start(min_agents=4)
    tasks = open_round(run, (*HONEST, MALLORY))
    honest = [honest_update(tasks[agent], seed) for seed, agent in enumerate(HONEST)]
    sent = tasks[MALLORY].tensors
    whole = math.sqrt(sum(float((honest[0].tensors[n] - t).pow(2).sum()) for n, t in sent.items()))
    bias = sent[HEAD_B].clone()
    bias[1] += 5 * whole
    concentrated = Upload(tasks[MALLORY].update(seed=9, samples=30).meta, {**sent, HEAD_B: bias})

    # Execute
    for agent, update in zip(HONEST, honest, strict=True):
        upload(run[agent], update.messages())
    upload(run[MALLORY], concentrated.messages())
    summary = run.coordinator.finished()

    # Assert
    assert summary["rounds"][0]["refused"] == (MALLORY,)
    assert run.metric("fedpipe_updates_screened_total", {"agent": MALLORY, "action": "rejected"}) == 1


# ---------------------------------------------------------------- weight takeover


@pytest.mark.parametrize(("ratio", "share_at_most"), [(3.0, 0.6), (0.0, 1.0)], ids=["defaults", "cap-off"])
def test_a_billion_sample_claim_cannot_carry_the_round(
    start: Callable[..., Run], ratio: float, share_at_most: float
) -> None:
    # Prepare: mallory reports the most data the limits allow; the honest agents report 100 samples each
    run = start(updates=UpdatesSection(max_weight_ratio=ratio))
    for agent in HONEST[:2]:
        register(run[agent], agent)
    claim = replace(PROFILE, num_train_samples=10_000_000)
    request = pb.RegisterRequest(agent_id=MALLORY, profile=serde.profile_to_pb(claim), model=serde.spec_to_pb(SPEC))
    run[MALLORY].Register(request, timeout=RPC_TIMEOUT_S)
    tasks = {agent: train_assignment(run[agent], agent) for agent in (*HONEST[:2], MALLORY)}

    # Execute: everyone claims the most its plan allows
    allowed = dict(run.state.allowed)
    for seed, agent in enumerate((*HONEST[:2], MALLORY)):
        upload(run[agent], tasks[agent].update(seed=seed, samples=allowed[agent]).messages())
    run.coordinator.finished()
    share = run.metric("fedpipe_agent_weight_share", {"agent": MALLORY})

    # Assert: with the defaults mallory is planned on at most 3 x the median data and weighs at most 3 x the
    # median update: 304 of 528 samples, a 0.58 share (with the cap off it would be all but 1e-5 of it)
    print(f"HOSTILE weight takeover (max_weight_ratio {ratio:g}): allowed {allowed[MALLORY]}, share {share:.4f}")
    if ratio:
        assert allowed[MALLORY] <= 3 * 112 and share <= share_at_most
    else:
        assert allowed[MALLORY] >= 10_000_000 and share > 0.9999


# ---------------------------------------------------------------- stalling


def test_a_flood_of_polls_from_one_agent_cannot_starve_the_others(start: Callable[..., Run]) -> None:
    # Prepare: mallory joins after the round opened, so it has no task and every poll of its waits
    run = start(min_agents=2)
    tasks = open_round(run, HONEST[:2])
    register(run[MALLORY], MALLORY)
    held = [
        run[MALLORY].GetTask.future(pb.GetTaskRequest(agent_id=MALLORY, wait_s=30.0), timeout=60) for _ in range(FLOOD)
    ]
    time.sleep(1.0)

    # Execute: honest heartbeats and uploads while mallory holds what it may
    beats = [heartbeat_seconds(run[agent], agent) for agent in HONEST[:2] for _ in range(5)]
    answers = [upload(run[a], honest_update(tasks[a], i).messages()) for i, a in enumerate(HONEST[:2])]
    refusals = [f for f in held if f.done() and f.exception() is not None and f.code() == EXHAUSTED]
    for future in held:
        future.cancel()  # type: ignore[no-untyped-call]

    # Assert: at most server.max_calls_per_agent (8) polls held; honest calls fast and accepted
    print(f"HOSTILE polls: {len(refusals)}/{FLOOD} refused, honest heartbeat max {max(beats) * 1e3:.1f} ms")
    assert len(refusals) >= FLOOD - 8
    assert max(beats) < 1.0, beats
    assert [a.accepted for a in answers] == [True, True]
    assert run.metric("fedpipe_calls_refused_total", {"reason": "limit"}) >= FLOOD - 8
    # the cancelled polls gave their slots back: mallory can call again
    deadline = time.monotonic() + RPC_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            heartbeat_seconds(run[MALLORY], MALLORY)
            break
        except grpc.RpcError:
            time.sleep(0.2)
    else:
        pytest.fail("mallory's slots never came back after its polls were cancelled")


@pytest.mark.parametrize("wait_s", [math.nan, math.inf, -1.0, 1e9])
def test_a_poll_with_an_impossible_wait_is_refused_at_once(start: Callable[..., Run], wait_s: float) -> None:
    # Prepare
    run = start()
    register(run[MALLORY], MALLORY)

    # Execute
    began = time.perf_counter()
    code, details = refused(lambda: run[MALLORY].GetTask(pb.GetTaskRequest(agent_id=MALLORY, wait_s=wait_s), timeout=5))

    # Assert
    assert code == INVALID and details.startswith("wait_s:") and time.perf_counter() - began < 2.0


def test_header_less_upload_streams_hold_no_more_than_the_agent_limit(start: Callable[..., Run]) -> None:
    # Prepare: streams that never send their header until released
    run = start(min_agents=2)
    tasks = open_round(run, HONEST[:2])
    register(run[MALLORY], MALLORY)
    release = threading.Event()

    def silent() -> Iterator[pb.UploadUpdateRequest]:
        release.wait(60)
        return
        yield  # a generator that yields nothing until released

    streams = [run[MALLORY].UploadUpdate.future(silent(), timeout=60) for _ in range(FLOOD)]
    time.sleep(1.0)

    # Execute
    answers = [upload(run[a], honest_update(tasks[a], i).messages()) for i, a in enumerate(HONEST[:2])]
    beat = heartbeat_seconds(run[HONEST[0]], HONEST[0])
    refusals = sum(1 for s in streams if s.done() and s.exception() is not None and s.code() == EXHAUSTED)
    release.set()

    # Assert
    print(f"HOSTILE header-less uploads: {refusals}/{FLOOD} refused, honest heartbeat {beat * 1e3:.1f} ms")
    assert refusals >= FLOOD - 8
    assert [a.accepted for a in answers] == [True, True] and beat < 1.0


def test_health_watches_are_limited(start: Callable[..., Run], pki: Path) -> None:
    # Prepare
    run = start()
    channel = grpc.secure_channel(run.coordinator.address, credentials(pki, MALLORY))
    health = health_pb2_grpc.HealthStub(channel)
    watches = [health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30) for _ in range(20)]
    time.sleep(1.0)

    # Execute
    codes = []
    for watch in watches:
        try:
            next(watch)
            codes.append("open")
        except grpc.RpcError as err:
            codes.append(err.code().name)
    register(run[HONEST[0]], HONEST[0])
    for watch in watches:
        watch.cancel()
    channel.close()

    # Assert: at most server.max_health_watches (4) open, the rest refused, registration still served
    print(f"HOSTILE health watches: {codes.count('open')} open, {codes.count('RESOURCE_EXHAUSTED')} refused")
    assert codes.count("open") <= 4 and codes.count("RESOURCE_EXHAUSTED") >= 16
    assert HONEST[0] in registered(run)


def test_with_token_auth_an_upload_without_token_is_refused_before_its_stream_is_read(
    pki: Path, tmp_path: Path
) -> None:
    # Prepare: server-only TLS with tokens; a client that opens an upload stream and never sends anything
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(f"agent-a: {token_digest('secret-token-of-agent-a')}\n")
    security = server_security(False, pki / "coordinator.crt", pki / "coordinator.key", "token", None, tokens)
    ca = grpc.ssl_channel_credentials((pki / "ca.crt").read_bytes())
    coordinator = launch(tmp_path / "run", security=security, credentials=ca)
    release = threading.Event()

    def silent() -> Iterator[pb.UploadUpdateRequest]:
        release.wait(30)
        return
        yield

    try:
        # Execute
        began = time.perf_counter()
        code, details = refused(lambda: coordinator.stub.UploadUpdate(silent(), timeout=20))
        seconds = time.perf_counter() - began
    finally:
        release.set()
        coordinator.stop()

    # Assert: answered at once, without waiting for a header that never comes
    assert code == grpc.StatusCode.UNAUTHENTICATED and "no valid bearer token" in details
    assert seconds < 5.0


BIG = 4096  # hidden size of a spec whose download (16 MiB) outgrows any flow-control window


def test_unread_downloads_share_one_encoded_copy_and_are_limited(
    tmp_path: Path, pki: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a model large enough that a download which is not read usually blocks in flow control; the
    # guard's own count of mallory's open calls is watched, since a client whose windows grow large enough
    # takes a whole download into its buffers, and the server then rightly gives that call's slot back
    peak = {"open": 0, "released": 0}
    acquire, release = CallLimits.acquire, CallLimits.release

    def watched_acquire(limits: CallLimits, caller: str, watch: bool) -> tuple[str, str] | None:
        refusal = acquire(limits, caller, watch)
        if caller == MALLORY:
            peak["open"] = max(peak["open"], limits.open.get(MALLORY, 0))
        return refusal

    def watched_release(limits: CallLimits, caller: str, watch: bool) -> None:
        peak["released"] += caller == MALLORY
        release(limits, caller, watch)

    monkeypatch.setattr(CallLimits, "acquire", watched_acquire)
    monkeypatch.setattr(CallLimits, "release", watched_release)
    spec = replace(
        SPEC,
        candidates=(ModuleShape(QUERY, BIG, BIG), ModuleShape(VALUE, BIG, BIG)),
        heads=(("classifier.weight", (2, BIG)), ("classifier.bias", (2,))),
    )
    run_section = coordinator_config(tmp_path / "r", 1 << 30).run.model_copy(update={"min_agents": 2})
    lora = LoraSection(rank=256, alpha=512.0, dropout=0.0, targets=["query", "value"])
    server = ServerSection(host="127.0.0.1", port=0, workers=32, chunk_bytes=1 << 20, max_chunk_bytes=(1 << 20) + 4096)
    coordinator = launch(
        tmp_path / "run", security=mtls(pki), credentials=credentials(pki, HONEST[0]), spec=spec, run=run_section,
        lora=lora, server=server,
    )  # fmt: skip
    run = Run(coordinator, pki)
    try:
        for agent in (*HONEST[:2], MALLORY):
            register(run[agent], agent, spec)
        task = get_task(run[MALLORY], MALLORY)
        assert task.kind is TaskKind.TRAIN and task.plan is not None
        request = pb.DownloadGlobalRequest(agent_id=MALLORY, global_round=0, plan_id=task.plan.plan_id)

        # Execute: many downloads, none read past its first message
        before = peak["released"]
        streams = [run[MALLORY].DownloadGlobal(request, timeout=120) for _ in range(FLOOD)]
        firsts: list[str] = []
        for stream in streams:
            try:
                firsts.append(str(next(iter(stream)).WhichOneof("part")))
            except grpc.RpcError as err:
                firsts.append(err.code().name)
        ended = peak["released"] - before  # downloads the server finished (or that expired) meanwhile
        cached = dict(run.state.downloads)
        beat = heartbeat_seconds(run[HONEST[0]], HONEST[0])
        for stream in streams:
            stream.cancel()  # type: ignore[no-untyped-call]
    finally:
        run.close()
        coordinator.stop()

    # Assert: never more than server.max_calls_per_agent (8) open at once, so a header beyond the eighth
    # needs a download that ended first; one encoded copy of the plan's broadcast shared
    headers, refusals = firsts.count("header"), firsts.count("RESOURCE_EXHAUSTED")
    print(f"HOSTILE unread 16 MiB downloads: {headers} open, {refusals} refused, {ended} ended meanwhile, "
          f"{len(cached)} encoded copy, honest heartbeat {beat * 1e3:.1f} ms")  # fmt: skip
    assert peak["open"] == 8, peak
    assert headers + refusals == FLOOD and 8 <= headers <= 8 + ended, firsts
    assert list(cached) == [(0, task.plan.plan_id, "")]
    assert beat < 1.0


# ---------------------------------------------------------------- steering


def test_importance_reports_cannot_claim_unbounded_weight_or_values(tmp_path: Path, pki: Path) -> None:
    # Prepare: a probe over two candidates; the honest agents find the query matrix important
    selection = SelectionSection(mode="importance", budget=0.5, probe_deadline_s=30.0)
    run_section = coordinator_config(tmp_path / "r", 1 << 30).run.model_copy(update={"min_agents": 4})
    coordinator = launch(
        tmp_path / "run", security=mtls(pki), credentials=credentials(pki, HONEST[0]), run=run_section,
        selection=selection,
    )  # fmt: skip
    run = Run(coordinator, pki)
    try:
        for agent in (*HONEST, MALLORY):
            register(run[agent], agent)
        probe = get_task(run[MALLORY], MALLORY).probe
        assert probe is not None
        most = probe.steps * probe.batch_size

        def report(agent: str, scores: dict[str, float], samples: int) -> pb.ReportImportanceRequest:
            return pb.ReportImportanceRequest(
                agent_id=agent, probe_id=probe.probe_id, scores=scores, samples=samples, steps=probe.steps, seconds=1.0
            )

        # Execute
        huge = refused(lambda: run[MALLORY].ReportImportance(report(MALLORY, {QUERY: 0.0, VALUE: 1e300}, most)))
        many = refused(lambda: run[MALLORY].ReportImportance(report(MALLORY, {QUERY: 0.0, VALUE: 1.0}, 2**64 - 1)))
        run[MALLORY].ReportImportance(report(MALLORY, {QUERY: 0.0, VALUE: 1.0}, most))
        again = refused(lambda: run[MALLORY].ReportImportance(report(MALLORY, {QUERY: 0.0, VALUE: 1.0}, most)))
        for agent in HONEST:
            get_task(run[agent], agent)
            run[agent].ReportImportance(report(agent, {QUERY: 1.0, VALUE: 0.1}, most))
        deadline = time.monotonic() + RPC_TIMEOUT_S
        while coordinator.orchestrator.mask is None and time.monotonic() < deadline:
            time.sleep(0.05)

        # Assert: the extreme claims are refused; the bounded one is one voice of four
        assert huge[0] == INVALID and huge[1].startswith(f"scores[{VALUE}]")
        assert many[0] == INVALID and many[1].startswith("samples:")
        assert again[0] == grpc.StatusCode.ALREADY_EXISTS
        assert coordinator.orchestrator.mask == (QUERY,)
    finally:
        run.close()
        coordinator.stop()


def test_evaluation_reports_are_bounded_and_taken_once(tmp_path: Path, pki: Path) -> None:
    # Prepare: agents evaluate the round-0 global
    evaluation = EvaluationSection(agents=True, heldout=None, initial=True)
    run_section = coordinator_config(tmp_path / "r", 1 << 30).run.model_copy(update={"min_agents": 3})
    coordinator = launch(
        tmp_path / "run", security=mtls(pki), credentials=credentials(pki, HONEST[0]), run=run_section,
        evaluation=evaluation,
    )  # fmt: skip
    run = Run(coordinator, pki)
    try:
        for agent in (*HONEST[:2], MALLORY):
            register(run[agent], agent)
        task = get_task(run[MALLORY], MALLORY)
        assert task.kind is TaskKind.EVALUATE

        def report(agent: str, loss: float, accuracy: float, samples: int) -> pb.ReportEvaluationRequest:
            return pb.ReportEvaluationRequest(
                agent_id=agent, global_round=0, loss=loss, accuracy=accuracy, samples=samples
            )

        # Execute
        infinite = refused(lambda: run[MALLORY].ReportEvaluation(report(MALLORY, math.inf, 1.0, 10)))
        unbounded = refused(lambda: run[MALLORY].ReportEvaluation(report(MALLORY, 0.0, 1.0, 2**64 - 1)))
        run[MALLORY].ReportEvaluation(report(MALLORY, 0.0, 1.0, PROFILE.num_val_samples))
        twice = refused(lambda: run[MALLORY].ReportEvaluation(report(MALLORY, 0.0, 0.9, PROFILE.num_val_samples)))
        for agent in HONEST[:2]:
            get_task(run[agent], agent)
            run[agent].ReportEvaluation(report(agent, 0.6, 0.5, PROFILE.num_val_samples))
        deadline = time.monotonic() + RPC_TIMEOUT_S
        while not coordinator.orchestrator.results and time.monotonic() < deadline:
            time.sleep(0.05)

        # Assert: mallory's 1.000 is one of three equal voices
        assert infinite[0] == INVALID and infinite[1].startswith("loss")
        assert unbounded[0] == INVALID and unbounded[1].startswith("samples")
        assert twice[0] == grpc.StatusCode.ALREADY_EXISTS
        agents_eval = coordinator.orchestrator.results[0].agents_eval
        assert agents_eval is not None and agents_eval.accuracy == pytest.approx((1.0 + 0.5 + 0.5) / 3)
    finally:
        run.close()
        coordinator.stop()


def test_a_certificate_name_with_a_newline_cannot_forge_a_log_line(pki: Path, tmp_path: Path) -> None:
    # Prepare: the coordinator trusts the forger's CA; its log goes through the filter logs.setup installs
    security = mtls(pki, client_ca=pki / "forged-ca.crt")
    forged = grpc.ssl_channel_credentials(
        (pki / "ca.crt").read_bytes(), (pki / "forged.key").read_bytes(), (pki / "forged.crt").read_bytes()
    )
    buffer = StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("%(asctime)s coordinator %(levelname)s %(message)s", "%H:%M:%S"))
    handler.addFilter(EscapeControl())
    logging.getLogger().addHandler(handler)
    coordinator = launch(tmp_path / "run", security=security, credentials=forged)
    try:
        # Execute: as the name itself, and as a plain id it may not act as
        as_self = refused(lambda: register(coordinator.stub, FORGED_CN))
        as_other = refused(lambda: register(coordinator.stub, MALLORY))
    finally:
        coordinator.stop()
        logging.getLogger().removeHandler(handler)

    # Assert: refused; no line of the log starts with the forged text
    assert as_self[0] == INVALID and as_other[0] == grpc.StatusCode.PERMISSION_DENIED
    lines = buffer.getvalue().splitlines()
    assert any("mallory\\n00:00:00" in line for line in lines), lines
    assert not any(line.startswith("00:00:00 coordinator INFO run complete") for line in lines)


def test_honest_ids_and_profiles_still_register_with_every_defence_on(start: Callable[..., Run]) -> None:
    # Prepare
    run = start()
    profile = replace(PROFILE, calibration=(POINT, replace(POINT, batch_size=32, step_seconds=1.1)))
    request = pb.RegisterRequest(
        agent_id=HONEST[0], profile=serde.profile_to_pb(profile), model=serde.spec_to_pb(SPEC), agent_version="t"
    )

    # Execute
    answer = run[HONEST[0]].Register(request, timeout=RPC_TIMEOUT_S)

    # Assert
    assert answer.run_id == run.coordinator.orchestrator.run_id
    assert registered(run) == {HONEST[0]}
