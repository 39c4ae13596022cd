"""Unit tests for coordinator.population: seeded profiles and data of a simulated fleet."""

from __future__ import annotations

import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from common.data import Example
from coordinator.population import GIB, SimulationSection, VirtualAgent, agent_ids, draw_population

POOL = [Example(text=f"text {i}", label=i % 3) for i in range(3000)]  # three balanced classes


def section(**changes: object) -> SimulationSection:
    return SimulationSection.model_validate({"agents": 20, **changes})


def test_the_same_spec_draws_the_same_population_and_another_seed_another() -> None:
    # Execute
    first, again, other = (draw_population(section(seed=s), POOL, 3) for s in (1, 1, 2))

    # Assert
    assert first == again
    assert [a.profile for a in first] != [a.profile for a in other]


@settings(max_examples=30, deadline=None)
@given(
    count=st.integers(1, 40),
    memory=st.tuples(st.floats(0.5, 8), st.floats(1, 4)),
    flops=st.tuples(st.floats(1, 20), st.floats(1, 10)),
    samples=st.tuples(st.integers(2, 50), st.integers(0, 100)),
    seed=st.integers(0, 1000),
)
def test_profiles_and_data_sizes_stay_within_the_spec(
    count: int,
    memory: tuple[float, float],
    flops: tuple[float, float],
    samples: tuple[int, int],
    seed: int,
) -> None:
    # Prepare: ranges as (low, width factor)
    spec = section(
        agents=count,
        seed=seed,
        memory_gib=(memory[0], memory[0] * memory[1]),
        gflops=(flops[0], flops[0] * flops[1]),
        samples=(samples[0], samples[0] + samples[1]),
    )

    # Execute
    agents = draw_population(spec, POOL, 3)

    # Assert
    assert [a.agent_id for a in agents] == agent_ids(count)
    for agent in agents:
        profile = agent.profile
        assert spec.memory_gib[0] * GIB - 1 <= profile.total_memory_bytes <= spec.memory_gib[1] * GIB
        assert spec.gflops[0] * 1e9 * (1 - 1e-9) <= profile.flops_per_s <= spec.gflops[1] * 1e9 * (1 + 1e-9)
        assert spec.samples[0] <= len(agent.train) + len(agent.val) <= spec.samples[1]
        assert len(agent.train) >= 1
        assert (profile.num_train_samples, profile.num_val_samples) == (len(agent.train), len(agent.val))
        assert len({e.text for e in agent.train + agent.val}) == len(agent.train) + len(agent.val)  # no repeats


def test_label_skew_concentrates_each_agents_classes() -> None:
    def top_share(agents: list[VirtualAgent]) -> float:
        shares = []
        for agent in agents:
            labels = [e.label for e in agent.train + agent.val]
            shares.append(max(labels.count(c) for c in range(3)) / len(labels))
        return statistics.mean(shares)

    # Execute
    iid = draw_population(section(agents=50, samples=(90, 90)), POOL, 3)
    skewed = draw_population(section(agents=50, samples=(90, 90), label_skew=0.1), POOL, 3)

    # Assert: IID agents hold about a third of each class; Dirichlet(0.1) ones mostly one class
    assert top_share(iid) < 0.45
    assert top_share(skewed) > 0.8


def test_validation_share_and_at_least_one_training_example() -> None:
    # Execute
    agents = draw_population(section(samples=(2, 2), val_fraction=0.9), POOL, 3)
    tenth = draw_population(section(samples=(100, 100), val_fraction=0.1), POOL, 3)

    # Assert
    assert all((len(a.train), len(a.val)) == (1, 1) for a in agents)
    assert all((len(a.train), len(a.val)) == (90, 10) for a in tenth)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"memory_gib": (8.0, 2.0)}, "simulation.memory_gib"),
        ({"gflops": (0.0, 2.0)}, "simulation.gflops"),
        ({"samples": (1, 5)}, "simulation.samples"),
        ({"agents": 0}, "agents"),
        ({"work": "sleep"}, "work"),
    ],
)
def test_an_impossible_spec_names_its_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
        section(**changes)


def test_agent_ids_are_zero_padded_to_the_fleet_size() -> None:
    assert agent_ids(3) == ["sim-0001", "sim-0002", "sim-0003"]
    assert agent_ids(12345)[-1] == "sim-12345" and agent_ids(12345)[0] == "sim-00001"


def test_an_empty_pool_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        draw_population(section(), [], 3)
