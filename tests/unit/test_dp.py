"""DP-FedAvg's pure parts: the linear layout (against slot-average), clipping, the noise's law, the ledger and
budget, and the config rules that refuse aggregations that are no sum."""

from __future__ import annotations

import math
from collections.abc import Mapping

import dp_accounting
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from common.adapters import GlobalAdapter, LoraPair, expected_tensors, fold_update
from common.errors import ConfigError
from common.linear import clip, norm
from common.types import ModelSpec, ModuleShape, Quantization, TrainPlan
from coordinator.config import CoordinatorConfig, DpSection
from coordinator.dp import DpAggregation, Ledger, add_noise
from coordinator.metrics import CoordinatorMetrics
from coordinator.modes import Contribution
from coordinator.modes.lora import LoraMode
from coordinator.privacy import ORDERS
from coordinator.strategy import get_strategy
from coordinator.strategy.slot_average import aggregate as slot_average

Q = "enc.layer.0.q"  # d_in 3, d_out 2
V = "enc.layer.0.v"  # d_in 4, d_out 5
SPEC = ModelSpec(
    fingerprint="fp",
    model_type="toy",
    task="seq-cls",
    labels=("neg", "pos"),
    candidates=(ModuleShape(Q, 3, 2), ModuleShape(V, 4, 5)),
    heads=(("classifier.weight", (2, 4)), ("classifier.bias", (2,)), ("pooler.dense.weight", (4, 4))),
    base_parameters=1000,
)
ALPHA = 8.0


def plan(ranks: Mapping[str, int], heads: tuple[str, ...] = ("classifier",)) -> TrainPlan:
    return TrainPlan(
        plan_id="p", target_modules=tuple(ranks), rank_pattern=dict(ranks), lora_alpha=ALPHA, lora_dropout=0.0,
        modules_to_save=heads, batch_size=8, local_epochs=1, max_steps=0, learning_rate=1e-3, weight_decay=0.0,
        quantization=Quantization.NONE, max_seq_len=32, deadline_s=60.0, seed=1,
    )  # fmt: skip


def global_adapter(seed: int = 0) -> GlobalAdapter:
    generator = torch.Generator().manual_seed(seed)
    return GlobalAdapter(
        round=3,
        lora={
            Q: LoraPair(a=torch.randn(2, 3, generator=generator), b=torch.randn(2, 2, generator=generator)),
            V: LoraPair(a=torch.randn(4, 4, generator=generator), b=torch.randn(5, 4, generator=generator)),
        },
        heads={
            "classifier.weight": torch.randn(2, 4, generator=generator),
            "classifier.bias": torch.randn(2, generator=generator),
            "pooler.dense.weight": torch.randn(4, 4, generator=generator),
        },
    )


