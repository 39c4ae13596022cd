"""Robust aggregation: coordinate-wise median and trimmed mean, unweighted, and their strategies."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.adapters import FoldedUpdate, GlobalAdapter, LoraPair
from coordinator.strategy import get_strategy
from coordinator.strategy.robust import coordinate_median, trim_count, trimmed_mean

HEAD = "classifier.bias"
M = "layer.0.q"


def honest_and_one_outlier(count: int, seed: int, outlier: float) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    values = [torch.randn(5, 3, generator=generator) for _ in range(count)]
    return [*values, torch.full((5, 3), outlier)]


def test_the_median_of_an_odd_count_is_torch_median_and_of_an_even_count_the_middle_mean() -> None:
    # Prepare
    odd = [torch.tensor([1.0, 9.0]), torch.tensor([3.0, 2.0]), torch.tensor([2.0, 5.0])]
    even = [*odd, torch.tensor([10.0, 0.0])]

    # Execute / Assert
    assert torch.equal(coordinate_median(odd, [1, 1, 1]), torch.stack(odd).median(dim=0).values)
    assert torch.equal(coordinate_median(even, [1, 1, 1, 1]), torch.tensor([2.5, 3.5]))


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 9), st.integers(0, 2**16), st.floats(-1e30, 1e30))
def test_one_outlier_cannot_move_the_median_outside_the_honest_range(count: int, seed: int, outlier: float) -> None:
    # Prepare
    tensors = honest_and_one_outlier(count, seed, outlier)
    honest = torch.stack(tensors[:-1])

    # Execute
    result = coordinate_median(tensors, [1.0] * len(tensors))

    # Assert
    assert bool((result >= honest.min(dim=0).values).all()) and bool((result <= honest.max(dim=0).values).all())


@settings(max_examples=100, deadline=None)
@given(st.integers(4, 12), st.integers(0, 2**16), st.floats(-1e30, 1e30))
def test_a_trimmed_mean_that_drops_one_per_end_stays_within_the_honest_range(
    count: int, seed: int, outlier: float
) -> None:
    # Prepare: fraction chosen so exactly one value is dropped at each end
    tensors = honest_and_one_outlier(count, seed, outlier)
    fraction = 1.0 / len(tensors)
    honest = torch.stack(tensors[:-1])

    # Execute
    result = trimmed_mean(tensors, [1.0] * len(tensors), fraction)

    # Assert
    assert trim_count(len(tensors), fraction) == 1
    assert bool((result >= honest.min(dim=0).values - 1e-6).all()) and bool(
        (result <= honest.max(dim=0).values + 1e-6).all()
    )


def test_trimmed_mean_with_nothing_trimmed_is_the_plain_mean_and_weights_are_ignored() -> None:
    # Prepare
    tensors = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0]), torch.tensor([5.0, 10.0])]

    # Execute
    result = trimmed_mean(tensors, [100.0, 1.0, 1.0], 0.0)

    # Assert
    assert torch.equal(result, torch.tensor([3.0, 6.0]))


@pytest.mark.parametrize(
    ("count", "fraction", "drop"), [(3, 0.2, 0), (5, 0.2, 1), (10, 0.25, 2), (2, 0.49, 0), (3, 0.49, 1)]
)
def test_trim_count_keeps_at_least_one_value(count: int, fraction: float, drop: int) -> None:
    assert trim_count(count, fraction) == drop


@pytest.mark.parametrize("name", ["coordinate-median", "trimmed-mean"])
def test_a_robust_strategy_keeps_a_poisoned_head_and_lora_pair_at_the_honest_values(name: str) -> None:
    # Prepare: three honest agents agree, the fourth claims a huge weight and sends a huge bias and B
    honest_pair = LoraPair(a=torch.ones(2, 3), b=torch.full((4, 2), 0.5))
    poisoned = LoraPair(a=torch.ones(2, 3), b=torch.full((4, 2), 3e38))
    updates = [FoldedUpdate(f"h{i}", 10.0, {M: honest_pair}, {HEAD: torch.tensor([0.1, -0.1])}) for i in range(3)] + [
        FoldedUpdate("mallory", 1e12, {M: poisoned}, {HEAD: torch.tensor([1e6, -1e6])})
    ]
    current = GlobalAdapter(
        round=2, lora={M: LoraPair(torch.zeros(2, 3), torch.zeros(4, 2))}, heads={HEAD: torch.zeros(2)}
    )

    # Execute
    new, metrics = get_strategy(name, trim_fraction=0.25)(current, updates)

    # Assert
    assert torch.equal(new.heads[HEAD], torch.tensor([0.1, -0.1]))
    assert torch.equal(new.lora[M].b, honest_pair.b) and torch.equal(new.lora[M].a, honest_pair.a)
    assert new.round == 3 and metrics["updates"] == 4.0
