"""Bounds on what an agent may claim, and weights capped at a multiple of the median."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import InvalidArgument
from common.types import (
    Accelerator,
    CalibrationPoint,
    DeviceProfile,
    Evaluation,
    ImportanceReport,
    ModelSpec,
    ModuleShape,
    ProbePlan,
    Quantization,
    TrainPlan,
    UpdateMeta,
)
from coordinator.bounds import (
    allowed_samples,
    capped,
    check_agent_id,
    check_evaluation,
    check_importance,
    check_meta,
    check_profile,
    check_wait,
    counted_profiles,
    median,
    relative_bound,
    tensor_bounds,
)
from coordinator.config import LimitsSection

SPEC = ModelSpec(
    fingerprint="f",
    model_type="bert",
    task="seq-cls",
    labels=("n", "p"),
    candidates=(ModuleShape("l.0.query", 384, 384),),
    heads=(("classifier.weight", (2, 384)),),
    base_parameters=22_000_000,
    linear_parameters=21_000_000,
)
POINT = CalibrationPoint(16, 64, 8, Quantization.NONE, 0.6, 900 * 2**20, 150_000)
PROFILE = DeviceProfile(
    device="cpu",
    device_name="Intel Xeon",
    total_memory_bytes=16 * 2**30,
    free_memory_bytes=12 * 2**30,
    host_memory_bytes=16 * 2**30,
    flops_per_s=5e10,
    compute_dtype="float32",
    threads=2,
    num_train_samples=600,
    num_val_samples=60,
    calibration=(POINT, replace(POINT, batch_size=32, step_seconds=1.1)),
)
LIMITS = LimitsSection()
PLAN = TrainPlan(
    plan_id="p",
    target_modules=("l.0.query",),
    rank_pattern={"l.0.query": 8},
    lora_alpha=16.0,
    lora_dropout=0.0,
    modules_to_save=("classifier",),
    batch_size=16,
    local_epochs=1,
    max_steps=0,
    learning_rate=1e-3,
    weight_decay=0.0,
    quantization=Quantization.NONE,
    max_seq_len=64,
    deadline_s=600.0,
    seed=0,
)
GPU = Accelerator("cuda:1", "NVIDIA H200", PROFILE.total_memory_bytes, PROFILE.flops_per_s)
META = UpdateMeta("a", 1, "p", 600, 38, 20.0, 0.4, 2**30)


def test_an_honest_profile_passes() -> None:
    check_profile(PROFILE, SPEC, LIMITS)
    check_profile(replace(PROFILE, devices=(GPU, GPU), allreduce_bytes_per_s=2e10), SPEC, LIMITS)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"flops_per_s": 5e-324}, "profile.flops_per_s"),  # divided by zero in the cost model once
        ({"flops_per_s": math.inf}, "profile.flops_per_s"),
        ({"flops_per_s": math.nan}, "profile.flops_per_s"),
        ({"flops_per_s": 1e18}, "profile.flops_per_s"),
        ({"total_memory_bytes": 2**64 - 1}, "profile.total_memory_bytes"),
        ({"total_memory_bytes": 0}, "profile.total_memory_bytes"),
        ({"host_memory_bytes": 2**64 - 1}, "profile.host_memory_bytes"),
        ({"num_train_samples": 10**9}, "profile.num_train_samples"),
        ({"num_train_samples": 0}, "profile.num_train_samples"),
        ({"num_val_samples": 2**64 - 1}, "profile.num_val_samples"),
        ({"device": ""}, "profile.device"),
        ({"device_name": "x" * 4_000_000}, "profile.device_name"),
        ({"device_name": "GPU\n12:00:00 coordinator INFO forged"}, "profile.device_name"),
        ({"compute_dtype": "int4"}, "profile.compute_dtype"),
        ({"threads": 0}, "profile.threads"),
        ({"compute_share": 0.0}, "profile.compute_share"),
        ({"calibration": (POINT,) * 50_000}, "profile.calibration"),
        ({"calibration": (replace(POINT, step_seconds=1e-300),)}, "profile.calibration[0].step_seconds"),
        ({"calibration": (replace(POINT, step_seconds=math.inf),)}, "profile.calibration[0].step_seconds"),
        ({"calibration": (replace(POINT, seq_len=0),)}, "profile.calibration[0].seq_len"),
        ({"calibration": (replace(POINT, batch_size=0),)}, "profile.calibration[0].batch_size"),
        ({"calibration": (replace(POINT, peak_memory_bytes=2**64 - 1),)}, "profile.calibration[0].peak_memory_bytes"),
        ({"devices": (GPU,) * 65, "allreduce_bytes_per_s": 1e9}, "profile.devices"),
        ({"devices": (GPU, replace(GPU, device="")), "allreduce_bytes_per_s": 1e9}, "profile.devices[1].device"),
        ({"devices": (GPU, replace(GPU, flops_per_s=math.nan)), "allreduce_bytes_per_s": 1e9},
         "profile.devices[1].flops_per_s"),
        ({"devices": (GPU, replace(GPU, total_memory_bytes=2**64 - 1)), "allreduce_bytes_per_s": 1e9},
         "profile.devices[1].total_memory_bytes"),
        ({"devices": (GPU, GPU), "allreduce_bytes_per_s": 0.0}, "profile.allreduce_bytes_per_s"),
        ({"devices": (GPU, GPU), "allreduce_bytes_per_s": math.inf}, "profile.allreduce_bytes_per_s"),
    ],
)  # fmt: skip
def test_a_profile_outside_the_limits_is_refused_naming_the_field(changes: dict[str, Any], field: str) -> None:
    # Execute
    with pytest.raises(InvalidArgument) as caught:
        check_profile(replace(PROFILE, **changes), SPEC, LIMITS)

    # Assert
    assert caught.value.field == field


def test_a_calibration_step_faster_than_its_flops_at_the_ceiling_allows_is_refused() -> None:
    # Prepare: 16 x 64 tokens through 21M frozen weights at 4 FLOPs each is ~8.6e10 FLOPs: 0.86 us at 1e17
    limits = LimitsSection(max_flops_per_s=1e12)  # ... and 86 ms at 1e12
    fast = replace(PROFILE, calibration=(replace(POINT, step_seconds=0.05),))

    # Execute / Assert
    with pytest.raises(InvalidArgument, match=r"within \[0\.086"):
        check_profile(fast, SPEC, limits)
    check_profile(replace(PROFILE, calibration=(replace(POINT, step_seconds=0.09),)), SPEC, limits)


@pytest.mark.parametrize("wait_s", [math.nan, math.inf, -1.0, 61.0])
def test_a_poll_wait_must_be_finite_and_bounded(wait_s: float) -> None:
    with pytest.raises(InvalidArgument, match="wait_s"):
        check_wait(wait_s)


def test_a_poll_wait_within_bounds_passes() -> None:
    assert check_wait(0.0) == 0.0 and check_wait(30.0) == 30.0


@pytest.mark.parametrize("agent_id", ["", "a\nb", "-lead", "x" * 64, "site a", "agent\x1b[31m"])
def test_agent_ids_of_the_wrong_form_are_refused(agent_id: str) -> None:
    with pytest.raises(InvalidArgument, match="agent_id"):
        check_agent_id(agent_id)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"samples": 0}, "samples"),
        ({"samples": 609}, "samples"),
        ({"steps": 39}, "steps"),
        ({"train_loss": math.inf}, "train_loss"),
        ({"train_loss": -1.0}, "train_loss"),
        ({"train_seconds": math.inf}, "train_seconds"),
        ({"peak_memory_bytes": 2**64 - 1}, "peak_memory_bytes"),
    ],
)
def test_an_upload_header_outside_its_plan_is_refused(changes: dict[str, Any], field: str) -> None:
    # Prepare: the plan allows 38 steps of 16 on 600 counted samples: 608 samples
    allowed = allowed_samples(PLAN, PROFILE)

    # Execute
    with pytest.raises(InvalidArgument) as caught:
        check_meta(replace(META, **changes), PLAN, allowed, LIMITS)

    # Assert
    assert allowed == 38 * 16
    assert caught.value.field == field
    check_meta(META, PLAN, allowed, LIMITS)  # the honest header passes


@pytest.mark.parametrize(
    ("importance", "field"),
    [({"l.1.value": 0.5}, "importance"), ({"l.0.query": math.inf}, "importance[l.0.query]")],
)
def test_importance_scores_only_for_the_plans_matrices_and_finite(importance: dict[str, float], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_meta(replace(META, importance=importance), PLAN, 38 * 16, LIMITS)
    assert caught.value.field == field
    check_meta(replace(META, importance={"l.0.query": 0.5}), PLAN, 38 * 16, LIMITS)


@pytest.mark.parametrize(
    ("evaluation", "field"),
    [
        (Evaluation(loss=math.inf, accuracy=0.5, samples=10), "loss"),
        (Evaluation(loss=0.3, accuracy=1.5, samples=10), "accuracy"),
        (Evaluation(loss=0.3, accuracy=1.0, samples=2**64 - 1), "samples"),
    ],
)
def test_an_evaluation_report_outside_range_is_refused(evaluation: Evaluation, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_evaluation(evaluation, 60, 2)
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("confusion", "classes", "message"),
    [
        (((3.0, 1.0, 0.0), (1.0, 5.0, 0.0), (0.0, 0.0, 0.0)), 2, "must be 2 x 2"),
        (((3.0, 1.0), (1.0, 5.0)), 0, "must be empty"),
        (((3.5, 0.5), (1.0, 5.0)), 2, "whole, non-negative"),
        (((-1.0, 5.0), (1.0, 5.0)), 2, "whole, non-negative"),
        (((3.0, 1.0), (1.0, 6.0)), 2, "add up to 11"),
        (((4.0, 0.0), (0.0, 6.0)), 2, "gives accuracy 1.000000"),
    ],
)
def test_an_evaluation_report_with_an_inconsistent_confusion_matrix_is_refused(
    confusion: tuple[tuple[float, ...], ...], classes: int, message: str
) -> None:
    # Prepare: 10 samples, 8 right
    evaluation = Evaluation(loss=0.3, accuracy=0.8, samples=10, confusion=confusion)

    # Execute
    with pytest.raises(InvalidArgument, match=message) as caught:
        check_evaluation(evaluation, 60, classes)

    # Assert
    assert caught.value.field == "confusion"
    check_evaluation(replace(evaluation, confusion=((3.0, 1.0), (1.0, 5.0))), 60, 2)  # the consistent one passes
    check_evaluation(replace(evaluation, confusion=()), 60, 2)  # a matrix is optional


PROBE = ProbePlan("p0", ("l.0.query", "l.0.value"), 4, 20, 16, 1e-3, 64, Quantization.NONE, 0, 300.0)


@pytest.mark.parametrize(
    ("report", "field"),
    [
        (ImportanceReport("p0", {"l.0.query": 1e300, "l.0.value": 1.0}, 320, 20, 5.0), "scores[l.0.query]"),
        (ImportanceReport("p0", {"l.0.query": 1.0, "l.0.value": 1.0}, 2**64 - 1, 20, 5.0), "samples"),
        (ImportanceReport("p0", {"l.0.query": 1.0, "l.0.value": 1.0}, 320, 21, 5.0), "steps"),
        (ImportanceReport("p0", {"l.0.query": 1.0}, 320, 20, 5.0), "scores"),
    ],
)
def test_an_importance_report_outside_its_probe_is_refused(report: ImportanceReport, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_importance(report, PROBE)
    assert caught.value.field == field


# ---------------------------------------------------------------- medians and caps


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=1e9), min_size=1, max_size=20))
def test_the_median_has_half_the_values_on_each_side(values: list[float]) -> None:
    # Execute
    m = median(values)

    # Assert
    assert min(values) <= m <= max(values)
    assert sum(v < m for v in values) <= len(values) // 2
    assert sum(v > m for v in values) <= len(values) // 2


def test_the_median_of_an_even_count_is_the_mean_of_the_middle_two() -> None:
    assert median([4.0, 1.0, 3.0, 10.0]) == 3.5 and median([7.0]) == 7.0


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(st.text(min_size=1, max_size=4), st.floats(min_value=0, max_value=1e12), min_size=1, max_size=12),
    st.floats(min_value=1.0, max_value=10.0),
)
def test_no_capped_weight_exceeds_ratio_times_the_median_and_small_ones_stay(
    weights: dict[str, float], ratio: float
) -> None:
    # Execute
    out = capped(weights, ratio)
    bound = ratio * median(list(weights.values()))

    # Assert
    assert set(out) == set(weights)
    for key, value in weights.items():
        assert out[key] <= bound * (1 + 1e-12)
        assert out[key] == (value if value <= bound else bound)


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=2, max_value=30), st.floats(min_value=1.0, max_value=8.0), st.floats(1e3, 1e30))
def test_one_huge_claim_among_equal_honest_agents_holds_at_most_its_capped_share(
    honest: int, ratio: float, claim: float
) -> None:
    # Prepare
    weights = {f"h{i}": 300.0 for i in range(honest)} | {"attacker": claim}

    # Execute
    out = capped(weights, ratio)

    # Assert: the median is an honest figure, so the share is at most ratio / (ratio + honest)
    share = out["attacker"] / sum(out.values())
    assert share <= ratio / (ratio + honest) + 1e-12


def test_ratio_zero_leaves_weights_as_claimed() -> None:
    assert capped({"a": 1.0, "b": 1e12}, 0.0) == {"a": 1.0, "b": 1e12}


def test_the_planner_counts_an_inflated_data_size_at_ratio_times_the_median() -> None:
    # Prepare
    profiles = {"a": PROFILE, "b": PROFILE, "c": replace(PROFILE, num_train_samples=10**7, num_val_samples=10**7)}

    # Execute
    counted = counted_profiles(profiles, 3.0)

    # Assert
    assert counted["c"].num_train_samples == 1800 and counted["c"].num_val_samples == 180
    assert counted["a"] == PROFILE


def test_the_relative_norm_bound_needs_three_updates_and_a_multiple() -> None:
    assert relative_bound({"a": 1.0, "b": 100.0}, 10.0) is None
    assert relative_bound({"a": 1.0, "b": 2.0, "c": 1e9}, 0.0) is None
    assert relative_bound({"a": 1.0, "b": 2.0, "c": 1e9}, 10.0) == 20.0


def test_tensor_bounds_are_per_tensor_medians_of_the_updates_that_carry_them() -> None:
    # Prepare: the bias of one update moved by all of its budget
    norms = {
        "a": {"bias": 0.01, "lora": 1.0},
        "b": {"bias": 0.02, "lora": 1.2},
        "c": {"bias": 0.015, "lora": 0.9},
        "m": {"bias": 9.0, "lora": 0.0},
        "d": {"lora": 1.1},
    }

    # Execute
    bounds = tensor_bounds(norms, 10.0)

    # Assert: the median of 4 bias norms is 0.0175, of 5 LoRA norms 1.0
    assert bounds == {"bias": pytest.approx(0.175), "lora": pytest.approx(10.0)}
    assert tensor_bounds(norms, 0.0) == {} and "bias" not in tensor_bounds(norms, 10.0, min_updates=5)


def test_a_tensor_may_always_move_by_its_share_of_the_whole_bound() -> None:
    # Prepare: the bias (2 values) of 3 balanced agents barely moves, a label-skewed honest agent moves it 20x;
    # the adapter (9998 values) moves about 1 everywhere
    norms = {
        "a": {"bias": 0.0005, "lora": 1.0},
        "b": {"bias": 0.0004, "lora": 1.1},
        "c": {"bias": 0.0006, "lora": 0.9},
        "skewed": {"bias": 0.011, "lora": 1.0},
    }
    sizes = {"bias": 2, "lora": 9998}

    # Execute
    bounds = tensor_bounds(norms, 10.0, sizes=sizes, total_bound=10.0)

    # Assert: the bias bound is the floor 10 x sqrt(2 / 10000) = 0.141, over 10 x its median 0.0055, so the
    # skewed agent passes, while the whole budget (10) put on the bias would still be 70x over
    assert bounds["bias"] == pytest.approx(10.0 * (2 / 10000) ** 0.5)
    assert norms["skewed"]["bias"] < bounds["bias"] < 10.0 / 70
    assert bounds["lora"] == pytest.approx(10.0)  # 10 x the median 1.0 is above its floor 9.999
