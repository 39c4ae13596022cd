"""Tensor payloads on the wire: tensors to views of their bytes, chunks, and back, with size and integrity checks.

A tensor payload travels as a header (names, shapes, dtypes, total size, SHA-256) followed by chunks
of raw little-endian bytes in header order. Receivers check every size before allocating and the
checksum before any tensor is used. Each side copies the bytes once and hashes them once.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable, Iterator, Mapping

import torch
from fedpipe.v1 import fedpipe_pb2 as pb

from common.errors import IntegrityError, InvalidArgument, ResourceExhausted
from common.types import DTYPE_SIZES, TORCH_DTYPES, TensorInfo

DEFAULT_CHUNK_BYTES = 2 * 1024 * 1024  # well under gRPC's 4 MiB default message limit

if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
    raise ImportError("FedPipe's wire format assumes a little-endian host")


# ---------------------------------------------------------------- tensors <-> bytes


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """Raw bytes of a tensor (any supported dtype, bf16 included) in C order (a copy; the wire uses views)."""
    return bytes(tensor_view(tensor))


def tensor_view(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in C order as a flat memoryview of its own memory when it is a contiguous CPU tensor
    (otherwise of a contiguous CPU copy); the view keeps that memory alive."""
    dtype = dtype_name(tensor.dtype)
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    # view as bytes keeps bf16 exact; numpy has no bf16.
    view = flat.view(torch.uint8).numpy().data
    assert view.nbytes == flat.numel() * DTYPE_SIZES[dtype]
    return view


def dtype_name(dtype: torch.dtype) -> str:
    """Wire name of a torch dtype; InvalidArgument for dtypes FedPipe does not carry."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_SIZES:
        raise InvalidArgument("dtype", f"{name} is not one of {sorted(DTYPE_SIZES)}")
    return name


class Payload:
    """The bytes of named tensors, held as views of the tensors' own memory: nothing is copied until a chunk is
    cut, and the SHA-256 is taken once, over the views."""

    def __init__(self, parts: Iterable[memoryview]) -> None:
        self.parts = tuple(part for part in parts if part.nbytes)
        self.nbytes = sum(part.nbytes for part in self.parts)
        digest = hashlib.sha256()
        for part in self.parts:
            digest.update(part)  # hashlib releases the GIL on large buffers and reads them in place
        self.sha256 = digest.digest()

    def __len__(self) -> int:
        return self.nbytes

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)

    def chunks(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
        """Chunks of exactly chunk_bytes (the last one shorter), cut across tensor boundaries."""
        return _cut(self.parts, chunk_bytes)


def _spans(parts: Iterable[memoryview], chunk_bytes: int) -> Iterator[list[memoryview]]:
    """The views that make up each chunk of exactly chunk_bytes (the last one shorter) of the concatenated parts."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    pending: list[memoryview] = []
    size = 0
    for part in parts:
        offset = 0
        while offset < part.nbytes:
            take = min(chunk_bytes - size, part.nbytes - offset)
            pending.append(part[offset : offset + take])
            size += take
            offset += take
            if size == chunk_bytes:
                yield pending
                pending, size = [], 0
    if pending:
        yield pending


def _cut(parts: Iterable[memoryview], chunk_bytes: int) -> Iterator[bytes]:
    """Chunks of the concatenated parts; each chunk is the only copy made of its bytes."""
    for views in _spans(parts, chunk_bytes):
        yield views[0].tobytes() if len(views) == 1 else b"".join(views)


def encode_payload(tensors: Mapping[str, torch.Tensor]) -> tuple[pb.PayloadHeader, Payload]:
    """Header and bytes (as views) of named tensors, in mapping order."""
    infos: list[pb.TensorInfo] = []
    parts: list[memoryview] = []
    for name, tensor in tensors.items():
        infos.append(pb.TensorInfo(name=name, shape=list(tensor.shape), dtype=dtype_name(tensor.dtype)))
        parts.append(tensor_view(tensor))
    payload = Payload(parts)
    return pb.PayloadHeader(tensors=infos, total_bytes=payload.nbytes, sha256=payload.sha256), payload


