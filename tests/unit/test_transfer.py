"""Unit tests for common.transfer: tensor bytes, chunked payloads with integrity checks, chunk messages' wire form."""

from __future__ import annotations

import gc
import hashlib
import itertools
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import xxhash
from fedpipe.v1 import fedpipe_pb2 as pb
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import IntegrityError, InvalidArgument, ResourceExhausted
from common.transfer import (
    DEFAULT_CHUNK_BYTES,
    PayloadReader,
    checksum_key,
    chunk_messages,
    chunk_of,
    chunk_view,
    chunked,
    decode_payload,
    dtype_name,
    encode_payload,
    parse_download_part,
    parse_upload_part,
    serialize_part,
    tensor_bytes,
    tensor_infos,
)
from common.types import TensorInfo

BIG = 1 << 30  # a size limit that never bites


def _raises(exc: type[InvalidArgument], field: str) -> pytest.RaisesExc[InvalidArgument]:
    """pytest.raises for an InvalidArgument subclass whose field is exactly field."""
    return pytest.raises(exc, check=lambda e: e.field == field)


# ---------------------------------------------------------------- tensors <-> bytes


def received(data: bytes | bytearray, info: TensorInfo) -> torch.Tensor:
    """What a receiver makes of these bytes as the one tensor of a payload (in chunks of 7 bytes)."""
    header = pb.PayloadHeader(
        tensors=[pb.TensorInfo(name=info.name, shape=list(info.shape), dtype=info.dtype)],
        total_bytes=len(data),
        xxh3_128=xxhash.xxh3_128(data).digest(),
    )
    return decode_payload(header, chunked(bytes(data), 7), BIG, BIG)[info.name]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tensor_bytes_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    # Prepare: special values included (bit patterns compared, so NaN counts too)
    values = torch.tensor([0.0, -0.0, 1.0, -2.5, 1e-3, 3.14159, 65504.0, float("inf"), float("-inf"), float("nan")])
    tensor = torch.cat([values, torch.randn(14, generator=torch.Generator().manual_seed(0))]).to(dtype)
    tensor = tensor.reshape(4, 6)
    info = TensorInfo("t", (4, 6), dtype_name(dtype))

    # Execute
    data = tensor_bytes(tensor)
    back = received(data, info)

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
    back = received(tensor_bytes(tensor), TensorInfo("t", (2**9,), "bfloat16"))

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
    back = received(data, info)

    # Assert
    assert len(data) == nbytes
    assert tuple(back.shape) == shape
    assert torch.equal(back, tensor)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.int8, torch.uint8, torch.bool])
def test_unsupported_dtype_is_invalid_argument(dtype: torch.dtype) -> None:
    # Execute / Assert
    with _raises(InvalidArgument, "dtype"):
        tensor_bytes(torch.zeros(2, dtype=dtype))


def test_a_received_tensor_is_writable_and_independent_of_the_input() -> None:
    # Prepare
    data = bytearray(tensor_bytes(torch.tensor([1.0, 2.0])))

    # Execute
    back = received(data, TensorInfo("t", (2,), "float32"))
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
    assert header.xxh3_128 == xxhash.xxh3_128(bytes(payload)).digest()
    assert not header.sha256  # written by earlier senders only
    assert bytes(payload) == b"".join(tensor_bytes(t) for t in tensors.values())


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
    assert bytes(payload) == b""
    assert list(chunked(payload)) == []
    assert decoded == {}


def test_encoded_payload_holds_views_of_the_tensors_not_copies() -> None:
    # Prepare
    tensor = torch.zeros(4)
    _, payload = encode_payload({"a": tensor})

    # Execute
    tensor[0] = 1.0  # the payload's bytes are the tensor's own memory

    # Assert
    assert bytes(payload) == tensor_bytes(torch.tensor([1.0, 0.0, 0.0, 0.0]))


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 50), max_size=5), chunk_bytes=st.integers(1, 64))
def test_chunks_are_full_except_the_last_and_span_tensors(sizes: list[int], chunk_bytes: int) -> None:
    # Prepare
    tensors = {f"t{i}": torch.arange(n, dtype=torch.float16) for i, n in enumerate(sizes)}
    _, payload = encode_payload(tensors)

    # Execute
    chunks = list(chunked(payload, chunk_bytes))

    # Assert
    assert b"".join(chunks) == bytes(payload) == b"".join(tensor_bytes(t) for t in tensors.values())
    assert all(len(c) == chunk_bytes for c in chunks[:-1])
    assert all(0 < len(c) <= chunk_bytes for c in chunks)


