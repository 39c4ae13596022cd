"""Unit tests for common.serde: tensor bytes, chunked payloads with integrity checks, domain <-> proto."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
from fedpipe.v1 import fedpipe_pb2 as pb
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import IntegrityError, InvalidArgument, ResourceExhausted
from common.serde import (
    DEFAULT_CHUNK_BYTES,
    chunked,
    decode_payload,
    dtype_name,
    encode_payload,
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
    tensor_bytes,
    tensor_from_bytes,
    tensor_infos,
    update_header_to_pb,
    update_meta_from_pb,
)
from common.types import (
    DeviceProfile,
    Evaluation,
    ModelSpec,
    ModuleShape,
    Quantization,
    Task,
    TaskKind,
    TensorInfo,
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


# ---------------------------------------------------------------- tensors <-> bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tensor_bytes_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    # Prepare: special values included (bit patterns compared, so NaN counts too)
    values = torch.tensor([0.0, -0.0, 1.0, -2.5, 1e-3, 3.14159, 65504.0, float("inf"), float("-inf"), float("nan")])
    tensor = torch.cat([values, torch.randn(14, generator=torch.Generator().manual_seed(0))]).to(dtype)
    tensor = tensor.reshape(4, 6)
    info = TensorInfo("t", (4, 6), dtype_name(dtype))

    # Execute
    data = tensor_bytes(tensor)
    back = tensor_from_bytes(data, info)

    # Assert
    assert len(data) == info.nbytes
    assert back.dtype == dtype
    assert back.shape == tensor.shape
    int_view = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(back.view(int_view), tensor.view(int_view))


@pytest.mark.parametrize(
    ("dtype", "value", "raw"),
    [
        (torch.float32, 1.0, b"\x00\x00\x80\x3f"),
        (torch.float16, 1.0, b"\x00\x3c"),
        (torch.bfloat16, 1.0, b"\x80\x3f"),
        (torch.bfloat16, -2.0, b"\x00\xc0"),
    ],
)
def test_tensor_bytes_are_little_endian(dtype: torch.dtype, value: float, raw: bytes) -> None:
    # Execute
    data = tensor_bytes(torch.tensor([value], dtype=dtype))

    # Assert
    assert data == raw


def test_bfloat16_subnormals_survive() -> None:
    # Prepare: every bf16 bit pattern with exponent 0 and a few beyond
    bits = torch.arange(0, 2**9, dtype=torch.int16)
    tensor = bits.view(torch.bfloat16)

    # Execute
    back = tensor_from_bytes(tensor_bytes(tensor), TensorInfo("t", (2**9,), "bfloat16"))

    # Assert
    assert torch.equal(back.view(torch.int16), bits)


def test_tensor_bytes_of_a_non_contiguous_tensor_are_in_c_order() -> None:
    # Prepare
    tensor = torch.arange(6, dtype=torch.float32).reshape(2, 3).t()  # (3, 2), not contiguous

    # Execute
    data = tensor_bytes(tensor)

    # Assert
    assert data == torch.tensor([0.0, 3.0, 1.0, 4.0, 2.0, 5.0]).numpy().tobytes()


def test_tensor_bytes_detaches_tensors_that_require_grad() -> None:
    # Prepare
    tensor = torch.ones(2, requires_grad=True)

    # Execute
    data = tensor_bytes(tensor)

    # Assert
    assert data == torch.ones(2).numpy().tobytes()


@pytest.mark.parametrize(("shape", "nbytes"), [((0,), 0), ((3, 0), 0), ((), 4), ((1, 1, 1), 4)])
def test_tensor_round_trip_of_empty_and_scalar_shapes(shape: tuple[int, ...], nbytes: int) -> None:
    # Prepare
    tensor = torch.full(shape, 7.0)
    info = TensorInfo("t", shape, "float32")

    # Execute
    data = tensor_bytes(tensor)
    back = tensor_from_bytes(data, info)

    # Assert
    assert len(data) == nbytes
    assert tuple(back.shape) == shape
    assert torch.equal(back, tensor)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.int8, torch.uint8, torch.bool])
def test_unsupported_dtype_is_invalid_argument(dtype: torch.dtype) -> None:
    # Execute / Assert
    with _raises(InvalidArgument, "dtype"):
        tensor_bytes(torch.zeros(2, dtype=dtype))


def test_tensor_from_bytes_is_writable_and_independent_of_the_input() -> None:
    # Prepare
    data = bytearray(tensor_bytes(torch.tensor([1.0, 2.0])))

    # Execute
    back = tensor_from_bytes(data, TensorInfo("t", (2,), "float32"))
    back.add_(1.0)

    # Assert
    assert torch.equal(back, torch.tensor([2.0, 3.0]))
    assert bytes(data) == tensor_bytes(torch.tensor([1.0, 2.0]))


# ---------------------------------------------------------------- payloads


def sample_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "m.q.lora_A": torch.randn(4, 5, generator=generator),
        "m.q.lora_B": torch.randn(3, 4, generator=generator).to(torch.bfloat16),
        "classifier.bias": torch.randn(3, generator=generator).to(torch.float16),
        "empty": torch.zeros(0, 2),
    }


def test_encode_payload_header_describes_the_bytes() -> None:
    # Prepare
    tensors = sample_tensors()

    # Execute
    header, payload = encode_payload(tensors)

    # Assert
    assert [(t.name, tuple(t.shape), t.dtype) for t in header.tensors] == [
        ("m.q.lora_A", (4, 5), "float32"),
        ("m.q.lora_B", (3, 4), "bfloat16"),
        ("classifier.bias", (3,), "float16"),
        ("empty", (0, 2), "float32"),
    ]
    assert header.total_bytes == len(payload) == 4 * 20 + 2 * 12 + 2 * 3
    assert header.sha256 == hashlib.sha256(payload).digest()
    assert payload == b"".join(tensor_bytes(t) for t in tensors.values())


@settings(max_examples=40, deadline=None)
@given(chunk_bytes=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_payload_round_trip_for_any_chunk_size(chunk_bytes: int, seed: int) -> None:
    # Prepare
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "a": torch.randn(3, 7, generator=generator),
        "b": torch.randn(5, generator=generator).to(torch.bfloat16),
        "c": torch.randn(2, 2, generator=generator).to(torch.float16),
    }
    header, payload = encode_payload(tensors)

    # Execute
    decoded = decode_payload(header, chunked(payload, chunk_bytes), BIG, chunk_bytes)

    # Assert
    assert list(decoded) == ["a", "b", "c"]
    for name, tensor in tensors.items():
        assert decoded[name].dtype == tensor.dtype
        assert torch.equal(decoded[name], tensor)


def test_payload_round_trip_through_a_serialized_header() -> None:
    # Prepare
    tensors = sample_tensors()
    header, payload = encode_payload(tensors)
    wire = pb.PayloadHeader.FromString(header.SerializeToString())

    # Execute
    decoded = decode_payload(wire, chunked(payload, 16), BIG, 16)

    # Assert
    assert set(decoded) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(decoded[name], tensor)


def test_empty_payload_round_trip() -> None:
    # Prepare
    header, payload = encode_payload({})

    # Execute
    decoded = decode_payload(header, chunked(payload), 0, 1)

    # Assert
    assert payload == b""
    assert decoded == {}


@pytest.mark.parametrize(
    ("size", "chunk", "expected"),
    [(0, 4, []), (1, 4, [1]), (4, 4, [4]), (10, 4, [4, 4, 2]), (12, 4, [4, 4, 4]), (5, 1, [1] * 5)],
)
def test_chunked_sizes(size: int, chunk: int, expected: list[int]) -> None:
    # Prepare
    payload = bytes(range(size))

    # Execute
    parts = list(chunked(payload, chunk))

    # Assert
    assert [len(p) for p in parts] == expected
    assert b"".join(parts) == payload


def test_chunked_default_size_is_under_grpc_limit() -> None:
    # Prepare
    payload = bytes(DEFAULT_CHUNK_BYTES + 1)

    # Execute
    parts = list(chunked(payload))

    # Assert
    assert [len(p) for p in parts] == [DEFAULT_CHUNK_BYTES, 1]
    assert DEFAULT_CHUNK_BYTES < 4 * 1024 * 1024


@pytest.mark.parametrize("chunk", [0, -1])
def test_chunked_rejects_non_positive_sizes(chunk: int) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="chunk_bytes must be positive"):
        list(chunked(b"abc", chunk))


def _never_read() -> Iterator[bytes]:
    raise AssertionError("the stream must not be read")
    yield b""  # pragma: no cover


def test_oversize_payload_is_refused_before_reading_any_chunk() -> None:
    # Prepare
    header, _ = encode_payload({"a": torch.zeros(100)})  # 400 bytes

    # Execute / Assert
    with pytest.raises(ResourceExhausted, match="400 bytes exceeds the limit of 399"):
        decode_payload(header, _never_read(), max_bytes=399, max_chunk_bytes=BIG)


def test_payload_at_exactly_the_limit_is_accepted() -> None:
    # Prepare
    header, payload = encode_payload({"a": torch.ones(100)})

    # Execute
    decoded = decode_payload(header, chunked(payload, 100), max_bytes=400, max_chunk_bytes=100)

    # Assert
    assert torch.equal(decoded["a"], torch.ones(100))


def test_oversize_chunk_is_refused() -> None:
    # Prepare
    header, payload = encode_payload({"a": torch.zeros(100)})

    # Execute / Assert
    with pytest.raises(ResourceExhausted, match="chunk of 101 bytes"):
        decode_payload(header, chunked(payload, 101), max_bytes=BIG, max_chunk_bytes=100)


@pytest.mark.parametrize("keep", [0, 1, 100, 399])
def test_truncated_stream_is_an_integrity_error(keep: int) -> None:
    # Prepare
    header, payload = encode_payload({"a": torch.zeros(100)})

    # Execute / Assert
    with _raises(IntegrityError, "payload") as caught:
        decode_payload(header, chunked(payload[:keep], 64), BIG, BIG)
    assert f"stream ended after {keep} of 400 bytes" in caught.value.problem


@pytest.mark.parametrize("extra", [b"\x00", b"x" * 64])
def test_stream_longer_than_declared_is_an_integrity_error(extra: bytes) -> None:
    # Prepare
    header, payload = encode_payload({"a": torch.zeros(10)})

    # Execute / Assert
    with _raises(IntegrityError, "payload") as caught:
        decode_payload(header, iter([payload, extra]), BIG, BIG)
    assert "more bytes than the declared 40" in caught.value.problem


@pytest.mark.parametrize("position", [0, 17, 39])
def test_corrupted_byte_fails_the_checksum(position: int) -> None:
    # Prepare
    header, payload = encode_payload({"a": torch.arange(10, dtype=torch.float32)})
    corrupted = bytearray(payload)
    corrupted[position] ^= 0x01

    # Execute / Assert
    with _raises(IntegrityError, "payload.sha256"):
        decode_payload(header, chunked(bytes(corrupted), 8), BIG, BIG)


def test_wrong_declared_checksum_fails() -> None:
    # Prepare
    header, payload = encode_payload({"a": torch.ones(4)})
    header.sha256 = hashlib.sha256(b"something else").digest()

    # Execute / Assert
    with _raises(IntegrityError, "payload.sha256"):
        decode_payload(header, chunked(payload), BIG, BIG)


@pytest.mark.parametrize("length", [0, 16, 31, 33])
def test_checksum_of_wrong_length_is_invalid_argument(length: int) -> None:
    # Prepare
    header, payload = encode_payload({"a": torch.ones(4)})
    header.sha256 = b"\x00" * length

    # Execute / Assert
    with _raises(InvalidArgument, "payload.sha256"):
        decode_payload(header, chunked(payload), BIG, BIG)


def test_duplicate_tensor_names_are_invalid_argument() -> None:
    # Prepare
    header, payload = encode_payload({"a": torch.ones(2), "b": torch.ones(2)})
    header.tensors[1].name = "a"

    # Execute / Assert
    with _raises(InvalidArgument, "payload.tensors[1].name") as caught:
        decode_payload(header, chunked(payload), BIG, BIG)
    assert "duplicate 'a'" in caught.value.problem


def test_empty_tensor_name_is_invalid_argument() -> None:
    # Prepare
    header, payload = encode_payload({"a": torch.ones(2)})
    header.tensors[0].name = ""

    # Execute / Assert
    with _raises(InvalidArgument, "payload.tensors[0].name"):
        decode_payload(header, chunked(payload), BIG, BIG)


@pytest.mark.parametrize("dtype", ["float64", "int8", "", "torch.float32", "FLOAT32"])
def test_unknown_dtype_in_header_is_invalid_argument(dtype: str) -> None:
    # Prepare
    header, payload = encode_payload({"w": torch.ones(2)})
    header.tensors[0].dtype = dtype

    # Execute / Assert
    with _raises(InvalidArgument, "payload.tensors[w].dtype"):
        decode_payload(header, chunked(payload), BIG, BIG)


@pytest.mark.parametrize("total", [0, 7, 9, 10**12])
def test_total_bytes_that_disagree_with_the_shapes_are_invalid_argument(total: int) -> None:
    # Prepare: shapes declare 8 bytes
    header, _ = encode_payload({"w": torch.ones(2)})
    header.total_bytes = total

    # Execute / Assert: caught before any size limit or read
    with _raises(InvalidArgument, "payload.total_bytes"):
        decode_payload(header, _never_read(), max_bytes=1, max_chunk_bytes=1)


def test_tensor_infos_returns_domain_infos_in_order() -> None:
    # Prepare
    header, _ = encode_payload(sample_tensors())

    # Execute
    infos = tensor_infos(header)

    # Assert
    assert infos == [
        TensorInfo("m.q.lora_A", (4, 5), "float32"),
        TensorInfo("m.q.lora_B", (3, 4), "bfloat16"),
        TensorInfo("classifier.bias", (3,), "float16"),
        TensorInfo("empty", (0, 2), "float32"),
    ]


# ---------------------------------------------------------------- DeviceProfile


def test_profile_round_trip() -> None:
    # Execute
    back = profile_from_pb(pb.DeviceProfile.FromString(profile_to_pb(PROFILE).SerializeToString()))

    # Assert
    assert back == PROFILE


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
    payload_header, _ = encode_payload(sample_tensors())

    # Execute
    message = pb.UpdateHeader.FromString(update_header_to_pb(META, payload_header).SerializeToString())
    back = update_meta_from_pb(message)

    # Assert
    assert back == META
    assert message.payload == payload_header


def test_update_header_carries_training_importance_scores() -> None:
    # Prepare
    payload_header, _ = encode_payload(sample_tensors())
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
