"""Unit tests for the aggregation strategies: rank padding, FedAvg, the weighted helpers, the registry."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.adapters import FoldedUpdate, GlobalAdapter, LoraPair, fold_update
from common.errors import ConfigError
from common.types import Quantization, TrainPlan
from coordinator.strategy import NAMES, LoraAggregate, get_strategy
from coordinator.strategy.fedavg import aggregate as fedavg
from coordinator.strategy.slot_average import aggregate as slot_average
from coordinator.strategy.weighted import average_heads, total_weight, update_norm, weighted_mean

M = "layer.0.q"
N = "layer.0.v"
D_IN, D_OUT = 3, 2


def pair(rank: int, seed: int, d_in: int = D_IN, d_out: int = D_OUT, dyadic: bool = False) -> LoraPair:
    """A random folded pair; dyadic values (k / 8) keep every sum and mean exact in float32/64."""
    generator = torch.Generator().manual_seed(seed)
    if dyadic:
        return LoraPair(
            a=torch.randint(-16, 17, (rank, d_in), generator=generator).float() / 8,
            b=torch.randint(-16, 17, (d_out, rank), generator=generator).float() / 8,
        )
    return LoraPair(a=torch.randn(rank, d_in, generator=generator), b=torch.randn(d_out, rank, generator=generator))


def update(
    agent: str,
    weight: float,
    lora: Mapping[str, LoraPair],
    heads: Mapping[str, torch.Tensor] | None = None,
) -> FoldedUpdate:
    return FoldedUpdate(agent_id=agent, weight=weight, lora=dict(lora), heads=dict(heads or {}))


def global_adapter(
    lora: Mapping[str, LoraPair], heads: Mapping[str, torch.Tensor] | None = None, round_: int = 4
) -> GlobalAdapter:
    return GlobalAdapter(round=round_, lora=dict(lora), heads=dict(heads or {}))


def reference_rank_padding(current: LoraPair | None, pairs: Sequence[LoraPair], weights: Sequence[float]) -> LoraPair:
    """Independent vectorised statement of METHOD.md section 4, in float64.

    Pad every folded pair to R with zeros, mask the slots each agent covers, and take
    sum_i w_i m_i X_i / sum_i w_i m_i per slot; slots with no cover keep the (padded) global value.
    """
    ranks = [p.rank for p in pairs] + ([current.rank] if current is not None else [])
    big_r = max(ranks)
    d_out, d_in = pairs[0].b.shape[0], pairs[0].a.shape[1]
    num_a = torch.zeros(big_r, d_in, dtype=torch.float64)
    num_b = torch.zeros(d_out, big_r, dtype=torch.float64)
    den = torch.zeros(big_r, dtype=torch.float64)
    for p, w in zip(pairs, weights, strict=True):
        mask = (torch.arange(big_r) < p.rank).double()
        a = torch.zeros(big_r, d_in, dtype=torch.float64)
        a[: p.rank] = p.a.double()
        b = torch.zeros(d_out, big_r, dtype=torch.float64)
        b[:, : p.rank] = p.b.double()
        num_a += w * mask[:, None] * a
        num_b += w * mask[None, :] * b
        den += w * mask
    keep_a = torch.zeros(big_r, d_in, dtype=torch.float64)
    keep_b = torch.zeros(d_out, big_r, dtype=torch.float64)
    if current is not None:
        keep_a[: current.rank] = current.a.double()
        keep_b[:, : current.rank] = current.b.double()
    covered = den > 0
    safe = torch.where(covered, den, torch.ones_like(den))
    a_out = torch.where(covered[:, None], num_a / safe[:, None], keep_a)
    b_out = torch.where(covered[None, :], num_b / safe[None, :], keep_b)
    return LoraPair(a=a_out.float(), b=b_out.float())


def plan(rank: int, alpha: float) -> TrainPlan:
    return TrainPlan(
        plan_id="p",
        target_modules=(M,),
        rank_pattern={M: rank},
        lora_alpha=alpha,
        lora_dropout=0.0,
        modules_to_save=(),
        batch_size=1,
        local_epochs=1,
        max_steps=0,
        learning_rate=1e-3,
        weight_decay=0.0,
        quantization=Quantization.NONE,
        max_seq_len=8,
        deadline_s=1.0,
        seed=0,
    )


# ---------------------------------------------------------------- the hand-computed example


def test_hand_computed_example_two_agents_ranks_one_and_two() -> None:
    # Prepare: 2x3 weight (d_in 3, d_out 2); both agents at scale alpha / r = 2.
    agent1 = fold_update(
        "a1",
        1.0,
        {f"{M}.lora_A": torch.tensor([[1.0, 2.0, 3.0]]), f"{M}.lora_B": torch.tensor([[1.0], [2.0]])},
        plan(rank=1, alpha=2.0),
    )  # folded B = [[2], [4]]
    agent2 = fold_update(
        "a2",
        3.0,
        {
            f"{M}.lora_A": torch.tensor([[3.0, 0.0, 3.0], [1.0, 1.0, 1.0]]),
            f"{M}.lora_B": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
        },
        plan(rank=2, alpha=4.0),
    )  # folded B = [[2, 0], [0, 2]]
    current = LoraPair(
        a=torch.tensor([[9.0, 9.0, 9.0], [8.0, 8.0, 8.0], [7.0, 7.0, 7.0]]),
        b=torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]),
    )
    global_ = global_adapter({M: current})

    # Execute
    new, metrics = slot_average(global_, [agent1, agent2])

    # Assert
    # slot 0, both agents, weights 1 and 3: A = ([1,2,3] + 3 [3,0,3]) / 4, B = ([2,4] + 3 [2,0]) / 4
    # slot 1, agent 2 only: its own row / column; slot 2, nobody: the global's
    assert torch.equal(new.lora[M].a, torch.tensor([[2.5, 0.5, 3.0], [1.0, 1.0, 1.0], [7.0, 7.0, 7.0]]))
    assert torch.equal(new.lora[M].b, torch.tensor([[2.0, 0.0, 3.0], [1.0, 2.0, 6.0]]))
    assert new.round == 5
    assert metrics["updates"] == 2.0
    assert metrics["samples"] == 4.0
    assert metrics["modules"] == 1.0
    assert metrics["max_rank"] == 3.0


def test_hand_computed_example_without_global_module() -> None:
    # Prepare: same agents as above, already folded; the global has never seen the module.
    agent1 = update("a1", 1.0, {M: LoraPair(a=torch.tensor([[1.0, 2.0, 3.0]]), b=torch.tensor([[2.0], [4.0]]))})
    agent2 = update(
        "a2",
        3.0,
        {M: LoraPair(a=torch.tensor([[3.0, 0.0, 3.0], [1.0, 1.0, 1.0]]), b=torch.tensor([[2.0, 0.0], [0.0, 2.0]]))},
    )

    # Execute
    new, metrics = slot_average(global_adapter({}), [agent1, agent2])

    # Assert
    assert torch.equal(new.lora[M].a, torch.tensor([[2.5, 0.5, 3.0], [1.0, 1.0, 1.0]]))
    assert torch.equal(new.lora[M].b, torch.tensor([[2.0, 0.0], [1.0, 2.0]]))
    # delta_norm: dW_new = B A = [[5, 1, 6], [4.5, 2.5, 5]] against dW_old = 0
    expected = (25 + 1 + 36 + 20.25 + 6.25 + 25) ** 0.5
    assert metrics["delta_norm"] == pytest.approx(expected, rel=1e-12)
    assert metrics["max_rank"] == 2.0


def test_scaling_is_folded_before_averaging() -> None:
    # Prepare: the same dW = B A uploaded at rank 1 with alpha 1 and alpha 4 (scales 1 and 4).
    a = torch.tensor([[1.0, 0.0, 0.0]])
    agent_small = fold_update("s", 1.0, {f"{M}.lora_A": a, f"{M}.lora_B": torch.tensor([[4.0], [8.0]])}, plan(1, 1.0))
    agent_big = fold_update("b", 1.0, {f"{M}.lora_A": a, f"{M}.lora_B": torch.tensor([[1.0], [2.0]])}, plan(1, 4.0))

    # Execute
    new, _ = slot_average(global_adapter({}), [agent_small, agent_big])

    # Assert: both agents meant dW = [[4, 0, 0], [8, 0, 0]], so the average is that dW, not a mix of scales
    assert torch.equal(new.lora[M].b @ new.lora[M].a, torch.tensor([[4.0, 0.0, 0.0], [8.0, 0.0, 0.0]]))


# ---------------------------------------------------------------- invariants


@settings(max_examples=60, deadline=None)
@given(
    n_agents=st.integers(1, 5),
    rank=st.integers(1, 4),
    log_weight=st.integers(0, 10),
    with_global=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_equal_ranks_and_weights_is_exactly_fedavg(
    n_agents: int, rank: int, log_weight: int, with_global: bool, seed: int
) -> None:
    # Prepare: dyadic entries and a power-of-two weight make every sum exact, so equality is exact
    pairs = [pair(rank, seed + i, dyadic=True) for i in range(n_agents)]
    updates = [update(f"a{i}", float(2**log_weight), {M: p}) for i, p in enumerate(pairs)]
    global_ = global_adapter({M: pair(rank, seed - 1)} if with_global else {})
    plain_a = (torch.stack([p.a for p in pairs]).double().sum(0) / n_agents).float()
    plain_b = (torch.stack([p.b for p in pairs]).double().sum(0) / n_agents).float()

    # Execute
    padded, _ = slot_average(global_, updates)
    averaged, _ = fedavg(global_, updates)

    # Assert
    assert torch.equal(padded.lora[M].a, plain_a)
    assert torch.equal(padded.lora[M].b, plain_b)
    assert torch.equal(averaged.lora[M].a, plain_a)
    assert torch.equal(averaged.lora[M].b, plain_b)


@settings(max_examples=60, deadline=None)
@given(n_agents=st.integers(1, 5), rank=st.integers(1, 4), weight=st.floats(0.1, 1e4), seed=st.integers(0, 2**16))
def test_equal_ranks_and_weights_matches_fedavg_for_random_floats(
    n_agents: int, rank: int, weight: float, seed: int
) -> None:
    # Prepare
    pairs = [pair(rank, seed + i) for i in range(n_agents)]
    updates = [update(f"a{i}", weight, {M: p}) for i, p in enumerate(pairs)]

    # Execute
    new, _ = slot_average(global_adapter({M: pair(rank, seed - 1)}), updates)

    # Assert
    torch.testing.assert_close(new.lora[M].a, torch.stack([p.a for p in pairs]).mean(0))
    torch.testing.assert_close(new.lora[M].b, torch.stack([p.b for p in pairs]).mean(0))


@settings(max_examples=80, deadline=None)
@given(
    ranks=st.lists(st.integers(1, 5), min_size=1, max_size=5),
    weights_seed=st.lists(st.integers(1, 1000), min_size=5, max_size=5),
    global_rank=st.integers(0, 6),
    seed=st.integers(0, 2**16),
)
def test_unequal_ranks_average_each_slot_over_covering_agents(
    ranks: list[int], weights_seed: list[int], global_rank: int, seed: int
) -> None:
    # Prepare
    weights = [float(w) for w in weights_seed[: len(ranks)]]
    pairs = [pair(r, seed + i) for i, r in enumerate(ranks)]
    current = pair(global_rank, seed - 1) if global_rank > 0 else None
    global_ = global_adapter({M: current} if current is not None else {})
    updates = [update(f"a{i}", w, {M: p}) for i, (p, w) in enumerate(zip(pairs, weights, strict=True))]
    expected = reference_rank_padding(current, pairs, weights)

    # Execute
    new, metrics = slot_average(global_, updates)

    # Assert
    result = new.lora[M]
    assert result.rank == max([*ranks, global_rank])
    torch.testing.assert_close(result.a, expected.a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(result.b, expected.b, rtol=1e-6, atol=1e-6)
    if current is not None:
        # slots no agent covers keep the global value bit for bit
        top = max(ranks)
        assert torch.equal(result.a[top:], current.a[top:])
        assert torch.equal(result.b[:, top:], current.b[:, top:])
    assert metrics["samples"] == sum(weights)


@settings(max_examples=40, deadline=None)
@given(
    ranks=st.lists(st.integers(1, 4), min_size=2, max_size=4),
    weights=st.lists(st.integers(1, 100), min_size=4, max_size=4),
    seed=st.integers(0, 2**16),
    rng=st.randoms(use_true_random=False),
)
def test_result_does_not_depend_on_agent_order(
    ranks: list[int], weights: list[int], seed: int, rng: random.Random
) -> None:
    # Prepare
    heads = {"h.weight": torch.randn(2, 2, generator=torch.Generator().manual_seed(seed))}
    updates = [
        update(f"a{i}", float(w), {M: pair(r, seed + i)}, {"h.weight": torch.full((2, 2), float(i))})
        for i, (r, w) in enumerate(zip(ranks, weights, strict=False))
    ]
    shuffled = list(updates)
    rng.shuffle(shuffled)

    # Execute
    first, _ = slot_average(global_adapter({}, heads), updates)
    second, _ = slot_average(global_adapter({}, heads), shuffled)

    # Assert
    torch.testing.assert_close(first.lora[M].a, second.lora[M].a, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(first.lora[M].b, second.lora[M].b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(first.heads["h.weight"], second.heads["h.weight"], rtol=1e-6, atol=1e-7)


def test_module_is_averaged_only_over_agents_that_trained_it() -> None:
    # Prepare: agent 1 trains M and N, agent 2 only M; weights 1 and 3
    m1, m2, n1 = pair(2, 1, dyadic=True), pair(2, 2, dyadic=True), pair(2, 3, dyadic=True)
    updates = [update("a1", 1.0, {M: m1, N: n1}), update("a2", 3.0, {M: m2})]
    global_ = global_adapter({M: pair(2, 10), N: pair(2, 11)})

    # Execute
    new, metrics = slot_average(global_, updates)

    # Assert
    assert torch.equal(new.lora[M].a, (m1.a + 3 * m2.a) / 4)
    assert torch.equal(new.lora[N].a, n1.a)  # agent 2 never dilutes N
    assert torch.equal(new.lora[N].b, n1.b)
    assert metrics["modules"] == 2.0


def test_modules_and_heads_nobody_trained_keep_the_global_value() -> None:
    # Prepare
    untouched = pair(3, 5)
    head_kept = torch.tensor([1.0, 2.0])
    global_ = global_adapter({M: pair(2, 4), N: untouched}, {"kept.bias": head_kept, "classifier.bias": torch.zeros(2)})
    updates = [update("a1", 2.0, {M: pair(2, 6)}, {"classifier.bias": torch.tensor([4.0, 8.0])})]

    # Execute
    new, _ = slot_average(global_, updates)

    # Assert
    assert torch.equal(new.lora[N].a, untouched.a)
    assert torch.equal(new.lora[N].b, untouched.b)
    assert torch.equal(new.heads["kept.bias"], head_kept)
    assert torch.equal(new.heads["classifier.bias"], torch.tensor([4.0, 8.0]))


def test_heads_are_sample_weighted_over_the_agents_that_carry_them() -> None:
    # Prepare
    global_ = global_adapter({}, {"classifier.weight": torch.full((2, 2), 100.0)})
    updates = [
        update("a1", 1.0, {M: pair(1, 1)}, {"classifier.weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}),
        update("a2", 3.0, {M: pair(1, 2)}, {"classifier.weight": torch.tensor([[5.0, 6.0], [7.0, 8.0]])}),
        update("a3", 4.0, {M: pair(1, 3)}, {"pooler.bias": torch.tensor([2.0])}),
    ]

    # Execute
    new, _ = slot_average(global_, updates)

    # Assert
    assert torch.equal(new.heads["classifier.weight"], torch.tensor([[4.0, 5.0], [6.0, 7.0]]))
    assert torch.equal(new.heads["pooler.bias"], torch.tensor([2.0]))


def test_aggregate_does_not_modify_its_inputs() -> None:
    # Prepare
    current = pair(3, 1)
    head = torch.ones(2)
    global_ = global_adapter({M: current}, {"h.bias": head})
    sent = pair(2, 2)
    updates = [update("a1", 1.0, {M: sent}, {"h.bias": torch.zeros(2)})]
    snapshot = (current.a.clone(), current.b.clone(), head.clone(), sent.a.clone(), sent.b.clone())

    # Execute
    new, _ = slot_average(global_, updates)
    new.lora[M].a.add_(1.0)
    new.heads["h.bias"].add_(1.0)

    # Assert
    assert torch.equal(current.a, snapshot[0])
    assert torch.equal(current.b, snapshot[1])
    assert torch.equal(head, snapshot[2])
    assert torch.equal(sent.a, snapshot[3])
    assert torch.equal(sent.b, snapshot[4])
    assert global_.round == 4


def test_identical_updates_return_the_same_adapter() -> None:
    # Prepare
    current = pair(3, 9)
    updates = [update(f"a{i}", float(i + 1), {M: current}) for i in range(3)]

    # Execute
    new, metrics = slot_average(global_adapter({M: current}), updates)

    # Assert
    torch.testing.assert_close(new.lora[M].a, current.a)
    torch.testing.assert_close(new.lora[M].b, current.b)
    assert metrics["delta_norm"] == pytest.approx(0.0, abs=1e-5)


def test_zero_weight_update_has_no_influence() -> None:
    # Prepare: the zero-sample agent alone covers slots 2..3, and alone carries a head
    current = pair(2, 1)
    heads = {"h.bias": torch.tensor([1.0, 1.0])}
    live = [update("a1", 5.0, {M: pair(2, 2)}, {})]
    idle = update("idle", 0.0, {M: pair(4, 3), N: pair(1, 4)}, {"h.bias": torch.tensor([9.0, 9.0])})

    # Execute
    with_idle, _ = slot_average(global_adapter({M: current}, heads), [*live, idle])
    without, _ = slot_average(global_adapter({M: current}, heads), live)

    # Assert
    assert set(with_idle.lora) == set(without.lora)
    assert torch.equal(with_idle.lora[M].a, without.lora[M].a)
    assert torch.equal(with_idle.lora[M].b, without.lora[M].b)
    assert torch.equal(with_idle.heads["h.bias"], without.heads["h.bias"])
    assert all(bool(torch.isfinite(t).all()) for p in with_idle.lora.values() for t in (p.a, p.b))


def test_delta_norm_counts_lora_and_head_changes() -> None:
    # Prepare
    current = LoraPair(a=torch.tensor([[1.0, 0.0, 0.0]]), b=torch.tensor([[0.0], [0.0]]))
    sent = LoraPair(a=torch.tensor([[1.0, 0.0, 0.0]]), b=torch.tensor([[3.0], [0.0]]))
    global_ = global_adapter({M: current}, {"h.bias": torch.tensor([0.0])})
    updates = [update("a", 1.0, {M: sent}, {"h.bias": torch.tensor([4.0])})]

    # Execute
    _, metrics = slot_average(global_, updates)

    # Assert: dW changes by 3 in one entry, the head by 4
    assert metrics["delta_norm"] == pytest.approx(5.0)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("strategy", [slot_average, fedavg], ids=["slot-average", "fedavg"])
def test_no_updates_raise(strategy: LoraAggregate) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="no updates"):
        strategy(global_adapter({M: pair(2, 1)}), [])


@pytest.mark.parametrize("strategy", [slot_average, fedavg], ids=["slot-average", "fedavg"])
@pytest.mark.parametrize("weights", [[0.0], [0.0, 0.0], [float("nan"), 1.0]])
def test_zero_total_weight_raises(strategy: LoraAggregate, weights: list[float]) -> None:
    # Prepare
    updates = [update(f"a{i}", w, {M: pair(2, i)}) for i, w in enumerate(weights)]

    # Execute / Assert
    with pytest.raises(ValueError, match="no samples"):
        strategy(global_adapter({M: pair(2, 9)}), updates)


@pytest.mark.parametrize("strategy", [slot_average, fedavg], ids=["slot-average", "fedavg"])
def test_negative_weight_raises(strategy: LoraAggregate) -> None:
    # Prepare
    updates = [update("a", 5.0, {M: pair(2, 1)}), update("b", -1.0, {M: pair(2, 2)})]

    # Execute / Assert
    with pytest.raises(ValueError, match="negative"):
        strategy(global_adapter({M: pair(2, 9)}), updates)


@pytest.mark.parametrize(
    ("global_rank", "ranks"),
    [(2, [2, 3]), (2, [1]), (4, [4, 4, 2]), (0, [2, 3]), (0, [1, 1, 4])],
)
def test_fedavg_rejects_unequal_ranks(global_rank: int, ranks: list[int]) -> None:
    # Prepare
    global_ = global_adapter({M: pair(global_rank, 0)} if global_rank else {})
    updates = [update(f"a{i}", 1.0, {M: pair(r, i)}) for i, r in enumerate(ranks)]

    # Execute / Assert
    with pytest.raises(ValueError, match="fedavg needs equal ranks"):
        fedavg(global_, updates)


def test_fedavg_accepts_equal_ranks_for_a_new_module() -> None:
    # Prepare
    p1, p2 = pair(2, 1, dyadic=True), pair(2, 2, dyadic=True)
    updates = [update("a1", 1.0, {N: p1}), update("a2", 1.0, {N: p2})]

    # Execute
    new, _ = fedavg(global_adapter({M: pair(3, 0)}), updates)

    # Assert
    assert torch.equal(new.lora[N].a, (p1.a + p2.a) / 2)
    assert new.lora[M].rank == 3


# ---------------------------------------------------------------- weighted helpers


def test_total_weight_sums_weights() -> None:
    # Prepare
    updates = [update("a", 2.0, {}), update("b", 0.0, {}), update("c", 3.5, {})]

    # Execute
    total = total_weight(updates)

    # Assert
    assert total == 5.5


def test_weighted_mean_is_exact_on_a_small_table() -> None:
    # Prepare
    tensors = [torch.tensor([1.0, 10.0]), torch.tensor([3.0, 20.0]), torch.tensor([5.0, 60.0])]

    # Execute
    mean = weighted_mean(tensors, [1.0, 2.0, 1.0])

    # Assert
    assert torch.equal(mean, torch.tensor([3.0, 27.5]))


def test_weighted_mean_keeps_the_input_dtype() -> None:
    # Prepare
    tensors = [torch.tensor([1.0], dtype=torch.bfloat16), torch.tensor([2.0], dtype=torch.bfloat16)]

    # Execute
    mean = weighted_mean(tensors, [1.0, 1.0])

    # Assert
    assert mean.dtype == torch.bfloat16
    assert float(mean) == 1.5


def test_average_heads_keeps_heads_nobody_sent() -> None:
    # Prepare
    current = {"x": torch.tensor([1.0]), "y": torch.tensor([2.0])}
    updates = [
        update("a", 1.0, {}, {"y": torch.tensor([4.0])}),
        update("b", 3.0, {}, {"y": torch.tensor([8.0])}),
    ]

    # Execute
    heads = average_heads(current, updates)

    # Assert
    assert torch.equal(heads["x"], torch.tensor([1.0]))
    assert torch.equal(heads["y"], torch.tensor([7.0]))
    assert torch.equal(current["y"], torch.tensor([2.0]))


def test_update_norm_over_common_names_with_equal_shapes() -> None:
    # Prepare
    before = {"x": torch.tensor([0.0, 0.0]), "y": torch.zeros(3), "gone": torch.ones(1)}
    after = {"x": torch.tensor([3.0, 4.0]), "y": torch.ones(2), "new": torch.ones(5)}

    # Execute
    norm = update_norm(before, after)

    # Assert
    assert norm == 5.0


# ---------------------------------------------------------------- registry


@pytest.mark.parametrize(("name", "function"), [("slot-average", slot_average), ("fedavg", fedavg)])
def test_get_strategy_returns_registered_function(name: str, function: LoraAggregate) -> None:
    # Execute
    strategy = get_strategy(name)

    # Assert
    assert strategy.aggregate is function and strategy.name == name
    assert name in NAMES and strategy.state_dict() == {}


@pytest.mark.parametrize("name", ["", "FedAvg", "FlexLoRA", "rank_padding", "exact"])
def test_get_strategy_unknown_name_raises_config_error_listing_choices(name: str) -> None:
    # Execute
    with pytest.raises(ConfigError) as caught:
        get_strategy(name)

    # Assert
    message = str(caught.value)
    assert message.startswith("strategy:")
    assert repr(name) in message
    assert "'fedavg'" in message
    assert "'rank-padding'" in message
