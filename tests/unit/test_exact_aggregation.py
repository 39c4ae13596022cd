"""Exact rank padding, FlexLoRA and HetLoRA against dense float64 statements of what they must compute."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from common.adapters import FoldedUpdate, GlobalAdapter, LoraPair, broadcast_tensors, truncate_rank
from common.types import ModelSpec, ModuleShape, Quantization, TrainPlan
from coordinator.strategy import get_strategy
from coordinator.strategy.exact import aggregate as exact
from coordinator.strategy.exact import flexlora
from coordinator.strategy.hetlora import aggregate as hetlora
from coordinator.strategy.lowrank import A_ROW_NORM, refactor
from coordinator.strategy.slot_average import aggregate_module

M, N = "layer.0.q", "layer.0.v"


def dense(pair: LoraPair) -> torch.Tensor:
    return pair.b.double() @ pair.a.double()


def random_pair(generator: torch.Generator, d_out: int, d_in: int, rank: int) -> LoraPair:
    return LoraPair(a=torch.randn(rank, d_in, generator=generator), b=torch.randn(d_out, rank, generator=generator))


@dataclass(frozen=True)
class Case:
    """A module's global (or none), the agents' returned pairs and their sample weights."""

    current: LoraPair | None
    pairs: list[LoraPair]
    weights: list[float]

    def global_(self) -> GlobalAdapter:
        return GlobalAdapter(round=3, lora={M: self.current} if self.current is not None else {}, heads={})

    def updates(self) -> list[FoldedUpdate]:
        return [
            FoldedUpdate(agent_id=f"a{i}", weight=w, lora={M: p}, heads={})
            for i, (p, w) in enumerate(zip(self.pairs, self.weights, strict=True))
        ]

    def expected_exact(self) -> torch.Tensor:
        """G + sum_i w_i (B_i A_i - G truncated to r_i), densely."""
        total = sum(self.weights)
        g = dense(self.current) if self.current is not None else torch.zeros_like(dense(self.pairs[0]))
        out = g.clone()
        for pair, w in zip(self.pairs, self.weights, strict=True):
            sent = dense(truncate_rank(self.current, min(pair.rank, self.current.rank))) if self.current else 0.0
            out += (w / total) * (dense(pair) - sent)
        return out

    def expected_flexlora(self) -> torch.Tensor:
        total = sum(self.weights)
        return sum(((w / total) * dense(p) for p, w in zip(self.pairs, self.weights, strict=True)), torch.tensor(0.0))

    def whole_rank(self) -> int:
        return sum(p.rank for p in self.pairs) + (self.current.rank if self.current is not None else 0)


@st.composite
def cases(draw: st.DrawFn, equal_ranks: bool = False) -> Case:
    d_out, d_in = draw(st.integers(2, 12)), draw(st.integers(2, 12))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    global_rank = draw(st.integers(0, 5))
    count = draw(st.integers(1, 4))
    if equal_ranks:
        rank = draw(st.integers(max(global_rank, 1), 6))
        ranks = [rank] * count
    else:
        ranks = draw(st.lists(st.integers(1, 6), min_size=count, max_size=count))
    weights = draw(st.lists(st.floats(0.1, 10.0), min_size=count, max_size=count))
    current = random_pair(generator, d_out, d_in, global_rank) if global_rank else None
    return Case(current, [random_pair(generator, d_out, d_in, r) for r in ranks], weights)


def close(x: torch.Tensor, y: torch.Tensor, tol: float = 1e-5) -> bool:
    return float((x - y).abs().max()) <= tol * max(1.0, float(y.abs().max()))


def best_rank(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank], s


# ---------------------------------------------------------------- the invariants of the issue


@settings(max_examples=60, deadline=None)
@given(cases())
def test_when_the_global_rank_holds_the_whole_update_its_product_is_the_weighted_mean_of_the_changes(
    case: Case,
) -> None:
    # Execute
    new, metrics = exact(case.global_(), case.updates(), global_rank=case.whole_rank())

    # Assert
    assert close(dense(new.lora[M]), case.expected_exact())
    assert metrics["truncated_energy_share"] == pytest.approx(0.0, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(cases(), st.integers(1, 6))
def test_the_broadcast_at_rank_r_is_the_best_rank_r_approximation(case: Case, r: int) -> None:
    # Prepare: the dense best rank-r approximation is unique only with a gap at r
    target = case.expected_exact()
    best, s = best_rank(target, r)
    assume(r < s.shape[0] and float(s[r - 1] - s[r]) > 1e-3 * float(s[0]))

    # Execute
    new, _ = exact(case.global_(), case.updates(), global_rank=case.whole_rank())

    # Assert
    assert close(dense(truncate_rank(new.lora[M], min(r, new.lora[M].rank))), best, 1e-4)


@settings(max_examples=60, deadline=None)
@given(cases(equal_ranks=True))
def test_equal_ranks_that_hold_the_whole_global_reduce_to_the_weighted_mean_of_the_products(case: Case) -> None:
    # Execute
    new, _ = exact(case.global_(), case.updates(), global_rank=case.whole_rank())

    # Assert
    assert close(dense(new.lora[M]), case.expected_flexlora())


@settings(max_examples=40, deadline=None)
@given(cases())
def test_modules_nobody_trained_are_unchanged(case: Case) -> None:
    # Prepare
    other = random_pair(torch.Generator().manual_seed(5), 3, 4, 2)
    global_ = case.global_()
    global_ = GlobalAdapter(round=global_.round, lora={**global_.lora, N: other}, heads={"head.w": torch.ones(2)})

    # Execute
    for aggregate in (exact, flexlora, hetlora):
        new, _ = aggregate(global_, case.updates())

        # Assert
        assert new.lora[N] is other
        assert torch.equal(new.heads["head.w"], torch.ones(2))


@settings(max_examples=60, deadline=None)
@given(cases())
def test_the_truncated_share_is_what_the_dense_truncation_drops_of_the_update(case: Case) -> None:
    # Prepare
    target = case.expected_exact()
    rank = max([p.rank for p in case.pairs] + ([case.current.rank] if case.current is not None else []))
    before = dense(case.current) if case.current is not None else torch.zeros_like(target)
    update_energy = float((target - before).pow(2).sum())
    assume(update_energy > 1e-6)
    best, _ = best_rank(target, rank)

    # Execute
    new, metrics = exact(case.global_(), case.updates())

    # Assert: the default global rank is the largest in play; dropped energy within [0, the update's]
    assert new.lora[M].rank == min(rank, *target.shape)
    share = float((target - best).pow(2).sum()) / update_energy
    assert metrics["truncated_energy_share"] == pytest.approx(share, rel=1e-4, abs=1e-7)
    assert 0.0 <= metrics["truncated_energy_share"] <= 1.0 + 1e-9


@settings(max_examples=40, deadline=None)
@given(cases())
def test_the_global_stays_svd_ordered_with_a_at_peft_scale(case: Case) -> None:
    # Execute
    new, _ = exact(case.global_(), case.updates())

    # Assert: A's rows orthogonal at peft's init norm, B's columns orthogonal with falling norms
    pair = new.lora[M]
    rank = pair.rank
    assert torch.allclose(pair.a.double() @ pair.a.double().T, torch.eye(rank, dtype=torch.float64) / 3, atol=1e-5)
    gram = pair.b.double().T @ pair.b.double()
    off = gram - torch.diag(torch.diag(gram))
    assert float(off.abs().max()) <= 1e-4 * max(1.0, float(gram.abs().max()))
    norms = pair.b.norm(dim=0)
    assert bool((norms[:-1] + 1e-4 * max(1.0, float(norms.max())) >= norms[1:]).all())


@settings(max_examples=40, deadline=None)
@given(cases())
def test_flexlora_is_the_best_approximation_of_the_mean_of_the_products(case: Case) -> None:
    # Execute
    new, _ = flexlora(case.global_(), case.updates(), global_rank=case.whole_rank())

    # Assert
    assert close(dense(new.lora[M]), case.expected_flexlora())


@settings(max_examples=40, deadline=None)
@given(cases())
def test_agent_order_does_not_matter(case: Case) -> None:
    # Execute
    forward, _ = exact(case.global_(), case.updates())
    backward, _ = exact(case.global_(), case.updates()[::-1])

    # Assert
    assert close(dense(forward.lora[M]), dense(backward.lora[M]))


# ---------------------------------------------------------------- hand-checked and edge cases


def test_a_low_rank_agent_keeps_the_global_components_it_was_not_sent() -> None:
    # Prepare: global rank 2 (diag 3, 1); a rank-1 agent returns what it was sent plus 1 in entry (0, 1)
    current = LoraPair(a=torch.eye(2), b=torch.diag(torch.tensor([3.0, 1.0])))
    sent = truncate_rank(current, 1)
    returned = LoraPair(a=torch.tensor([[1.0, 1.0 / 3.0]]), b=sent.b.clone())  # B A = [[3, 1], [0, 0]]
    global_ = GlobalAdapter(round=1, lora={M: current}, heads={})
    only = [FoldedUpdate(agent_id="low", weight=1.0, lora={M: returned}, heads={})]

    # Execute
    new, _ = exact(global_, only)
    slot, _ = get_strategy("slot-average")(global_, only)

    # Assert: exact keeps slot 2 (the 1 at (1, 1)); the per-slot average keeps it too, but only because slot 2
    # had no cover; the point is that exact adds the change [[0, 1], [0, 0]] to the whole global
    assert torch.allclose(dense(new.lora[M]), torch.tensor([[3.0, 1.0], [0.0, 1.0]], dtype=torch.float64), atol=1e-6)
    assert torch.allclose(dense(slot.lora[M]), torch.tensor([[3.0, 1.0], [0.0, 1.0]], dtype=torch.float64), atol=1e-6)


def test_exact_and_slot_average_differ_on_unequal_ranks_where_slot_average_is_not_the_mean() -> None:
    # Prepare: two agents at ranks 1 and 2 over a rank-2 global, equal weights, both leave the global unchanged
    current = LoraPair(a=torch.eye(2), b=torch.diag(torch.tensor([3.0, 1.0])))
    low = truncate_rank(current, 1)
    high = LoraPair(a=current.a.clone(), b=current.b.clone())
    global_ = GlobalAdapter(round=1, lora={M: current}, heads={})
    updates = [
        FoldedUpdate(agent_id="low", weight=1.0, lora={M: low}, heads={}),
        FoldedUpdate(agent_id="high", weight=1.0, lora={M: high}, heads={}),
    ]

    # Execute
    new, metrics = exact(global_, updates)

    # Assert: no agent changed anything, so the global must not change
    assert torch.allclose(dense(new.lora[M]), dense(current), atol=1e-6)
    assert metrics["delta_norm"] == pytest.approx(0.0, abs=1e-5)


def test_hetlora_weights_each_module_by_the_norm_of_the_product() -> None:
    # Prepare
    generator = torch.Generator().manual_seed(3)
    current = random_pair(generator, 4, 5, 2)
    pairs = [random_pair(generator, 4, 5, r) for r in (1, 3)]
    global_ = GlobalAdapter(round=1, lora={M: current}, heads={})
    updates = [
        FoldedUpdate(agent_id=f"a{i}", weight=100.0 * (i + 1), lora={M: p}, heads={}) for i, p in enumerate(pairs)
    ]

    # Execute
    new, _ = hetlora(global_, updates)

    # Assert: the sample weights play no part for the adapters
    norms = [float(torch.linalg.matrix_norm(dense(p))) for p in pairs]
    expected = aggregate_module(current, pairs, norms)
    assert torch.allclose(new.lora[M].a, expected.a) and torch.allclose(new.lora[M].b, expected.b)


def test_a_zero_product_still_broadcasts_a_usable_a() -> None:
    # Prepare: a fresh global (B = 0) and agents that did not move B
    spec = ModelSpec(
        fingerprint="f",
        model_type="bert",
        task="seq-cls",
        labels=("a", "b"),
        candidates=(ModuleShape(M, 5, 4),),
        heads=(),
        base_parameters=20,
    )
    current = LoraPair(a=torch.randn(2, 5), b=torch.zeros(4, 2))
    updates = [FoldedUpdate(agent_id="a", weight=1.0, lora={M: LoraPair(a=current.a, b=current.b)}, heads={})]
    new, _ = exact(GlobalAdapter(round=0, lora={M: current}, heads={}), updates)
    plan = TrainPlan(
        plan_id="p",
        target_modules=(M,),
        rank_pattern={M: 2},
        lora_alpha=4.0,
        lora_dropout=0.0,
        modules_to_save=(),
        batch_size=1,
        local_epochs=1,
        max_steps=1,
        learning_rate=1e-3,
        weight_decay=0.0,
        quantization=Quantization.NONE,
        max_seq_len=8,
        deadline_s=1.0,
        seed=0,
    )

    # Execute
    sent = broadcast_tensors(new, plan, spec)

    # Assert: B stays 0 (dW unchanged) and A's rows keep peft's scale, so training can move them
    assert float(sent[f"{M}.lora_B"].abs().max()) == 0.0
    assert torch.allclose(sent[f"{M}.lora_A"].norm(dim=1), torch.full((2,), A_ROW_NORM), atol=1e-5)


@pytest.mark.parametrize(("d_out", "d_in", "ranks"), [(6, 5, [1, 2]), (6, 5, [4, 4, 4, 4]), (40, 30, [8] * 6)])
def test_the_factored_and_the_dense_routes_give_the_same_sum(d_out: int, d_in: int, ranks: Sequence[int]) -> None:
    # Prepare: a few ranks take the factored route, many the dense one
    generator = torch.Generator().manual_seed(11)
    pairs = [random_pair(generator, d_out, d_in, r) for r in ranks]
    target = sum((dense(p) for p in pairs), torch.zeros(d_out, d_in, dtype=torch.float64))

    # Execute
    result = refactor([p.b for p in pairs], [p.a for p in pairs], min(d_out, d_in))

    # Assert
    assert close(dense(result.pair), target)
    assert float(result.singular_values.pow(2).sum()) == pytest.approx(float(target.pow(2).sum()), rel=1e-9)