def _inside(tensor: torch.Tensor, chunk: bytes) -> bool:
    """Whether tensor's memory lies inside chunk's bytes."""
    low = np.frombuffer(chunk, dtype=np.uint8).ctypes.data
    return low <= tensor.data_ptr() and tensor.data_ptr() + tensor.numel() * tensor.element_size() <= low + len(chunk)


def test_tensors_inside_one_chunk_are_views_of_it_and_only_spanning_or_misaligned_ones_are_copied() -> None:
    # Prepare: chunks of 16 bytes; a (6 bytes) and b (4, at 6: misaligned for float32) in the first chunk, c
    # (12 bytes, at 10) spans the first two, p (2, at 22), d (8, at 24) and e (0, at 32) end the second, f (16)
    # is the third
    tensors = {
        "a": torch.tensor([1, 2, 3], dtype=torch.float16),
        "b": torch.tensor([1.5]),
        "c": torch.tensor([1.0, 2.0, 3.0]),
        "p": torch.tensor([9], dtype=torch.float16),
        "d": torch.tensor([0.25, 4.0]),
        "e": torch.zeros(0, 3),
        "f": torch.tensor([5, -6], dtype=torch.int64),
    }
    header, payload = encode_payload(tensors)
    chunks = [bytes(8) + c for c in chunked(payload, 16)]  # each chunk 8-byte aligned inside its own bytes
    views = [memoryview(c)[8:] for c in chunks]
    reader = PayloadReader(header, BIG, BIG)

    # Execute
    for view in views:
        reader.add(view)
    decoded = reader.tensors()

    # Assert: the same values; a, p, d, e and f read in place, b and c copied (4 + 12 bytes)
    for name, tensor in tensors.items():
        assert torch.equal(decoded[name], tensor) and decoded[name].dtype == tensor.dtype, name
    assert _inside(decoded["a"], chunks[0]) and _inside(decoded["f"], chunks[2])
    assert _inside(decoded["p"], chunks[1]) and _inside(decoded["d"], chunks[1])
    assert not any(_inside(decoded[name], chunk) for name in ("b", "c") for chunk in chunks)
    assert reader.copied == 16
    assert decoded["e"].shape == (0, 3)


def test_a_decoded_view_keeps_its_chunk_alive() -> None:
    # Prepare
    tensors = {"a": torch.arange(1000, dtype=torch.float32)}
    header, payload = encode_payload(tensors)
    chunk = bytes(8) + bytes(payload)
    reader = PayloadReader(header, BIG, BIG)
    reader.add(memoryview(chunk)[8:])
    decoded = reader.tensors()["a"]

    # Execute: drop every other reference to the chunk
    del chunk, reader
    gc.collect()

    # Assert
    assert torch.equal(decoded, tensors["a"])


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
        decode_payload(header, chunked(bytes(payload)[:keep], 64), BIG, BIG)
    assert f"stream ended after {keep} of 400 bytes" in caught.value.problem


@pytest.mark.parametrize("extra", [b"\x00", b"x" * 64])
def test_stream_longer_than_declared_is_an_integrity_error(extra: bytes) -> None:
    # Prepare
    header, payload = encode_payload({"a": torch.zeros(10)})

    # Execute / Assert
    with _raises(IntegrityError, "payload") as caught:
        decode_payload(header, iter([bytes(payload), extra]), BIG, BIG)
    assert "more bytes than the declared 40" in caught.value.problem


@pytest.mark.parametrize("position", [0, 17, 39])
def test_corrupted_byte_fails_the_checksum(position: int) -> None:
    # Prepare
    header, payload = encode_payload({"a": torch.arange(10, dtype=torch.float32)})
    corrupted = bytearray(bytes(payload))
    corrupted[position] ^= 0x01

    # Execute / Assert
    with _raises(IntegrityError, "payload.xxh3_128"):
        decode_payload(header, chunked(bytes(corrupted), 8), BIG, BIG)


def test_wrong_declared_checksum_fails() -> None:
    # Prepare
    header, payload = encode_payload({"a": torch.ones(4)})
    header.xxh3_128 = xxhash.xxh3_128(b"something else").digest()

    # Execute / Assert
    with _raises(IntegrityError, "payload.xxh3_128"):
        decode_payload(header, chunked(payload), BIG, BIG)


def legacy_header(payload: bytes) -> pb.PayloadHeader:
    """What a sender from before XXH3 wrote for one float32 tensor "a": a SHA-256 and no xxh3_128."""
    header, _ = encode_payload({"a": torch.frombuffer(bytearray(payload), dtype=torch.float32)})
    header.ClearField("xxh3_128")
    header.sha256 = hashlib.sha256(payload).digest()
    return header


