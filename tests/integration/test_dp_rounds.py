"""privacy.dp through real gRPC: the published global carries noise of the configured deviation, the run's
epsilon is dp-accounting's own figure, every adapter says so, and the budget ends the run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import dp_accounting
import torch
from rig import AGENT_A, AGENT_B, Coordinator, launch, register, train_assignment, upload
from safetensors import safe_open

from common.adapters import GlobalAdapter
from common.linear import clip
from coordinator.config import DpSection, PrivacySection, RunSection
from coordinator.modes import Contribution
from coordinator.privacy import ORDERS
from coordinator.strategy import get_strategy

Z, C, DELTA = 1.5, 0.5, 1e-5


def dp_figure(rounds: int) -> float:
    """dp-accounting's epsilon for rounds of the full-participation Gaussian (q = 1, two of two agents)."""
    accountant = dp_accounting.rdp.RdpAccountant(list(ORDERS))
    accountant.compose(dp_accounting.PoissonSampledDpEvent(1.0, dp_accounting.GaussianDpEvent(Z)), rounds)
    return float(accountant.get_epsilon(DELTA))


def test_dp_rounds_add_calibrated_noise_report_epsilon_and_stop_at_the_budget(tmp_path: Path) -> None:
    # Prepare: 3 rounds configured, a budget that two rounds spend
    section = DpSection(enabled=True, clip_norm=C, noise_multiplier=Z, target_epsilon=dp_figure(2), delta=DELTA)
    run = RunSection(
        rounds=3, min_agents=2, round_deadline_s=20.0, registration_timeout_s=10.0, agent_timeout_s=60.0,
        run_dir=tmp_path / "run", finish_grace_s=0.0,
    )  # fmt: skip
    coordinator: Coordinator = launch(tmp_path / "run", run=run, privacy=PrivacySection(dp=section))
    orchestrator = coordinator.orchestrator
    try:
        for agent in (AGENT_A, AGENT_B):
            register(coordinator.stub, agent)

        # Execute: round 1, keeping what each agent was sent and returned
        first = {agent: train_assignment(coordinator.stub, agent) for agent in (AGENT_A, AGENT_B)}
        before = orchestrator.state.global_
        assert isinstance(before, GlobalAdapter)
        uploads = {agent: a.update(seed=i, samples=20) for i, (agent, a) in enumerate(first.items())}
        for sent in uploads.values():
            assert upload(coordinator.stub, sent.messages()).accepted
        second = {agent: train_assignment(coordinator.stub, agent) for agent in (AGENT_A, AGENT_B)}
        after = orchestrator.state.global_
        for i, assignment in enumerate(second.values()):
            assert upload(coordinator.stub, assignment.update(seed=10 + i, samples=20).messages()).accepted
        summary = coordinator.finished()
    finally:
        coordinator.stop()

    # Assert: round 1's global is the clipped mean plus noise of sd z C / 2 on each coordinate
    mode = orchestrator.mode
    plans = {agent: a.plan for agent, a in first.items()}
    layout = mode.linear_layout(before, plans)
    sums = {name: torch.zeros_like(count) for name, count in layout.items()}
    for agent, sent in uploads.items():
        terms, norm = clip(mode.linear_terms(before, Contribution(agent, 1.0, sent.tensors, plans[agent]), layout), C)
        assert norm > C  # both were clipped
        for name, value in terms.items():
            sums[name] += value
    noiseless, _ = mode.apply_linear(before, sums, layout, get_strategy("fedavg"), 1)
    assert isinstance(after, GlobalAdapter) and isinstance(noiseless, GlobalAdapter)
    noise = torch.cat(
        [(after.lora[m].a - noiseless.lora[m].a).flatten() for m in after.lora]
        + [(after.lora[m].b - noiseless.lora[m].b).flatten() for m in after.lora]
        + [(after.heads[h] - noiseless.heads[h]).flatten() for h in after.heads]
    ).double()
    expected = Z * C / 2
    assert abs(float(noise.std()) - expected) < 4 * expected / math.sqrt(2 * noise.numel())
    assert abs(float(noise.mean())) < 4 * expected / math.sqrt(noise.numel())

    # Assert: epsilon per round and in the summary is dp-accounting's own; the third round never ran
    privacy = summary["privacy"]
    assert privacy["epsilon"] == dp_figure(2) and privacy["rounds"] == 2 and privacy["delta"] == DELTA
    assert "privacy budget" in summary["stopped"] and summary["final_round"] == 2
    lines = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert [line["epsilon"] for line in lines] == [dp_figure(1), dp_figure(2)]
    registry = orchestrator.metrics.registry
    assert registry.get_sample_value("fedpipe_dp_epsilon") == dp_figure(2)
    assert registry.get_sample_value("fedpipe_dp_updates_clipped_total", {"agent": AGENT_A}) == 2
    for directory in (tmp_path / "run" / "final", tmp_path / "run" / "rounds" / "0001"):
        with safe_open(str(directory / "adapter_model.safetensors"), "pt") as handle:
            metadata = handle.metadata()
        assert float(metadata["fedpipe_dp_noise_multiplier"]) == Z and metadata["fedpipe_dp_delta"] == "1e-05"
    with safe_open(str(tmp_path / "run" / "final" / "adapter_model.safetensors"), "pt") as handle:
        assert float(handle.metadata()["fedpipe_dp_epsilon"]) == float(f"{dp_figure(2):.6g}")
