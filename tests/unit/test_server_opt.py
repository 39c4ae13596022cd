"""FedAvgM, FedAdam and FedYogi over the aggregated change: against dense reference formulas, their state
through a checkpoint, and the config that builds them."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load, save

from common.adapters import FoldedUpdate, GlobalAdapter, LoraPair
from common.errors import ConfigError
from coordinator.cli import build_strategy
from coordinator.config import CoordinatorConfig
from coordinator.strategy import ServerOptimized, get_strategy
from coordinator.strategy.server_opt import ServerSettings, step

M, N = "layer.0.q", "layer.0.v"
HEAD = "classifier.weight"
D_OUT, D_IN = 5, 4


def dense(pair: LoraPair) -> torch.Tensor:
    return pair.b.double() @ pair.a.double()


def rounds_of_updates(seed: int, count: int = 3) -> list[list[FoldedUpdate]]:
    """`count` rounds of two agents (ranks 1 and 2, weights 1 and 3) on module M and the head."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        out.append(
            [
                FoldedUpdate(
                    agent_id=f"a{i}",
                    weight=w,
                    lora={
                        M: LoraPair(
                            torch.randn(r, D_IN, generator=generator), torch.randn(D_OUT, r, generator=generator)
                        )
                    },
                    heads={HEAD: torch.randn(2, D_IN, generator=generator)},
                )
                for i, (r, w) in enumerate([(1, 1.0), (2, 3.0)])
            ]
        )
    return out


def start() -> GlobalAdapter:
    generator = torch.Generator().manual_seed(99)
    pair = LoraPair(torch.randn(2, D_IN, generator=generator), torch.randn(D_OUT, 2, generator=generator))
    return GlobalAdapter(round=0, lora={M: pair}, heads={HEAD: torch.zeros(2, D_IN)})


def full_rank(kind: str, lr: float, **kw: float) -> ServerSettings:
    return ServerSettings(kind, lr, global_rank=min(D_OUT, D_IN), **kw)


def test_fedavgm_without_momentum_at_lr_1_is_the_base_strategy() -> None:
    # Prepare
    global_, updates = start(), rounds_of_updates(1)[0]
    plain = get_strategy("rank-padding", global_rank=min(D_OUT, D_IN))
    optimized = get_strategy("rank-padding", server=full_rank("fedavgm", 1.0, beta1=0.0))

    # Execute
    expected, _ = plain(global_, updates)
    got, metrics = optimized(global_, updates)

    # Assert
    assert torch.allclose(dense(got.lora[M]), dense(expected.lora[M]), atol=1e-5)
    assert torch.allclose(got.heads[HEAD], expected.heads[HEAD], atol=1e-6)
    assert metrics["truncated_energy_share"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("kind", ["fedavgm", "fedadam", "fedyogi"])
def test_three_rounds_match_the_dense_reference_formulas(kind: str) -> None:
    # Prepare: the reference keeps dW and the head densely and applies Reddi et al.'s update by hand
    lr, b1, b2, tau = 0.3, 0.8, 0.95, 1e-2
    strategy = get_strategy("rank-padding", server=full_rank(kind, lr, beta1=b1, beta2=b2, tau=tau))
    base = get_strategy("rank-padding", global_rank=1 << 30)
    global_ = start()
    ref = {"w": dense(global_.lora[M]), "h": global_.heads[HEAD].double()}
    m = {k: torch.zeros_like(v) for k, v in ref.items()}
    v = {k: torch.full_like(x, tau**2) for k, x in ref.items()}

    for updates in rounds_of_updates(2):
        # the reference: base target from the reference global (as a pair of the same product)
        target, _ = base(global_, updates)
        change = {"w": dense(target.lora[M]) - ref["w"], "h": target.heads[HEAD].double() - ref["h"]}
        for key in ref:
            d = change[key]
            if kind == "fedavgm":
                m[key] = b1 * m[key] + d
                ref[key] = ref[key] + lr * m[key]
                continue
            m[key] = b1 * m[key] + (1 - b1) * d
            if kind == "fedadam":
                v[key] = b2 * v[key] + (1 - b2) * d * d
            else:
                v[key] = v[key] - (1 - b2) * d * d * torch.sign(v[key] - d * d)
            ref[key] = ref[key] + lr * m[key] / (v[key].sqrt() + tau)

        # Execute
        global_, _ = strategy(global_, updates)

        # Assert
        assert torch.allclose(dense(global_.lora[M]), ref["w"], atol=1e-5)
        assert torch.allclose(global_.heads[HEAD].double(), ref["h"], atol=1e-6)


def test_yogi_moves_v_towards_the_square_by_at_most_its_share() -> None:
    # Prepare: v = 1 above d^2 = 0.25, and v = 0.01 below d^2 = 4
    settings = ServerSettings("fedyogi", 1.0, beta1=0.0, beta2=0.9, tau=0.1)
    moments = {"v::x": torch.tensor([1.0, 0.01], dtype=torch.float64)}

    # Execute
    step(settings, moments, "x", torch.tensor([0.5, 2.0], dtype=torch.float64))

    # Assert: 1 - 0.1 * 0.25 and 0.01 + 0.1 * 4
    assert torch.allclose(moments["v::x"], torch.tensor([0.975, 0.41], dtype=torch.float64))


def test_state_through_a_checkpoint_continues_bit_identically() -> None:
    # Prepare
    settings = ServerSettings("fedadam", 0.1, global_rank=2)
    rounds = rounds_of_updates(3)
    straight = get_strategy("rank-padding", server=settings)
    g1, _ = straight(start(), rounds[0])
    saved = save(straight.state_dict())
    g2, _ = straight(g1, rounds[1])

    # Execute: a fresh coordinator loads the moments from the checkpoint's bytes
    resumed = get_strategy("rank-padding", server=settings)
    resumed.load_state_dict(load(saved))
    r2, _ = resumed(g1, rounds[1])

    # Assert
    assert torch.equal(r2.lora[M].a, g2.lora[M].a) and torch.equal(r2.lora[M].b, g2.lora[M].b)
    assert torch.equal(r2.heads[HEAD], g2.heads[HEAD])
    assert all(torch.equal(resumed.state_dict()[k], straight.state_dict()[k]) for k in straight.state_dict())


def test_momentum_keeps_moving_a_module_nobody_trained_this_round() -> None:
    # Prepare: round 1 trains M, round 2 trains only N
    strategy = get_strategy("rank-padding", server=ServerSettings("fedavgm", 1.0, beta1=0.5))
    global_, _ = strategy(start(), rounds_of_updates(4)[0])
    before = dense(global_.lora[M])
    only_n = [FoldedUpdate("a", 1.0, {N: LoraPair(torch.ones(1, D_IN), torch.ones(D_OUT, 1))}, {})]

    # Execute
    after, _ = strategy(global_, only_n)

    # Assert: M moved by half of its momentum; the plain strategy would leave it alone
    assert not torch.allclose(dense(after.lora[M]), before, atol=1e-6)
    plain, _ = get_strategy("rank-padding")(global_, only_n)
    assert torch.equal(plain.lora[M].a, global_.lora[M].a)


def test_a_checkpoint_with_other_keys_is_refused() -> None:
    strategy = get_strategy("rank-padding", server=ServerSettings("fedadam", 0.01))
    with pytest.raises(ConfigError, match="keeps moments"):
        strategy.load_state_dict({"momentum": torch.zeros(1)})


def test_an_unknown_kind_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="server_optimizer"):
        ServerSettings("fedsgd", 1.0)


