"""Client sampling: how many agents a round draws, and that the draw is seeded, uniform and stable."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.sampling import draw, sample_size, sit_outs


@pytest.mark.parametrize(
    ("alive", "fraction", "count", "minimum", "expected"),
    [
        (10, 1.0, 0, 2, 10),  # the default: everyone
        (10, 0.3, 0, 2, 3),
        (10, 0.25, 0, 2, 3),  # ceil
        (10, 0.1, 0, 2, 2),  # never under min_agents
        (10, 0.5, 4, 2, 4),  # a count wins over the fraction
        (3, 1.0, 5, 1, 3),  # never more than are alive
        (1000, 0.1, 0, 2, 100),
    ],
)
def test_sample_size(alive: int, fraction: float, count: int, minimum: int, expected: int) -> None:
    assert sample_size(alive, fraction, count, minimum) == expected


@given(st.sets(st.text(min_size=1, max_size=5), min_size=1, max_size=30), st.integers(0, 40), st.integers(0, 99))
def test_a_draw_is_a_sorted_subset_of_the_asked_size_and_the_same_every_time(
    agents: set[str], size: int, round_: int
) -> None:
    # Execute
    first = draw(agents, size, 7, round_)

    # Assert
    assert len(first) == min(size, len(agents))
    assert set(first) <= agents and list(first) == sorted(first)
    assert draw(sorted(agents, reverse=True), size, 7, round_) == first  # order of the input does not matter


def test_draws_change_with_the_round_and_the_seed() -> None:
    agents = [f"agent-{i}" for i in range(20)]
    by_round = {draw(agents, 5, 0, r) for r in range(1, 21)}
    by_seed = {draw(agents, 5, s, 1) for s in range(20)}
    assert len(by_round) > 15 and len(by_seed) > 15


def test_every_agent_is_drawn_at_the_sampling_rate() -> None:
    # Prepare: 10 agents, 3 a round, 3000 rounds: each is drawn 900 times in expectation (sd about 25)
    agents = [f"agent-{i}" for i in range(10)]

    # Execute
    counts = Counter(agent for r in range(3000) for agent in draw(agents, 3, 1, r))

    # Assert: within 5 standard deviations of k/n
    assert set(counts) == set(agents)
    assert all(abs(c - 900) < 5 * 25.1 for c in counts.values()), counts


def test_the_agents_not_drawn_are_told_why() -> None:
    assert sit_outs(["c", "a", "b"], ("b",)) == {
        "a": "not drawn this round (1 of 3 agents train)",
        "c": "not drawn this round (1 of 3 agents train)",
    }
    assert sit_outs(["a"], ["a"]) == {}
