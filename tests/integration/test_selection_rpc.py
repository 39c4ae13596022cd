"""Importance selection over gRPC: a real coordinator on 127.0.0.1 hands out PROBE tasks, checks the
reports, combines them and puts the selected mask into every agent's TRAIN plan."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from fedpipe.v1 import fedpipe_pb2 as pb
from fedpipe.v1 import fedpipe_pb2_grpc as pb_grpc

from common import serde, transfer
from common.adapters import GlobalAdapter
from common.security import ServerSecurity
from common.types import (
    DeviceProfile,
    ImportanceReport,
    ModelSpec,
    ModuleShape,
    Quantization,
    Task,
    TaskKind,
    UpdateMeta,
)
from coordinator.config import (
    CoordinatorConfig,
    EvaluationSection,
    LoraSection,
    MetricsSection,
    RunSection,
    SelectionSection,
    ServerSection,
)
from coordinator.metrics import CoordinatorMetrics
from coordinator.orchestrator import Orchestrator
from coordinator.planner import PlanOptions, uniform_plan
from coordinator.registry import Registry
from coordinator.sampling import draw
from coordinator.selection import combine, select
from coordinator.server import start_server
from coordinator.strategy import get_strategy

LABELS = ("negative", "positive")
MODULES = tuple(ModuleShape(f"enc.{i}.attention.self.{k}", 8, 8) for i in range(2) for k in ("query", "value"))
SPEC = ModelSpec("fp", "bert", "seq-cls", LABELS, MODULES, (("classifier.weight", (2, 8)),), 100)
PROFILE = DeviceProfile("cpu", "cpu", 2**30, 2**30, 2**30, 1e9, "float32", 1, 100, 10)
SCORES = {
    "a": {MODULES[0].name: 1.0, MODULES[1].name: 5.0, MODULES[2].name: 0.5, MODULES[3].name: 3.5},
    "b": {MODULES[0].name: 0.2, MODULES[1].name: 0.1, MODULES[2].name: 0.1, MODULES[3].name: 0.6},
}


@dataclass
class Running:
    orchestrator: Orchestrator
    stub: pb_grpc.CoordinatorStub
    run_dir: Path
    thread: threading.Thread


@contextlib.contextmanager
def coordinator(run_dir: Path, run: RunSection, selection: SelectionSection, seed: int = 0) -> Iterator[Running]:
    """A real coordinator on 127.0.0.1 with the uniform planner, its run loop in a thread; stopped on exit."""
    config = CoordinatorConfig(
        insecure=True,
        labels=list(LABELS),
        server=ServerSection(host="127.0.0.1", port=0, workers=16),
        metrics=MetricsSection(port=-1),
        run=run,
        lora=LoraSection(rank=2, alpha=4.0, targets=["all"]),
        selection=selection,
        evaluation=EvaluationSection(agents=False, initial=False),
    )
    options = PlanOptions(
        ("all",), 2, 4.0, 0.0, 4, 1, 0, 1e-3, 0.0, 16, Quantization.NONE, run.round_deadline_s, seed,
        track_importance=selection.scores_training,
    )  # fmt: skip
    metrics = CoordinatorMetrics()
    orchestrator = Orchestrator(
        config, Registry(SPEC), uniform_plan, options, get_strategy("rank-padding"), metrics, "base"
    )
    serving = start_server(orchestrator.admission, config.server, metrics, ServerSecurity.insecure())
    port = serving.port
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    thread = threading.Thread(target=lambda: _run_quietly(orchestrator), daemon=True)
    thread.start()
    try:
        yield Running(orchestrator, pb_grpc.CoordinatorStub(channel), run_dir, thread)
    finally:
        # End the run loop, then the server; no thread outlives the test.
        orchestrator.stop()
        thread.join(timeout=10)
        channel.close()
        serving.stop(grace_s=None)
        assert not thread.is_alive(), "the orchestrator's run thread did not stop"


def register(stub: pb_grpc.CoordinatorStub, agent: str) -> None:
    request = pb.RegisterRequest(agent_id=agent, profile=serde.profile_to_pb(PROFILE), model=serde.spec_to_pb(SPEC))
    stub.Register(request, timeout=5)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    run = RunSection(
        rounds=1, min_agents=2, round_deadline_s=5.0, registration_timeout_s=10.0, run_dir=tmp_path, finish_grace_s=0.0
    )
    selection = SelectionSection(mode="importance", budget=0.5, probe_deadline_s=10.0)
    with coordinator(tmp_path, run, selection) as started:
        for agent in ("a", "b"):
            register(started.stub, agent)
        yield started


def _run_quietly(orchestrator: Orchestrator) -> None:
    # The round ends at its deadline with no uploads and the run then aborts; the tests need only the plans.
    with contextlib.suppress(Exception):
        orchestrator.run()


def task(stub: pb_grpc.CoordinatorStub, agent: str) -> Task:
    return serde.task_from_pb(stub.GetTask(pb.GetTaskRequest(agent_id=agent, wait_s=5.0), timeout=10))


def report(stub: pb_grpc.CoordinatorStub, agent: str, probe_id: str, scores: dict[str, float]) -> None:
    message = serde.importance_to_pb(agent, ImportanceReport(probe_id, scores, 100, 20, 1.0))
    stub.ReportImportance(message, timeout=5)


@pytest.mark.integration
def test_probe_then_train_with_the_selected_mask(running: Running) -> None:
    # Prepare: both agents are asked to probe every candidate
    probes = {agent: task(running.stub, agent) for agent in ("a", "b")}
    assert all(t.kind is TaskKind.PROBE for t in probes.values())
    probe = probes["a"].probe
    assert probe is not None and probe.candidates == tuple(m.name for m in MODULES) and probe.rank == 4

    # Execute
    for agent, scores in SCORES.items():
        report(running.stub, agent, probe.probe_id, scores)
    trains = {agent: task(running.stub, agent) for agent in ("a", "b")}

    # Assert: the mask is select(combine(...)) under half the all-candidates budget, in every plan
    reports = {a: ImportanceReport(probe.probe_id, s, 100, 20, 1.0) for a, s in SCORES.items()}
    expected = select(combine(reports, [m.name for m in MODULES]), MODULES, 2, 64).mask
    assert expected == (MODULES[1].name, MODULES[3].name)
    for t in trains.values():
        assert t.kind is TaskKind.TRAIN and t.plan is not None
        assert t.plan.target_modules == expected
    record = json.loads((running.run_dir / "selection" / "0000.json").read_text())
    assert record["mask"] == list(expected) and record["used"] == 64 and set(record["agents"]) == {"a", "b"}
    assert running.orchestrator.metrics.mask_size._value.get() == 2


@pytest.mark.integration
@pytest.mark.parametrize(
    ("mutate", "code", "details"),
    [
        (lambda s, p: (p + "-old", s), grpc.StatusCode.FAILED_PRECONDITION, "is not open"),
        (
            lambda s, p: (p, {k: v for k, v in s.items() if "1.attention.self.value" not in k}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "scores: missing",
        ),
        (lambda s, p: (p, {**s, "enc.9.x": 1.0}), grpc.StatusCode.INVALID_ARGUMENT, "not candidates"),
        (lambda s, p: (p, {**s, MODULES[0].name: float("nan")}), grpc.StatusCode.INVALID_ARGUMENT, "must be finite"),
    ],
)
def test_bad_importance_reports_are_refused_and_change_nothing(
    running: Running, mutate: object, code: grpc.StatusCode, details: str
) -> None:
    probe = task(running.stub, "a").probe
    assert probe is not None
    probe_id, scores = mutate(SCORES["a"], probe.probe_id)  # type: ignore[operator]
    with pytest.raises(grpc.RpcError) as caught:
        report(running.stub, "a", probe_id, scores)
    assert caught.value.code() == code and details in (caught.value.details() or "")
    assert running.orchestrator.state.importance == {}
    again = task(running.stub, "a")
    assert again.kind is TaskKind.PROBE  # still owed: the refused report was not kept


@pytest.mark.integration
def test_random_mode_skips_the_probe_and_keeps_the_budget(tmp_path: Path) -> None:
    # Prepare: the same coordinator with a seeded random mask (the ablation baseline)
    run = RunSection(rounds=1, min_agents=1, round_deadline_s=2.0, run_dir=tmp_path, finish_grace_s=0.0)
    with coordinator(tmp_path, run, SelectionSection(mode="random", budget=0.5), seed=3) as started:
        # Execute
        register(started.stub, "a")
        first = task(started.stub, "a")

        # Assert: straight to training, two of four equal-cost matrices, recorded as random
        assert first.kind is TaskKind.TRAIN and first.plan is not None
        assert len(first.plan.target_modules) == 2
        record = json.loads((tmp_path / "selection" / "0000.json").read_text())
        assert record["probe"] == "random" and record["mask"] == list(first.plan.target_modules)


def upload(
    stub: pb_grpc.CoordinatorStub,
    agent: str,
    round_: int,
    plan_id: str,
    tensors: dict[str, Any],
    importance: dict[str, float] | None = None,
) -> None:
    header, payload = transfer.encode_payload(tensors)
    meta = UpdateMeta(agent, round_, plan_id, 40, 10, 1.0, 0.5, 1, importance=importance or {})
    messages = [pb.UploadUpdateRequest(header=serde.update_header_to_pb(meta, header))]
    messages += [pb.UploadUpdateRequest(chunk=c) for c in transfer.chunked(payload, 1024)]
    stub.UploadUpdate(iter(messages), timeout=10)


def download(stub: pb_grpc.CoordinatorStub, agent: str, t: Task) -> dict[str, torch.Tensor]:
    assert t.plan is not None
    parts = list(
        stub.DownloadGlobal(
            pb.DownloadGlobalRequest(agent_id=agent, global_round=t.global_round, plan_id=t.plan.plan_id), timeout=10
        )
    )
    return transfer.decode_payload(parts[0].header, (p.chunk for p in parts[1:]), 1 << 20, 1 << 20)


@pytest.mark.integration
def test_reselection_adds_entering_matrices_fresh_and_keeps_leaving_ones(tmp_path: Path) -> None:
    # Prepare: one agent, two rounds, a new probe before round 2
    run = RunSection(rounds=2, min_agents=1, round_deadline_s=10.0, run_dir=tmp_path, finish_grace_s=0.0)
    selection = SelectionSection(mode="importance", budget=0.5, reselect_every=1)
    m0, m1, m2, m3 = (m.name for m in MODULES)
    with coordinator(tmp_path, run, selection) as started:
        stub, orchestrator = started.stub, started.orchestrator
        register(stub, "a")
        # Execute: round 1 on {m1, m3}, then a probe that prefers {m0, m1}
        probe = task(stub, "a").probe
        assert probe is not None
        report(stub, "a", probe.probe_id, {m0: 0.1, m1: 5.0, m2: 0.0, m3: 4.0})
        first = task(stub, "a")
        assert first.plan is not None and first.plan.target_modules == (m1, m3)
        trained = {
            name: torch.full(tuple(value.shape), 0.5 if name.endswith("lora_B") else 0.25)
            for name, value in download(stub, "a", first).items()
        }
        upload(stub, "a", 1, first.plan.plan_id, trained)
        probe = task(stub, "a").probe
        assert probe is not None
        report(stub, "a", probe.probe_id, {m0: 9.0, m1: 5.0, m2: 0.0, m3: 0.1})
        second = task(stub, "a")
        received = download(stub, "a", second)

        # Assert: m0 enters with B = 0, m1 carries round 1's update, m3 stays in the global adapter
        assert second.plan is not None and second.plan.target_modules == (m0, m1)
        assert torch.equal(received[f"{m0}.lora_B"], torch.zeros(8, 2))
        assert bool(received[f"{m0}.lora_A"].abs().sum() > 0)
        # (the global is kept SVD-ordered, so the factors differ from the upload's, their product does not)
        sent_product = torch.full((8, 2), 0.5) @ torch.full((2, 8), 0.25)
        assert torch.allclose(received[f"{m1}.lora_B"] @ received[f"{m1}.lora_A"], sent_product, atol=1e-6)
        global_ = orchestrator.state.global_
        assert isinstance(global_, GlobalAdapter) and set(global_.lora) == {m0, m1, m3}
        kept = global_.lora[m3].b @ global_.lora[m3].a
        assert torch.allclose(kept, sent_product * 4.0 / 2, atol=1e-6)  # folded alpha / r
        upload(stub, "a", 2, second.plan.plan_id, received)
        started.thread.join(timeout=10)  # the run ends by itself after round 2
        saved = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
        assert saved["target_modules"] == sorted([m0, m1, m3])
        assert saved["rank_pattern"] == {m0: 2, m1: 2, m3: 2}


# ---------------------------------------------------------------- client sampling


@pytest.mark.integration
def test_sampled_agents_train_and_the_others_are_told_they_sit_the_round_out(tmp_path: Path) -> None:
    # Prepare: four agents, two drawn per round
    run = RunSection(
        rounds=1, min_agents=2, round_deadline_s=30.0, registration_timeout_s=10.0, run_dir=tmp_path,
        finish_grace_s=0.0, sample_count=2,
    )  # fmt: skip
    agents = ("a", "b", "c", "d")
    with coordinator(tmp_path, run, SelectionSection(mode="all")) as started:
        for agent in agents:
            register(started.stub, agent)

        # Execute: once round 1 is open (an agent has its plan), ask everyone without waiting
        while not started.orchestrator.state.plans:
            time.sleep(0.05)
        tasks = {
            agent: serde.task_from_pb(started.stub.GetTask(pb.GetTaskRequest(agent_id=agent, wait_s=0.0), timeout=10))
            for agent in agents
        }

        # Assert: of the agents alive when round 1 was planned (at least min_agents; a late one is not among
        # them), the seeded draw trains and the rest wait with the reason; the gauge says 2
        state = started.orchestrator.state
        waiting = {a for a, why in state.excluded.items() if "not drawn this round" in why}
        considered = set(state.plans) | waiting
        assert len(considered) >= 2
        drawn = draw(considered, 2, 0, 1)
        assert set(state.plans) == set(drawn)
        assert {a for a, t in tasks.items() if t.kind is TaskKind.TRAIN} == set(drawn)
        for agent in waiting:
            assert tasks[agent].kind is TaskKind.WAIT
            assert f"not drawn this round (2 of {len(considered)} agents train)" in tasks[agent].message
        assert started.orchestrator.metrics.sampled_agents._value.get() == 2


@pytest.mark.integration
def test_reselection_from_training_scores_needs_no_probe(tmp_path: Path) -> None:
    # Prepare: the round-0 probe prefers m1 and m3; round 1's training then finds m1 barely matters
    run = RunSection(rounds=2, min_agents=1, round_deadline_s=10.0, run_dir=tmp_path, finish_grace_s=0.0)
    selection = SelectionSection(mode="importance", budget=0.5, reselect_every=1, rescore="training")
    m0, m1, m2, m3 = (m.name for m in MODULES)
    with coordinator(tmp_path, run, selection) as started:
        stub = started.stub
        register(stub, "a")
        probe = task(stub, "a").probe
        assert probe is not None
        report(stub, "a", probe.probe_id, {m0: 0.1, m1: 5.0, m2: 0.0, m3: 4.0})
        first = task(stub, "a")
        assert first.plan is not None and first.plan.target_modules == (m1, m3) and first.plan.track_importance

        # Execute: the upload carries the training's scores
        trained = {name: value + 0.01 for name, value in download(stub, "a", first).items()}
        upload(stub, "a", 1, first.plan.plan_id, trained, importance={m1: 0.01, m3: 5.0})
        second = task(stub, "a")

        # Assert: no probe; m1's training share falls below m0's probe score, so m0 takes its place
        assert second.probe is None and second.plan is not None
        assert second.plan.target_modules == (m0, m3)
    record = json.loads((tmp_path / "selection" / "0001.json").read_text())
    assert record["probe"] == "training-r1" and record["agents"]["a"]["scores"] == {m1: 0.01, m3: 5.0}
