"""The uniform planner and target resolution."""

from __future__ import annotations

from dataclasses import replace

import pytest

from common.errors import ConfigError
from common.types import DeviceProfile, ModelSpec, ModuleShape, Quantization
from coordinator.planner import PlanOptions, resolve_targets, uniform_plan

SPEC = ModelSpec(
    fingerprint="f",
    model_type="bert",
    task="seq-cls",
    labels=("neg", "pos"),
    candidates=tuple(
        ModuleShape(f"bert.encoder.layer.{i}.attention.{kind}", 8, 8)
        for i in range(2)
        for kind in ("self.query", "self.key", "self.value", "output.dense")
    ),
    heads=(("classifier.weight", (2, 8)), ("classifier.bias", (2,))),
    base_parameters=1000,
)
PROFILE = DeviceProfile("cpu", "cpu", 2**30, 2**30, 2**30, 1e9, "float32", 1, 100, 10)
OPTIONS = PlanOptions(("query", "value"), 4, 8.0, 0.0, 16, 1, 0, 1e-3, 0.0, 64, Quantization.NF4, 60.0, 5)


def test_resolve_targets_by_suffix_in_model_order() -> None:
    assert resolve_targets(SPEC, ("value", "query")) == (
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.0.attention.self.value",
        "bert.encoder.layer.1.attention.self.query",
        "bert.encoder.layer.1.attention.self.value",
    )
    assert len(resolve_targets(SPEC, ("all",))) == 8


def test_unknown_target_is_named_with_the_known_ends() -> None:
    with pytest.raises(ConfigError, match=r"\['q_proj'\] match no candidate of bert"):
        resolve_targets(SPEC, ("query", "q_proj"))


def test_uniform_plan_is_the_same_for_everyone_but_the_seed() -> None:
    plans = uniform_plan({"b": PROFILE, "a": PROFILE}, SPEC, OPTIONS, round_=3).plans
    a, b = plans["a"], plans["b"]
    assert a.target_modules == b.target_modules and dict(a.rank_pattern) == dict(b.rank_pattern)
    assert set(a.rank_pattern.values()) == {4}
    assert a.modules_to_save == ("classifier",) and a.quantization is Quantization.NF4
    assert a.seed != b.seed and a.plan_id != b.plan_id and a.plan_id.startswith("r3-a-")
    assert uniform_plan({"a": PROFILE}, SPEC, OPTIONS, round_=3).plans["a"] == a  # pure: same inputs, same plan


def test_uniform_plan_takes_a_fixed_rank_per_agent_when_given() -> None:
    # Prepare
    options = replace(OPTIONS, agent_ranks={"a": 2, "c": 16})

    # Execute
    planned = uniform_plan({"a": PROFILE, "b": PROFILE, "c": PROFILE}, SPEC, options, round_=1)

    # Assert: a and c at their ranks, b at the run's, each priced at its own rank
    ranks = {agent: set(plan.rank_pattern.values()) for agent, plan in planned.plans.items()}
    assert ranks == {"a": {2}, "b": {4}, "c": {16}}
    memory = {agent: p.peak_memory_bytes for agent, p in planned.predictions.items()}
    assert memory["a"] < memory["b"] < memory["c"]