def chunked(payload: bytes | Payload, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    """Split a payload into chunks of at most chunk_bytes."""
    return _cut(payload.parts if isinstance(payload, Payload) else (memoryview(payload),), chunk_bytes)


def tensor_infos(header: pb.PayloadHeader) -> list[TensorInfo]:
    """Domain view of a payload header; InvalidArgument for unknown dtypes or inconsistent sizes."""
    infos: list[TensorInfo] = []
    seen: set[str] = set()
    for index, item in enumerate(header.tensors):
        if not item.name:
            raise InvalidArgument(f"payload.tensors[{index}].name", "empty")
        if item.name in seen:
            raise InvalidArgument(f"payload.tensors[{index}].name", f"duplicate {item.name!r}")
        seen.add(item.name)
        if item.dtype not in DTYPE_SIZES:
            raise InvalidArgument(
                f"payload.tensors[{item.name}].dtype", f"{item.dtype!r} is not one of {sorted(DTYPE_SIZES)}"
            )
        infos.append(TensorInfo(name=item.name, shape=tuple(int(d) for d in item.shape), dtype=item.dtype))
    declared = sum(info.nbytes for info in infos)
    if declared != header.total_bytes:
        raise InvalidArgument("payload.total_bytes", f"{header.total_bytes} but the tensors declare {declared} bytes")
    if len(header.sha256) != hashlib.sha256().digest_size:
        raise InvalidArgument("payload.sha256", f"must be 32 bytes, got {len(header.sha256)}")
    return infos


class PayloadReader:
    """A chunked payload reassembled as it arrives and verified at the end; raises before allocating anything
    oversize. Chunks may be added from any thread, one at a time."""

    def __init__(self, header: pb.PayloadHeader, max_bytes: int, max_chunk_bytes: int) -> None:
        self.infos = tensor_infos(header)
        if header.total_bytes > max_bytes:
            raise ResourceExhausted(f"payload of {header.total_bytes} bytes exceeds the limit of {max_bytes}")
        self.header = header
        self.max_chunk_bytes = max_chunk_bytes
        # One buffer for the whole payload, filled in place: each chunk is copied once, and the tensors are views
        # of it (a tensor that the wire leaves misaligned for its dtype gets a copy of its own).
        self.buffer = torch.empty(header.total_bytes, dtype=torch.uint8)
        self.view = self.buffer.numpy().data
        self.digest = hashlib.sha256()
        self.filled = 0

    def add(self, chunk: bytes | memoryview) -> None:
        """Copy one chunk in and hash it."""
        size = len(chunk)
        if size > self.max_chunk_bytes:
            raise ResourceExhausted(f"chunk of {size} bytes exceeds the limit of {self.max_chunk_bytes}")
        if self.filled + size > self.header.total_bytes:
            raise IntegrityError("payload", f"more bytes than the declared {self.header.total_bytes}")
        self.view[self.filled : self.filled + size] = chunk
        self.digest.update(chunk)
        self.filled += size

    def tensors(self) -> dict[str, torch.Tensor]:
        """The payload's tensors, once every byte is in and the checksum matches."""
        if self.filled != self.header.total_bytes:
            raise IntegrityError("payload", f"stream ended after {self.filled} of {self.header.total_bytes} bytes")
        if self.digest.digest() != self.header.sha256:
            raise IntegrityError("payload.sha256", "checksum does not match the bytes received")
        tensors: dict[str, torch.Tensor] = {}
        offset = 0
        for info in self.infos:
            part = self.buffer[offset : offset + info.nbytes]
            if offset % DTYPE_SIZES[info.dtype]:
                part = part.clone()
            tensors[info.name] = part.view(TORCH_DTYPES[info.dtype]).reshape(info.shape)
            offset += info.nbytes
        return tensors


def decode_payload(
    header: pb.PayloadHeader,
    chunks: Iterable[bytes | memoryview],
    max_bytes: int,
    max_chunk_bytes: int,
) -> dict[str, torch.Tensor]:
    """Reassemble and verify a chunked payload; raises before allocating anything oversize."""
    reader = PayloadReader(header, max_bytes, max_chunk_bytes)
    for chunk in chunks:
        reader.add(chunk)
    return reader.tensors()


# ---------------------------------------------------------------- chunk messages in protobuf's wire form

# Both streams carry a chunk as `bytes chunk = 2` in the oneof `part` of DownloadGlobalResponse and
# UploadUpdateRequest: field 2, wire type 2 (length-delimited), so a chunk message is this tag, the length as a
# varint, then the bytes. Writing and reading that form by hand spares the two copies protobuf makes of every
# chunk (into the message, and out of it when serializing); headers still go through protobuf.
CHUNK_TAG = 2 << 3 | 2
_SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name
UPLOAD_METHOD = f"/{_SERVICE}/UploadUpdate"
DOWNLOAD_METHOD = f"/{_SERVICE}/DownloadGlobal"


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int] | None:
    """(value, position after it), or None when data holds no complete varint of at most 10 bytes there."""
    value = shift = 0
    for index in range(pos, min(len(data), pos + 10)):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, index + 1
        shift += 7
    return None


def chunk_messages(payload: Payload | bytes, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    """Serialized chunk messages (the same bytes for either stream), each built in one copy from the views."""
    parts = payload.parts if isinstance(payload, Payload) else (memoryview(payload),)
    for views in _spans(parts, chunk_bytes):
        size = sum(view.nbytes for view in views)
        yield b"".join([bytes([CHUNK_TAG]), _varint(size), *views])


def chunk_view(data: bytes) -> memoryview | None:
    """The chunk of a serialized message in the canonical chunk form (tag, length, bytes, nothing more), as a view
    of data; None for any other message (a header, or a chunk written another valid way), which protobuf parses."""
    if not data or data[0] != CHUNK_TAG:
        return None
    read = _read_varint(data, 1)
    if read is None or read[0] + read[1] != len(data):
        return None
    return memoryview(data)[read[1] :]


UploadPart = pb.UploadUpdateRequest | memoryview
DownloadPart = pb.DownloadGlobalResponse | memoryview


def parse_upload_part(data: bytes) -> UploadPart:
    """gRPC request deserializer of UploadUpdate: a chunk as a view, anything else as the parsed message."""
    view = chunk_view(data)
    return view if view is not None else pb.UploadUpdateRequest.FromString(data)


def parse_download_part(data: bytes) -> DownloadPart:
    """gRPC response deserializer of DownloadGlobal: a chunk as a view, anything else as the parsed message."""
    view = chunk_view(data)
    return view if view is not None else pb.DownloadGlobalResponse.FromString(data)


def serialize_part(part: bytes | pb.UploadUpdateRequest | pb.DownloadGlobalResponse) -> bytes:
    """gRPC serializer of either stream: chunk messages arrive already serialized."""
    return part if isinstance(part, bytes) else part.SerializeToString()


def chunk_of(part: UploadPart | DownloadPart) -> memoryview | bytes | None:
    """The chunk a stream part carries; None when it is not a chunk (a header where chunks must follow)."""
    if isinstance(part, memoryview):
        return part
    return part.chunk if part.WhichOneof("part") == "chunk" else None