def upload(plan_: TrainPlan, seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {info.name: scale * torch.randn(info.shape, generator=generator) for info in expected_tensors(plan_, SPEC)}


# Unequal ranks (Q at 4 is past the global's rank 2), a module one agent skips, a plan without the head.
PLANS = {
    "a": plan({Q: 2, V: 4}),
    "b": plan({Q: 4, V: 2}),
    "c": plan({V: 3}, heads=()),
}
MODE = LoraMode(SPEC, ALPHA, "base")


def linear_mean(
    global_: GlobalAdapter, plans: Mapping[str, TrainPlan], uploads: Mapping[str, dict[str, torch.Tensor]]
) -> GlobalAdapter:
    layout = MODE.linear_layout(global_, plans)
    sums = {name: torch.zeros_like(count) for name, count in layout.items()}
    for agent, tensors in uploads.items():
        for name, value in MODE.linear_terms(global_, Contribution(agent, 1.0, tensors, plans[agent]), layout).items():
            sums[name] += value
    new, _ = MODE.apply_linear(global_, sums, layout, get_strategy("slot-average"), global_.round + 1)
    assert isinstance(new, GlobalAdapter)
    return new


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_linear_mean_is_slot_average_at_unit_weights(seed: int) -> None:
    # Prepare
    global_ = global_adapter(seed)
    uploads = {agent: upload(p, seed * 10 + i) for i, (agent, p) in enumerate(PLANS.items())}
    folded = [fold_update(agent, 1.0, tensors, PLANS[agent]) for agent, tensors in uploads.items()]

    # Execute
    linear = linear_mean(global_, PLANS, uploads)
    reference, _ = slot_average(global_, folded)

    # Assert
    assert linear.ranks() == reference.ranks() == {Q: 4, V: 4}
    for module in (Q, V):
        torch.testing.assert_close(linear.lora[module].a, reference.lora[module].a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(linear.lora[module].b, reference.lora[module].b, rtol=1e-5, atol=1e-6)
    for name in global_.heads:
        torch.testing.assert_close(linear.heads[name], reference.heads[name], rtol=1e-5, atol=1e-6)
    assert torch.equal(linear.heads["pooler.dense.weight"], global_.heads["pooler.dense.weight"])  # nobody trains it


def test_an_agent_that_does_not_deliver_counts_as_no_change() -> None:
    # Prepare: three plans, two uploads
    global_ = global_adapter()
    uploads = {agent: upload(PLANS[agent], i) for i, agent in enumerate(("a", "b"))}

    # Execute
    new = linear_mean(global_, PLANS, uploads)

    # Assert: V's slot 0 is covered by all three plans: the two changes over 3
    folded = {agent: fold_update(agent, 1.0, uploads[agent], PLANS[agent]) for agent in uploads}
    change = sum(folded[agent].lora[V].a[0].double() - global_.lora[V].a[0].double() for agent in uploads)
    torch.testing.assert_close(new.lora[V].a[0].double(), global_.lora[V].a[0].double() + change / 3)
    # Q's slots 2-3 are covered by b alone: its value (the global has no such slot)
    torch.testing.assert_close(new.lora[Q].a[2:], folded["b"].lora[Q].a[2:])


def test_terms_are_zero_where_the_plan_trains_nothing() -> None:
    global_ = global_adapter()
    layout = MODE.linear_layout(global_, PLANS)
    terms = MODE.linear_terms(global_, Contribution("c", 1.0, upload(PLANS["c"], 5), PLANS["c"]), layout)
    assert not terms[f"{Q}.lora_A"].any() and not terms[f"{Q}.lora_B"].any()
    assert not terms[f"{V}.lora_A"][3:].any() and terms[f"{V}.lora_A"][:3].all()
    assert not terms["classifier.weight"].any()
    assert layout[f"{V}.lora_A"][:, 0].tolist() == [3, 3, 2, 1]  # ranks 4, 2, 3 cover slots 0-3
    assert layout[f"{Q}.lora_B"][0].tolist() == [2, 2, 1, 1]  # ranks 2 and 4


@settings(max_examples=25, deadline=None)
@given(bound=st.floats(0.01, 10.0), scale=st.floats(0.001, 5.0))
def test_clip_bounds_the_norm_and_keeps_the_direction(bound: float, scale: float) -> None:
    terms = {"x": torch.randn(7, 3, dtype=torch.float64) * scale, "y": torch.randn(5, dtype=torch.float64) * scale}
    clipped, before = clip(terms, bound)
    assert before == pytest.approx(norm(terms))
    assert norm(clipped) <= bound * (1 + 1e-12)
    factor = min(1.0, bound / before)
    for name in terms:
        torch.testing.assert_close(clipped[name], terms[name] * factor)


def test_noise_has_the_configured_standard_deviation_on_covered_coordinates_only() -> None:
    # Prepare: 400,000 covered coordinates and 1,000 uncovered
    std = 0.7
    sums = {"w": torch.zeros(400, 1000, dtype=torch.float64), "u": torch.ones(1000, dtype=torch.float64)}
    layout = {"w": torch.ones(400, 1000, dtype=torch.float64), "u": torch.zeros(1000, dtype=torch.float64)}

    # Execute
    noisy = add_noise(sums, layout, std, torch.Generator().manual_seed(3))

    # Assert: the sample sd of n normal draws is within 4 standard errors (sd / sqrt(2n)) of sd, the mean
    # within 4 x sd / sqrt(n), and the share within one sd is 68.27% to 4 binomial standard errors
    sample = noisy["w"].flatten()
    n = sample.numel()
    assert abs(float(sample.std()) - std) < 4 * std / math.sqrt(2 * n)
    assert abs(float(sample.mean())) < 4 * std / math.sqrt(n)
    share = float((sample.abs() < std).double().mean())
    assert abs(share - 0.682689) < 4 * math.sqrt(0.682689 * 0.317311 / n)
    assert torch.equal(noisy["u"], sums["u"])


def test_a_dp_round_adds_z_c_over_the_count_to_the_mean() -> None:
    # Prepare: four agents that return exactly what they were sent (no change), so the new global minus the
    # old is the noise divided by 4 wherever all four plans cover it
    spec = ModelSpec(
        fingerprint="fp", model_type="toy", task="seq-cls", labels=("neg", "pos"),
        candidates=(ModuleShape(Q, 256, 128),), heads=(), base_parameters=1,
    )  # fmt: skip
    mode = LoraMode(spec, ALPHA, "base")
    plans = {f"agent-{i}": plan({Q: 8}, heads=()) for i in range(4)}
    global_ = GlobalAdapter(round=0, lora={Q: LoraPair(a=torch.randn(8, 256), b=torch.randn(128, 8))}, heads={})
    sent = mode.download(global_, plans["agent-0"], spec)
    contributions = [Contribution(agent, 1.0, sent, p) for agent, p in plans.items()]
    section = DpSection(enabled=True, clip_norm=0.5, noise_multiplier=2.0)
    dp = DpAggregation(section, 10, CoordinatorMetrics(), torch.Generator().manual_seed(11))

    # Execute
    new, metrics = dp.aggregate(mode, global_, contributions, plans, get_strategy("fedavg"), 1)

    # Assert
    assert isinstance(new, GlobalAdapter)
    noise = torch.cat([(new.lora[Q].a - global_.lora[Q].a).flatten(), (new.lora[Q].b - global_.lora[Q].b).flatten()])
    expected = 2.0 * 0.5 / 4
    assert abs(float(noise.double().std()) - expected) < 4 * expected / math.sqrt(2 * noise.numel())
    assert metrics["dp_clipped"] == 0 and metrics["dp_noise_std"] == pytest.approx(1.0)


def test_the_ledger_is_dp_accountings_figure_for_mixed_rounds() -> None:
    events = [(0.5, 1.2)] * 4 + [(0.25, 1.2)] * 3 + [(0.5, 2.0)]
    accountant = dp_accounting.rdp.RdpAccountant(list(ORDERS))
    for q, z in events:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)))
    assert Ledger(1e-5, events).epsilon() == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert Ledger(1e-5, []).epsilon() == 0.0


