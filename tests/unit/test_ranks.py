"""Per-matrix rank allocation (coordinator.ranks): exact against brute force, and in the fedpipe planner."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_costmodel_planner import OPTIONS, SPEC, profile

from common.errors import ConfigError
from common.types import Quantization
from coordinator import costmodel
from coordinator.planner import fedpipe_plan
from coordinator.ranks import allocate, brute_force, objective


@settings(max_examples=80, deadline=None)
@given(
    widths=st.lists(st.integers(8, 120), min_size=1, max_size=4),
    scores=st.lists(st.floats(0.0, 10.0, allow_nan=False), min_size=4, max_size=4),
    ranks=st.sets(st.sampled_from([1, 2, 4, 8, 16]), min_size=1, max_size=4),
    budget=st.integers(0, 3000),
)
def test_allocation_is_the_brute_force_optimum_within_the_budget(
    widths: list[int], scores: list[float], ranks: set[int], budget: int
) -> None:
    # Prepare
    modules = [f"m{i}" for i in range(len(widths))]
    width = dict(zip(modules, widths, strict=True))
    score = dict(zip(modules, scores, strict=False))
    if min(ranks) * min(widths) > budget:
        with pytest.raises(ConfigError, match="holds no matrix"):
            allocate(modules, width, score, sorted(ranks), budget)
        return

    # Execute
    chosen = allocate(modules, width, score, sorted(ranks), budget)
    _, best_value = brute_force(modules, width, score, sorted(ranks), budget)

    # Assert: as good as the best assignment, within the budget, ranks from the set
    assert objective(chosen, modules, score) == pytest.approx(best_value, abs=1e-9)
    assert sum(r * width[m] for m, r in chosen.items()) <= budget
    assert set(chosen.values()) <= ranks and chosen


@settings(max_examples=40, deadline=None)
@given(
    scores=st.lists(st.floats(0.01, 10.0, allow_nan=False), min_size=2, max_size=5, unique=True),
    budget=st.integers(64, 2000),
)
@example(scores=[9.999999999999998, 10.0], budget=64)  # a tie within the solver's tolerance
def test_a_more_important_matrix_never_gets_less_rank(scores: list[float], budget: int) -> None:
    # Prepare: equal widths, so only importance tells the matrices apart
    modules = [f"m{i}" for i in range(len(scores))]
    chosen = allocate(modules, dict.fromkeys(modules, 32), dict(zip(modules, scores, strict=True)), [2, 4, 8], budget)

    # Assert
    order = sorted(modules, key=lambda m: -scores[modules.index(m)])
    given_ranks = [chosen.get(m, 0) for m in order]
    assert given_ranks == sorted(given_ranks, reverse=True)


def test_equal_importance_and_a_uniform_budget_give_the_uniform_ranks() -> None:
    modules = [f"m{i}" for i in range(6)]
    chosen = allocate(modules, dict.fromkeys(modules, 768), {}, [2, 4, 8, 16], 8 * 768 * 6)
    assert chosen == dict.fromkeys(modules, 8)


def test_a_budget_too_small_for_half_the_matrices_keeps_the_important_ones() -> None:
    # Prepare: room for 2 matrices at rank 4 among 4
    modules = ["a", "b", "c", "d"]
    scores = {"a": 0.1, "b": 5.0, "c": 0.2, "d": 3.0}

    # Execute
    chosen = allocate(modules, dict.fromkeys(modules, 100), scores, [4], 800)

    # Assert
    assert chosen == {"b": 4, "d": 4}


def test_per_matrix_plans_spread_the_same_budget_by_importance() -> None:
    # Prepare: importance falls with depth; the same agents planned at one rank and per matrix; a bound on
    # the round's upload (two agents at about rank 4 on all 24 matrices) keeps the small one's rank down
    modules = [m.name for m in SPEC.candidates]
    scores = {m: 1.0 / (1 + i) for i, m in enumerate(modules)}
    search = replace(OPTIONS.search, max_round_upload_bytes=(24 * 16 * 768 + 770) * 4 + (24 * 4 * 768 + 770) * 4)
    uniform_options = replace(OPTIONS, scores=scores, search=search)
    per_matrix = replace(uniform_options, search=replace(search, rank_allocation="per-matrix"))
    profiles = {"big": profile(8.0), "small": profile(0.8)}

    # Execute
    one_rank = fedpipe_plan(profiles, SPEC, uniform_options, 1)
    spread = fedpipe_plan(profiles, SPEC, per_matrix, 1)

    # Assert: no more parameters (so no more memory or step time) than the single-rank plan, more rank on
    # the important matrices than on the unimportant ones, every prediction within the agent's memory
    for agent in profiles:
        before, after = one_rank.plans[agent], spread.plans[agent]
        assert sum(r * 768 for r in after.rank_pattern.values()) <= sum(r * 768 for r in before.rank_pattern.values())
        assert set(after.rank_pattern.values()) <= set(OPTIONS.search.ranks)
        assert after.rank_pattern[modules[0]] >= max(after.rank_pattern.get(m, 0) for m in modules[-6:])
        prediction = spread.predictions[agent]
        assert prediction.peak_memory_bytes <= prediction.usable_memory_bytes
        assert prediction.peak_memory_bytes <= one_rank.predictions[agent].peak_memory_bytes + 1
        top = max(after.rank_pattern.values())
        assert after.lora_alpha == pytest.approx(OPTIONS.alpha * top / OPTIONS.rank)
        scales = [after.alpha_of(m) / r for m, r in after.rank_pattern.items()]
        assert scales == pytest.approx([OPTIONS.alpha / OPTIONS.rank] * len(scales))
    # the agent the upload bound held to rank 4 spreads that budget: more on the top matrices, none on the last
    low = min(profiles, key=lambda a: sum(one_rank.plans[a].rank_pattern.values()))
    assert set(one_rank.plans[low].rank_pattern.values()) == {4}
    after = spread.plans[low]
    assert after.rank_pattern[modules[0]] == 16 and modules[-1] not in after.target_modules
    assert set(after.target_modules) == set(after.rank_pattern)


def test_the_cost_model_prices_a_rank_pattern_by_its_parameters() -> None:
    # Prepare
    measured = profile(4.0)
    fit = costmodel.fit(measured, SPEC)
    modules = tuple(m.name for m in SPEC.candidates[:2])
    uniform = costmodel.Config(8, 8, Quantization.NONE, modules)
    pattern = replace(uniform, rank_pattern=((modules[0], 12), (modules[1], 4)))

    # Execute / Assert: 16 rank slots over two 384 x 384 matrices either way
    a = costmodel.predict(measured, SPEC, fit, uniform, 64, 1e9)
    b = costmodel.predict(measured, SPEC, fit, pattern, 64, 1e9)
    assert (a.peak_memory_bytes, a.step_seconds, a.payload_bytes) == pytest.approx(
        (b.peak_memory_bytes, b.step_seconds, b.payload_bytes)
    )


def test_per_matrix_allocation_in_the_ferret_mode_is_refused() -> None:
    from pydantic import ValidationError

    from coordinator.config import CoordinatorConfig

    with pytest.raises(ValidationError, match="rank_allocation per-matrix"):
        CoordinatorConfig(planning={"rank_allocation": "per-matrix"}, training={"mode": "ferret"}, insecure=True)
    CoordinatorConfig(planning={"rank_allocation": "per-matrix"}, planner="uniform", insecure=True)
    with pytest.raises(ValidationError, match=r"1\.\.1024"):
        CoordinatorConfig(planning={"matrix_ranks": [0, 8]}, insecure=True)


def test_the_uniform_planner_spreads_its_rank_per_matrix_at_the_matrix_ranks() -> None:
    # Prepare: rank 8 on all 24 matrices as the budget; the allocator may use 2..32; importance falls with depth
    from coordinator.planner import uniform_plan

    modules = [m.name for m in SPEC.candidates]
    scores = {m: 1.0 / (1 + i) ** 2 for i, m in enumerate(modules)}
    search = replace(OPTIONS.search, rank_allocation="per-matrix", matrix_ranks=(2, 4, 8, 16, 32))
    options = replace(OPTIONS, scores=scores, search=search)

    # Execute
    plan = uniform_plan({"a": profile(8.0)}, SPEC, options, 1).plans["a"]

    # Assert: within the budget, unequal, the first matrix at the top rank, the plan's modules those given a rank
    assert sum(plan.rank_pattern.values()) * 768 <= 8 * 24 * 768
    assert plan.rank_pattern[modules[0]] == 32 and len(set(plan.rank_pattern.values())) > 1
    assert plan.target_modules == tuple(m for m in modules if m in plan.rank_pattern)