def test_sha256_from_an_earlier_sender_is_still_checked() -> None:
    # Prepare
    data = bytes(torch.arange(4, dtype=torch.float32).numpy().tobytes())
    corrupted = bytes([data[0] ^ 1]) + data[1:]

    # Execute
    back = decode_payload(legacy_header(data), chunked(data, 5), BIG, BIG)["a"]

    # Assert: accepted intact, refused corrupted, under the field it sent
    assert torch.equal(back, torch.arange(4, dtype=torch.float32))
    with _raises(IntegrityError, "payload.sha256"):
        decode_payload(legacy_header(data), chunked(corrupted, 5), BIG, BIG)


def test_every_checksum_set_must_hold() -> None:
    # Prepare: a right XXH3 beside a wrong SHA-256
    header, payload = encode_payload({"a": torch.ones(4)})
    header.sha256 = hashlib.sha256(b"other bytes").digest()

    # Execute / Assert
    with _raises(IntegrityError, "payload.sha256"):
        decode_payload(header, chunked(payload), BIG, BIG)


def test_payload_without_a_checksum_is_invalid_argument() -> None:
    # Prepare
    header, payload = encode_payload({"a": torch.ones(4)})
    header.ClearField("xxh3_128")

    # Execute / Assert
    with _raises(InvalidArgument, "payload") as caught:
        decode_payload(header, chunked(payload), BIG, BIG)
    assert "carries no checksum" in caught.value.problem


@pytest.mark.parametrize(("field", "length"), [("xxh3_128", 8), ("xxh3_128", 32), ("sha256", 16), ("sha256", 31)])
def test_checksum_of_wrong_length_is_invalid_argument(field: str, length: int) -> None:
    # Prepare
    header, payload = encode_payload({"a": torch.ones(4)})
    setattr(header, field, b"\x00" * length)

    # Execute / Assert
    with _raises(InvalidArgument, f"payload.{field}"):
        decode_payload(header, chunked(payload), BIG, BIG)


def test_checksum_key_names_the_algorithm_and_the_bytes() -> None:
    # Prepare
    data = bytes(16)
    header, _ = encode_payload({"a": torch.zeros(4)})
    other, _ = encode_payload({"a": torch.ones(4)})

    # Execute
    key, legacy = checksum_key(header), checksum_key(legacy_header(data))

    # Assert: the same bytes give the same key, other bytes another, and the two algorithms never meet
    assert key == checksum_key(encode_payload({"a": torch.zeros(4)})[0]) == b"xxh3_128:" + header.xxh3_128
    assert key != checksum_key(other)
    assert legacy == b"sha256:" + hashlib.sha256(data).digest()


@given(
    sizes=st.lists(st.integers(min_value=0, max_value=9), min_size=1, max_size=6),
    chunk=st.integers(min_value=1, max_value=50),
)
@settings(max_examples=60, deadline=None)
def test_on_tensor_sees_each_tensor_once_in_order_as_soon_as_its_bytes_are_in(sizes: list[int], chunk: int) -> None:
    # Prepare: float32 tensors of these lengths (empty ones too), cut into chunks of `chunk` bytes
    tensors = {f"t{i}": torch.arange(n, dtype=torch.float32) + i for i, n in enumerate(sizes)}
    header, payload = encode_payload(tensors)
    seen: list[tuple[str, int, torch.Tensor]] = []
    reader = PayloadReader(header, BIG, BIG, lambda name, t: seen.append((name, reader.filled, t.clone())))

    # Execute
    for part in chunked(payload, chunk):
        reader.add(part)
    final = reader.tensors()

    # Assert: every non-empty tensor seen exactly once, in payload order, in the chunk that completes it, whole;
    # an empty tensor after the last chunk may be built only at the end (no chunk completes it)
    ends = list(itertools.accumulate(t.numel() * 4 for t in tensors.values()))
    names = [name for name, _, _ in seen]
    assert names == list(tensors)[: len(names)]
    assert all(tensors[name].numel() == 0 for name in list(tensors)[len(names) :])
    for (name, filled, got), end in zip(seen, ends, strict=False):
        assert end <= filled < end + chunk or end == 0
        assert torch.equal(got, tensors[name])
    assert list(final) == list(tensors)
    assert all(torch.equal(final[n], t) for n, t in tensors.items())


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


# ---------------------------------------------------------------- chunk messages' wire form


@settings(max_examples=40, deadline=None)
@given(size=st.integers(0, 20_000), chunk_bytes=st.sampled_from([1, 127, 128, 300, 16_383, 16_384, 50_000]))
def test_chunk_messages_parse_in_protobuf_for_either_stream_with_their_chunks_8_byte_aligned(
    size: int, chunk_bytes: int
) -> None:
    # Prepare
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)

    # Execute
    messages = list(chunk_messages(data, chunk_bytes))

    # Assert
    chunks = list(chunked(data, chunk_bytes))
    assert [pb.UploadUpdateRequest.FromString(m).chunk for m in messages] == chunks
    assert [pb.DownloadGlobalResponse.FromString(m).chunk for m in messages] == chunks
    assert all(m.endswith(c) and (len(m) - len(c)) % 8 == 0 for m, c in zip(messages, chunks, strict=True))