def test_a_derived_noise_multiplier_spends_the_budget_in_exactly_the_configured_rounds() -> None:
    # Prepare
    section = DpSection(enabled=True, clip_norm=1.0, target_epsilon=3.0, delta=1e-5)
    dp = DpAggregation(section, 12, CoordinatorMetrics())

    # Execute
    dp.prepare(0.5)
    for _ in range(12):
        assert dp.over_budget(0.5) is None
        dp.published(0.5)

    # Assert
    assert dp.ledger.epsilon() <= 3.0
    reason = dp.over_budget(0.5)
    assert reason is not None and "target_epsilon 3" in reason
    saved = dp.state()
    resumed = DpAggregation(section, 12, CoordinatorMetrics())
    resumed.load_state(saved)
    assert resumed.noise_multiplier == dp.noise_multiplier and resumed.ledger.epsilon() == dp.ledger.epsilon()
    assert dp.metadata()["fedpipe_dp_rounds"] == "12"
    with pytest.raises(ConfigError, match="without differential privacy"):
        resumed.load_state({})


@pytest.mark.parametrize(
    ("settings_", "message"),
    [
        ({"privacy": {"dp": {"enabled": True, "noise_multiplier": 1.0}}}, "sums the updates"),
        ({"strategy": "trimmed-mean", "privacy": {"dp": {"enabled": True, "noise_multiplier": 1.0}}}, "trimmed-mean"),
        ({"strategy": "fedavg", "privacy": {"dp": {"enabled": True}}}, "noise_multiplier, or target_epsilon"),
        (
            {
                "strategy": "coordinate-median",
                "training": {"mode": "ferret"},
                "privacy": {"secure_aggregation": {"enabled": True}},
            },
            "fedavg or rank-padding in the ferret mode",
        ),
        (
            {"strategy": "fedavg", "insecure": True, "privacy": {"secure_aggregation": {"enabled": True}}},
            "signed_keys needs agent certificates",
        ),
        (
            {"strategy": "fedavg", "tls": {"auth": "token"}, "privacy": {"secure_aggregation": {"enabled": True}}},
            "signed_keys needs agent certificates",
        ),
    ],
)
def test_privacy_settings_that_cannot_hold_are_refused(settings_: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        CoordinatorConfig(**settings_)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("strategy", "mode"), [("fedavg", "lora"), ("slot-average", "lora"), ("rank-padding", "ferret")]
)
def test_linear_strategies_take_privacy(strategy: str, mode: str) -> None:
    settings_: dict[str, object] = {
        "strategy": strategy,
        "training": {"mode": mode},
        "privacy": {"dp": {"enabled": True, "target_epsilon": 8}},
    }
    config = CoordinatorConfig(**settings_)  # type: ignore[arg-type]
    assert config.privacy.dp.delta == 1e-5
