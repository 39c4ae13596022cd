"""The MILP assignment equals brute-force enumeration (property-based)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.solver import Infeasible, Instance, Option, brute_force, solve

option = st.builds(Option, cost=st.floats(-100, 100, allow_nan=False), upload_bytes=st.integers(0, 1000))
instances = st.builds(
    Instance,
    options=st.lists(st.lists(option, min_size=1, max_size=5), min_size=1, max_size=4),
    max_upload_bytes=st.one_of(st.just(0), st.integers(100, 3000)),
)


@settings(max_examples=150, deadline=None)
@given(instance=instances)
def test_milp_equals_brute_force(instance: Instance) -> None:
    try:
        expected_choice, expected = brute_force(instance)
    except Infeasible:
        with pytest.raises(Infeasible):
            solve(instance)
        return
    chosen, value = solve(instance)
    assert value == pytest.approx(expected, abs=1e-6)
    assert len(chosen) == len(expected_choice)
    if instance.max_upload_bytes:
        assert sum(instance.options[a][c].upload_bytes for a, c in enumerate(chosen)) <= instance.max_upload_bytes


def test_coupling_constraint_moves_an_agent_off_its_own_best() -> None:
    # alone, each agent takes option 0 (cheaper); together they exceed the upload bound, so one must yield
    instance = Instance([[Option(0.0, 600), Option(1.0, 100)], [Option(0.0, 600), Option(5.0, 100)]], 800)
    chosen, value = solve(instance)
    assert chosen == [1, 0] and value == 1.0


def test_an_agent_without_options_is_infeasible() -> None:
    with pytest.raises(Infeasible):
        solve(Instance([[Option(0.0, 1)], []]))