@settings(max_examples=30, deadline=None)
@given(chunk=st.binary(max_size=3000))
def test_a_serialized_chunk_parses_to_a_view_of_its_bytes(chunk: bytes) -> None:
    # Prepare
    upload = pb.UploadUpdateRequest(chunk=chunk).SerializeToString()
    download = pb.DownloadGlobalResponse(chunk=chunk).SerializeToString()

    # Execute
    parts = parse_upload_part(upload), parse_download_part(download)

    # Assert
    for part in parts:
        assert isinstance(part, memoryview)
        assert bytes(part) == chunk
        assert chunk_of(part) is part


def test_headers_and_non_canonical_chunks_go_through_protobuf() -> None:
    # Prepare: a header; a chunk field written twice (valid protobuf: the last one wins)
    header = pb.UploadUpdateRequest(header=pb.UpdateHeader(agent_id="a")).SerializeToString()
    twice = (
        pb.UploadUpdateRequest(chunk=b"old").SerializeToString()
        + pb.UploadUpdateRequest(chunk=b"new").SerializeToString()
    )

    # Execute
    parsed_header, parsed_twice = parse_upload_part(header), parse_upload_part(twice)

    # Assert
    assert isinstance(parsed_header, pb.UploadUpdateRequest)
    assert parsed_header.header.agent_id == "a"
    assert chunk_of(parsed_header) is None
    assert isinstance(parsed_twice, pb.UploadUpdateRequest)
    assert chunk_of(parsed_twice) == b"new"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x12",
        b"\x12\x05abc",
        b"\x12\x02abc",
        b"\x12\xff",
        b"\x0a\x00",
        b"\x12" + b"\xff" * 11,
        b"\x7a\x00",
        b"\x7a\x05\x00\x12\x00",
        b"\x7a\x00\x0a\x00",
        b"\x7a\x00\x12\x00\x12\x00",
    ],
    ids=[
        "empty",
        "no-length",
        "short",
        "long",
        "cut-varint",
        "header-tag",
        "overlong-varint",
        "align-only",
        "align-past-end",
        "align-then-header",
        "two-chunks",
    ],
)
def test_chunk_view_refuses_anything_but_one_whole_chunk(data: bytes) -> None:
    # Execute / Assert
    assert chunk_view(data) is None


def test_serialize_part_passes_serialized_chunks_through_and_serializes_messages() -> None:
    # Prepare
    message = pb.DownloadGlobalResponse(header=pb.PayloadHeader(total_bytes=3))
    raw = next(chunk_messages(b"abc"))

    # Execute / Assert
    assert serialize_part(raw) is raw
    assert serialize_part(message) == message.SerializeToString()


def test_a_payload_survives_chunk_messages_and_their_parse() -> None:
    # Prepare
    tensors = {"a": torch.randn(300, 7), "b": torch.randn(33).to(torch.bfloat16)}
    header, payload = encode_payload(tensors)

    # Execute
    parts = [parse_upload_part(m) for m in chunk_messages(payload, 1000)]
    decoded = decode_payload(header, (c for c in map(chunk_of, parts) if c is not None), BIG, 1000)

    # Assert
    assert all(isinstance(p, memoryview) for p in parts)
    for name, tensor in tensors.items():
        assert torch.equal(decoded[name], tensor)


def test_received_chunk_messages_give_aligned_chunks_whose_whole_tensors_are_read_in_place() -> None:
    # Prepare: int64, float32 and bfloat16 tensors of 4 KiB each in chunks of 8 KiB, so none spans two chunks; each
    # message copied into bytes of its own, as gRPC hands a received message over
    tensors = {
        "a": torch.arange(512, dtype=torch.int64),
        "b": torch.randn(1024),
        "c": torch.randn(2048).to(torch.bfloat16),
        "d": torch.randn(1024),
    }
    header, payload = encode_payload(tensors)
    received = [bytes(bytearray(m)) for m in chunk_messages(payload, 8192)]
    reader = PayloadReader(header, BIG, 8192)

    # Execute
    for message in received:
        chunk = chunk_of(parse_upload_part(message))
        assert isinstance(chunk, memoryview)
        assert np.frombuffer(chunk, dtype=np.uint8).ctypes.data % 8 == 0
        reader.add(chunk)
    decoded = reader.tensors()

    # Assert
    assert reader.copied == 0
    for name, tensor in tensors.items():
        assert torch.equal(decoded[name], tensor)
