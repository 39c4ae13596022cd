"""Selection: combining agents' importance scores and choosing the mask under a budget."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import ConfigError
from common.types import ImportanceReport, ModuleShape
from coordinator.selection import combine, lora_cost, rescore, resolve_budget, select

MODULES = (
    ModuleShape("l0.q", 4, 4),  # cost 8 per rank
    ModuleShape("l0.v", 4, 4),
    ModuleShape("l1.q", 4, 4),
    ModuleShape("l1.wide", 4, 12),  # cost 16 per rank
)
NAMES = tuple(m.name for m in MODULES)


def report(scores: dict[str, float], samples: int) -> ImportanceReport:
    return ImportanceReport("p", scores, samples, 1, 0.1)


def test_combine_normalises_each_agent_then_weights_by_samples() -> None:
    # agent a: scale 10x larger than b, but the same ranking shape; b has 3x the samples
    reports = {
        "a": report({"l0.q": 10.0, "l0.v": 30.0, "l1.q": 0.0, "l1.wide": 60.0}, 100),
        "b": report({"l0.q": 0.5, "l0.v": 0.5, "l1.q": 0.0, "l1.wide": 0.0}, 300),
    }
    combined = combine(reports, NAMES)
    assert combined == pytest.approx(
        {"l0.q": 0.25 * 0.1 + 0.75 * 0.5, "l0.v": 0.25 * 0.3 + 0.75 * 0.5, "l1.q": 0.0, "l1.wide": 0.25 * 0.6}
    )
    assert sum(combined.values()) == pytest.approx(1.0)


def test_combine_ignores_an_agent_without_gradient_and_refuses_nothing() -> None:
    combined = combine({"a": report(dict.fromkeys(NAMES, 0.0), 10), "b": report({"l0.q": 2.0}, 10)}, NAMES)
    assert combined["l0.q"] == pytest.approx(0.5) and combined["l0.v"] == 0.0
    with pytest.raises(ValueError, match="no importance reports"):
        combine({}, NAMES)


@pytest.mark.parametrize(
    ("scores", "budget", "mask", "used"),
    [
        # top two fit exactly (8 + 8 at rank 1)
        ({"l0.q": 3, "l0.v": 1, "l1.q": 2, "l1.wide": 0}, 16, ("l0.q", "l1.q"), 16),
        # budget edge: one parameter short of the second matrix
        ({"l0.q": 3, "l0.v": 1, "l1.q": 2, "l1.wide": 0}, 15, ("l0.q",), 8),
        # the second-best matrix is too wide for what is left: it is skipped and a smaller one still enters
        ({"l0.q": 1, "l0.v": 9, "l1.q": 0, "l1.wide": 5}, 20, ("l0.q", "l0.v"), 16),
        # a matrix wider than the whole budget never enters
        ({"l0.q": 1, "l0.v": 2, "l1.q": 0, "l1.wide": 9}, 15, ("l0.v",), 8),
        # ties go to the earlier module in model order; the mask comes back in model order
        ({"l0.q": 1, "l0.v": 5, "l1.q": 5, "l1.wide": 0}, 16, ("l0.v", "l1.q"), 16),
        ({"l0.q": 5, "l0.v": 5, "l1.q": 5, "l1.wide": 0}, 16, ("l0.q", "l0.v"), 16),
        # everything fits
        ({"l0.q": 1, "l0.v": 1, "l1.q": 1, "l1.wide": 1}, 40, NAMES, 40),
    ],
)
def test_select_is_exact(scores: dict[str, float], budget: int, mask: tuple[str, ...], used: int) -> None:
    selection = select(scores, MODULES, rank=1, budget=budget)
    assert selection.mask == mask and selection.used == used and selection.budget == budget


def test_budget_that_fits_nothing_names_the_smallest_cost() -> None:
    with pytest.raises(ConfigError, match=r"7 trainable parameters fit no matrix \(the smallest needs 8\)"):
        select(dict.fromkeys(NAMES, 1.0), MODULES, rank=1, budget=7)


@pytest.mark.parametrize(("budget", "expected"), [(0.5, 40), (1.0, 80), (0.34, 27), (100.0, 100)])
def test_budget_as_fraction_or_count(budget: float, expected: int) -> None:
    assert resolve_budget(budget, MODULES, rank=2) == expected  # all candidates: 2 * (8 + 8 + 8 + 16) = 80


def test_non_positive_budget_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"selection\.budget: must be positive"):
        resolve_budget(0.0, MODULES, rank=2)


@settings(max_examples=60, deadline=None)
@given(
    scores=st.lists(st.floats(0, 10, allow_nan=False), min_size=4, max_size=4),
    rank=st.sampled_from([1, 2, 4, 8]),
    budget=st.integers(8, 400),
)
def test_select_invariants(scores: list[float], rank: int, budget: int) -> None:
    table = dict(zip(NAMES, scores, strict=True))
    try:
        selection = select(table, MODULES, rank, budget)
    except ConfigError:
        assert budget < min(lora_cost(m, rank) for m in MODULES)
        return
    chosen = [m for m in MODULES if m.name in selection.mask]
    assert selection.used == sum(lora_cost(m, rank) for m in chosen) <= budget
    assert list(selection.mask) == [m.name for m in MODULES if m.name in selection.mask]  # model order
    # no left-out matrix both scores higher than a chosen one and would still fit in the leftover
    for left in (m for m in MODULES if m.name not in selection.mask):
        if lora_cost(left, rank) <= budget - selection.used:
            pytest.fail(f"{left.name} fits in the leftover budget but was left out")


def test_rescore_ranks_the_trained_matrices_by_training_on_the_previous_scale() -> None:
    # Prepare: a and b were trained; training now says b matters three times as much as a
    previous = {"a": 0.4, "b": 0.2, "c": 0.25, "d": 0.15}

    # Execute
    scores = rescore(previous, {"a": 1e-6, "b": 3e-6})

    # Assert: a and b keep their 0.6 together, split 1:3; c and d keep their probe scores
    assert scores == pytest.approx({"a": 0.15, "b": 0.45, "c": 0.25, "d": 0.15})
    assert sum(scores.values()) == pytest.approx(sum(previous.values()))


def test_rescore_lets_an_untrained_matrix_enter_when_a_trained_one_falls_below_it() -> None:
    # Prepare: budget for two matrices of four equal shapes
    shapes = [ModuleShape(name, 8, 8) for name in ("a", "b", "c", "d")]
    previous = {"a": 0.3, "b": 0.3, "c": 0.25, "d": 0.15}
    before = select(previous, shapes, 4, 2 * lora_cost(shapes[0], 4)).mask

    # Execute
    after = select(rescore(previous, {"a": 1.0, "b": 0.05}), shapes, 4, 2 * lora_cost(shapes[0], 4)).mask

    # Assert: b's training share (0.03) falls below c's 0.25, so c enters
    assert before == ("a", "b") and after == ("a", "c")


def test_rescore_without_training_signal_keeps_the_previous_scores() -> None:
    assert rescore({"a": 0.5, "b": 0.5}, {"a": 0.0}) == {"a": 0.5, "b": 0.5}
    assert rescore({"a": 0.5}, {"zzz": 1.0}) == {"a": 0.5}  # a score for a non-candidate is ignored
