"""Unit tests for common.serde: domain <-> proto."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from fedpipe.v1 import fedpipe_pb2 as pb
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import InvalidArgument
from common.serde import (
    evaluation_from_pb,
    evaluation_to_pb,
    plan_from_pb,
    plan_to_pb,
    profile_from_pb,
    profile_to_pb,
    spec_from_pb,
    spec_to_pb,
    task_from_pb,
    task_to_pb,
    update_header_to_pb,
    update_meta_from_pb,
)
from common.transfer import encode_payload
from common.types import (
    Accelerator,
    DeviceProfile,
    Evaluation,
    ModelSpec,
    ModuleShape,
    Quantization,
    Task,
    TaskKind,
    TrainPlan,
    UpdateMeta,
)

BIG = 1 << 30  # a size limit that never bites

PROFILE = DeviceProfile(
    device="cuda:0",
    device_name="NVIDIA H100 80GB HBM3",
    total_memory_bytes=80 * 2**30,
    free_memory_bytes=79 * 2**30 + 12345,
    host_memory_bytes=2**40,
    flops_per_s=3.5e14,
    compute_dtype="bfloat16",
    threads=16,
    num_train_samples=600,
    num_val_samples=150,
    memory_cap_bytes=8 * 2**30,
    compute_share=0.25,
)

SPEC = ModelSpec(
    fingerprint="sha256:abc",
    model_type="bert",
    task="seq-cls",
    labels=("negative", "neutral", "positive"),
    candidates=(
        ModuleShape("bert.encoder.layer.0.attention.self.query", 384, 384),
        ModuleShape("bert.encoder.layer.0.intermediate.dense", 384, 1536),
    ),
    heads=(("classifier.weight", (3, 384)), ("classifier.bias", (3,))),
    base_parameters=22_700_000,
)

PLAN = TrainPlan(
    plan_id="r3-agent-1",
    target_modules=("m.q", "m.v"),
    rank_pattern={"m.q": 8, "m.v": 4},
    lora_alpha=16.0,
    lora_dropout=0.05,
    modules_to_save=("classifier",),
    batch_size=16,
    local_epochs=2,
    max_steps=100,
    learning_rate=1e-3,
    weight_decay=0.01,
    quantization=Quantization.NF4,
    max_seq_len=64,
    deadline_s=120.5,
    seed=2**40 + 3,
)

META = UpdateMeta(
    agent_id="agent-1",
    round=3,
    plan_id="r3-agent-1",
    samples=600,
    steps=38,
    train_seconds=71.25,
    train_loss=0.4375,
    peak_memory_bytes=1_100_000_000,
)


def _raises(exc: type[InvalidArgument], field: str) -> pytest.RaisesExc[InvalidArgument]:
    """pytest.raises for an InvalidArgument subclass whose field is exactly field."""
    return pytest.raises(exc, check=lambda e: e.field == field)


# ---------------------------------------------------------------- DeviceProfile


def test_profile_round_trip() -> None:
    # Execute
    back = profile_from_pb(pb.DeviceProfile.FromString(profile_to_pb(PROFILE).SerializeToString()))

    # Assert
    assert back == PROFILE


def test_a_data_parallel_profile_round_trips_and_needs_its_allreduce_figure() -> None:
    # Prepare
    devices = tuple(Accelerator(f"cuda:{i}", "NVIDIA H200", 140 * 2**30, 7e14 + i) for i in range(3))
    profile = replace(PROFILE, devices=devices, allreduce_bytes_per_s=1.5e11)

    # Execute
    back = profile_from_pb(pb.DeviceProfile.FromString(profile_to_pb(profile).SerializeToString()))
    message = profile_to_pb(profile)
    message.allreduce_bytes_per_s = 0.0

    # Assert
    assert back == profile and back.world == 3 and PROFILE.world == 1
    with _raises(InvalidArgument, "profile.allreduce_bytes_per_s"):
        profile_from_pb(message)


@settings(max_examples=40, deadline=None)
@given(
    flops=st.floats(1e-3, 1e18),
    share=st.floats(1e-6, 1.0),
    memory=st.integers(1, 2**63),
    threads=st.integers(0, 2**32 - 1),
)
def test_profile_round_trip_property(flops: float, share: float, memory: int, threads: int) -> None:
    # Prepare
    profile = replace(PROFILE, flops_per_s=flops, compute_share=share, total_memory_bytes=memory, threads=threads)

    # Execute
    back = profile_from_pb(profile_to_pb(profile))

    # Assert
    assert back == profile


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"flops_per_s": 0.0}, "profile.flops_per_s"),
        ({"flops_per_s": -1.0}, "profile.flops_per_s"),
        ({"flops_per_s": float("nan")}, "profile.flops_per_s"),
        ({"total_memory_bytes": 0}, "profile.total_memory_bytes"),
        ({"compute_share": 0.0}, "profile.compute_share"),
        ({"compute_share": -0.5}, "profile.compute_share"),
        ({"compute_share": 1.0001}, "profile.compute_share"),
        ({"compute_share": float("nan")}, "profile.compute_share"),
    ],
)
def test_impossible_profile_names_the_field(change: dict[str, float], field: str) -> None:
    # Prepare
    message = profile_to_pb(PROFILE)
    for key, value in change.items():
        setattr(message, key, value)

    # Execute / Assert
    with _raises(InvalidArgument, field):
        profile_from_pb(message)


def test_profile_with_compute_share_one_is_valid() -> None:
    # Prepare
    message = profile_to_pb(replace(PROFILE, compute_share=1.0))

    # Execute
    back = profile_from_pb(message)

    # Assert
    assert back.compute_share == 1.0


# ---------------------------------------------------------------- ModelSpec


def test_spec_round_trip() -> None:
    # Execute
    back = spec_from_pb(pb.ModelSpec.FromString(spec_to_pb(SPEC).SerializeToString()))

    # Assert
    assert back == SPEC
    assert isinstance(back.labels, tuple)
    assert isinstance(back.heads[0][1], tuple)


def test_spec_round_trip_without_heads_or_labels() -> None:
    # Prepare
    spec = replace(SPEC, labels=(), heads=())

    # Execute
    back = spec_from_pb(spec_to_pb(spec))

    # Assert
    assert back == spec


@pytest.mark.parametrize(
    ("change", "field"),
    [({"fingerprint": ""}, "model.fingerprint"), ({"candidates": ()}, "model.candidates")],
)
def test_unusable_spec_names_the_field(change: dict[str, object], field: str) -> None:
    # Prepare
    message = spec_to_pb(replace(SPEC, **change))  # type: ignore[arg-type]

    # Execute / Assert
    with _raises(InvalidArgument, field):
        spec_from_pb(message)


# ---------------------------------------------------------------- TrainPlan


@pytest.mark.parametrize("quantization", list(Quantization))
def test_plan_round_trip(quantization: Quantization) -> None:
    # Prepare
    plan = replace(PLAN, quantization=quantization, proximal_mu=0.01)

    # Execute
    back = plan_from_pb(pb.TrainPlan.FromString(plan_to_pb(plan).SerializeToString()))

    # Assert
    assert back == plan
    assert list(back.rank_pattern) == list(plan.target_modules)


@settings(max_examples=40, deadline=None)
@given(
    ranks=st.dictionaries(st.from_regex(r"[a-z]{1,4}(\.[a-z0-9]{1,4}){0,3}", fullmatch=True), st.integers(1, 256)),
    alpha=st.floats(0.0, 1e4),
    seed=st.integers(0, 2**64 - 1),
    deadline=st.floats(0.0, 1e6),
)
def test_plan_round_trip_property(ranks: dict[str, int], alpha: float, seed: int, deadline: float) -> None:
    # Prepare
    plan = replace(
        PLAN,
        target_modules=tuple(ranks),
        rank_pattern=ranks,
        lora_alpha=alpha,
        seed=seed,
        deadline_s=deadline,
    )

    # Execute
    back = plan_from_pb(plan_to_pb(plan))

    # Assert
    assert back == plan


@pytest.mark.parametrize("placement", ["replicas", "layers"])
def test_a_placement_round_trips_and_an_earlier_coordinator_s_plan_replicates(placement: str) -> None:
    # Prepare
    plan = replace(PLAN, placement=placement)
    earlier = plan_to_pb(plan)
    earlier.ClearField("placement")  # what a coordinator from before placements sends

    # Execute / Assert
    assert plan_from_pb(pb.TrainPlan.FromString(plan_to_pb(plan).SerializeToString())) == plan
    assert plan_from_pb(earlier).placement == "replicas"


def test_plan_from_pb_drops_ranks_of_modules_outside_the_mask() -> None:
    # Prepare
    message = plan_to_pb(PLAN)
    message.rank_pattern["other"] = 2

    # Execute
    back = plan_from_pb(message)

    # Assert
    assert dict(back.rank_pattern) == {"m.q": 8, "m.v": 4}


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        ("quantization_unspecified", "plan.quantization"),
        ("quantization_unknown", "plan.quantization"),
        ("rank_missing", "plan.rank_pattern"),
        ("batch_zero", "plan.batch_size"),
        ("mu_negative", "plan.proximal_mu"),
        ("mu_nan", "plan.proximal_mu"),
        ("placement_unknown", "plan.placement"),
    ],
)
def test_unexecutable_plan_names_the_field(mutate: str, field: str) -> None:
    # Prepare
    message = plan_to_pb(PLAN)
    if mutate == "quantization_unspecified":
        message.quantization = pb.QUANTIZATION_UNSPECIFIED
    elif mutate == "quantization_unknown":
        message.quantization = 99  # type: ignore[assignment]  # an enum value from a newer peer
    elif mutate == "rank_missing":
        del message.rank_pattern["m.v"]
    elif mutate == "mu_negative":
        message.proximal_mu = -0.1
    elif mutate == "mu_nan":
        message.proximal_mu = float("nan")
    elif mutate == "placement_unknown":
        message.placement = "pipeline"
    else:
        message.batch_size = 0

    # Execute / Assert
    with _raises(InvalidArgument, field):
        plan_from_pb(message)


# ---------------------------------------------------------------- Task


@pytest.mark.parametrize(
    "task",
    [
        Task(kind=TaskKind.WAIT, retry_after_s=2.5, message="no round open"),
        Task(kind=TaskKind.FINISHED, round=9, global_round=9, message="done"),
        Task(kind=TaskKind.TRAIN, round=4, global_round=3, plan=PLAN),
        Task(
            kind=TaskKind.EVALUATE,
            round=3,
            global_round=3,
            plan=replace(PLAN, quantization=Quantization.INT8),
        ),
    ],
)
def test_task_round_trip(task: Task) -> None:
    # Execute
    message = pb.GetTaskResponse.FromString(task_to_pb(task).SerializeToString())
    back = task_from_pb(message)

    # Assert
    assert back == task
    assert message.HasField("plan") == (task.plan is not None)


def test_wait_task_ignores_a_stray_plan() -> None:
    # Prepare
    message = task_to_pb(Task(kind=TaskKind.WAIT))
    message.plan.CopyFrom(plan_to_pb(PLAN))

    # Execute
    back = task_from_pb(message)

    # Assert
    assert back.plan is None


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (pb.GetTaskResponse(kind=pb.TASK_KIND_UNSPECIFIED), "task.kind"),
        (pb.GetTaskResponse(kind=pb.TASK_KIND_TRAIN), "task.plan"),
        (pb.GetTaskResponse(kind=pb.TASK_KIND_EVALUATE), "task.plan"),
        (
            pb.GetTaskResponse(kind=pb.TASK_KIND_TRAIN, plan=pb.TrainPlan(quantization=pb.QUANTIZATION_UNSPECIFIED)),
            "plan.quantization",
        ),
    ],
)
def test_bad_task_names_the_field(message: pb.GetTaskResponse, field: str) -> None:
    # Execute / Assert
    with _raises(InvalidArgument, field):
        task_from_pb(message)


# ---------------------------------------------------------------- UpdateMeta


def test_update_header_round_trip_keeps_meta_and_payload() -> None:
    # Prepare
    payload_header, _ = encode_payload({"m.q.lora_A": torch.ones(4, 5), "m.q.lora_B": torch.zeros(3, 4)})

    # Execute
    message = pb.UpdateHeader.FromString(update_header_to_pb(META, payload_header).SerializeToString())
    back = update_meta_from_pb(message)

    # Assert
    assert back == META
    assert message.payload == payload_header


def test_update_header_carries_training_importance_scores() -> None:
    # Prepare
    payload_header, _ = encode_payload({"m.q.lora_A": torch.ones(4, 5), "m.q.lora_B": torch.zeros(3, 4)})
    meta = replace(META, importance={"l.0.query": 0.25, "l.0.value": 1e-9})

    # Execute
    back = update_meta_from_pb(
        pb.UpdateHeader.FromString(update_header_to_pb(meta, payload_header).SerializeToString())
    )

    # Assert
    assert back == meta and dict(back.importance) == {"l.0.query": 0.25, "l.0.value": 1e-9}


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (pb.UpdateHeader(agent_id="", payload=pb.PayloadHeader()), "header.agent_id"),
        (pb.UpdateHeader(agent_id="agent-1"), "header.payload"),
        (
            pb.UpdateHeader(agent_id="a", payload=pb.PayloadHeader(), importance={"m": float("nan")}),
            "header.importance",
        ),
        (pb.UpdateHeader(agent_id="a", payload=pb.PayloadHeader(), importance={"m": -1.0}), "header.importance"),
    ],
)
def test_bad_update_header_names_the_field(message: pb.UpdateHeader, field: str) -> None:
    # Execute / Assert
    with _raises(InvalidArgument, field):
        update_meta_from_pb(message)


def test_update_header_with_an_empty_payload_header_is_accepted() -> None:
    # Prepare: an empty but present payload header (an upload with no tensors) is a valid header
    message = pb.UpdateHeader(agent_id="a", payload=pb.PayloadHeader())

    # Execute
    meta = update_meta_from_pb(message)

    # Assert
    assert meta.agent_id == "a"
    assert meta.samples == 0


# ---------------------------------------------------------------- Evaluation


def test_evaluation_from_pb() -> None:
    # Prepare
    message = pb.ReportEvaluationRequest(agent_id="a", global_round=2, loss=0.5, accuracy=0.875, samples=150)

    # Execute
    evaluation = evaluation_from_pb(message)

    # Assert
    assert evaluation == Evaluation(loss=0.5, accuracy=0.875, samples=150)


def test_evaluation_with_a_confusion_matrix_round_trips() -> None:
    # Prepare
    evaluation = Evaluation(
        loss=0.5, accuracy=0.6, samples=10, confusion=((3.0, 1.0, 0.0), (1.0, 2.0, 1.0), (0.0, 1.0, 1.0))
    )

    # Execute
    message = evaluation_to_pb("a", 2, evaluation)
    back = evaluation_from_pb(pb.ReportEvaluationRequest.FromString(message.SerializeToString()))

    # Assert
    assert back == evaluation
    assert (message.agent_id, message.global_round) == ("a", 2)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([1.0, 2.0, 3.0], "classes x classes"),
        ([1.0, -1.0, 0.0, 2.0], "non-negative"),
        ([1.0, float("inf"), 0.0, 2.0], "finite"),
    ],
)
def test_a_malformed_confusion_matrix_is_refused(values: list[float], message: str) -> None:
    request = pb.ReportEvaluationRequest(agent_id="a", loss=0.5, accuracy=0.5, samples=4, confusion=values)
    with pytest.raises(InvalidArgument, match=message) as caught:
        evaluation_from_pb(request)
    assert caught.value.field == "confusion"


@pytest.mark.parametrize(
    ("loss", "accuracy", "field"),
    [
        (0.5, 1.5, "accuracy"),
        (0.5, -0.1, "accuracy"),
        (0.5, float("nan"), "accuracy"),
        (-0.1, 0.5, "loss"),
        (float("nan"), 0.5, "loss"),
    ],
)
def test_impossible_evaluation_names_the_field(loss: float, accuracy: float, field: str) -> None:
    # Prepare
    message = pb.ReportEvaluationRequest(agent_id="a", loss=loss, accuracy=accuracy, samples=1)

    # Execute / Assert
    with _raises(InvalidArgument, field):
        evaluation_from_pb(message)


@pytest.mark.parametrize(("loss", "accuracy"), [(0.0, 0.0), (0.0, 1.0), (12.5, 0.5)])
def test_evaluation_bounds_are_inclusive(loss: float, accuracy: float) -> None:
    # Execute
    evaluation = evaluation_from_pb(pb.ReportEvaluationRequest(loss=loss, accuracy=accuracy))

    # Assert
    assert (evaluation.loss, evaluation.accuracy) == (loss, accuracy)