def test_the_config_builds_the_optimizer_with_its_default_rate() -> None:
    # Execute
    adam = build_strategy(CoordinatorConfig(aggregation={"server_optimizer": "fedadam"}, insecure=True))
    avgm = build_strategy(CoordinatorConfig(aggregation={"server_optimizer": "fedavgm"}, insecure=True))
    plain = build_strategy(CoordinatorConfig(insecure=True))

    # Assert
    assert isinstance(adam, ServerOptimized) and adam.settings.lr == 0.01 and adam.name == "fedadam(rank-padding)"
    assert isinstance(avgm, ServerOptimized) and avgm.settings.lr == 1.0
    assert not isinstance(plain, ServerOptimized) and plain.name == "rank-padding"


def test_ferret_with_a_server_optimizer_is_refused_at_start_up() -> None:
    with pytest.raises(ValueError, match=r"needs training\.mode lora"):
        CoordinatorConfig(aggregation={"server_optimizer": "fedyogi"}, training={"mode": "ferret"}, insecure=True)


@pytest.mark.parametrize("base", ["rank-padding", "slot-average", "hetlora", "coordinate-median"])
def test_any_lora_strategy_can_sit_under_an_optimizer_and_reports_the_same_figures(base: str) -> None:
    # Execute
    strategy = get_strategy(base, server=ServerSettings("fedavgm", 1.0, global_rank=2))
    new, metrics = strategy(start(), rounds_of_updates(5)[0])

    # Assert: the orchestrator's round line reads these keys
    for key in ("delta_norm", "max_rank", "truncated_energy_share", "truncated_energy_share_max"):
        assert key in metrics
    assert 0.0 <= metrics["truncated_energy_share_max"] <= 1.0
    assert new.lora[M].rank == 2


@pytest.mark.parametrize("strategy", ["slot-average", "flexlora", "hetlora"])
def test_ferret_refuses_the_strategies_of_lora_factors(strategy: str) -> None:
    with pytest.raises(ValueError, match="combines LoRA factors"):
        CoordinatorConfig(strategy=strategy, training={"mode": "ferret"}, insecure=True)
