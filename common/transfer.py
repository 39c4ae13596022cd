"""Tensor payloads on the wire: tensors to views of their bytes, chunks, and back, with size and integrity checks.

A tensor payload travels as a header (names, shapes, dtypes, total size, checksum) followed by chunks
of raw little-endian bytes in header order. Receivers check every size before allocating and the
checksum before any tensor is used. Each side hashes the bytes once; the sender copies them once (into its chunk
messages), and the receiver reads every tensor that lies within one chunk in place, copying only those that span
chunks.

The checksum is XXH3-128, not a cryptographic hash: TLS already authenticates every byte, so what is left to
catch is truncation and bugs, and XXH3 does that at memory speed (about 26 GB/s here against SHA-256's 2).
Content that is named by its digest (a global's weights, checkpoints) keeps SHA-256 (common.adapters).
"""

from __future__ import annotations

import hashlib
import itertools
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Protocol

import numpy as np
import torch
import xxhash
from fedpipe.v1 import fedpipe_pb2 as pb

from common.errors import IntegrityError, InvalidArgument, ResourceExhausted
from common.types import DTYPE_SIZES, TORCH_DTYPES, TensorInfo

DEFAULT_CHUNK_BYTES = 2 * 1024 * 1024  # well under gRPC's 4 MiB default message limit

# gRPC hands messages over as bytes, which are read-only: a tensor read off the wire is a view of them (PayloadReader)
# that nothing writes in place and nothing else holds, so torch's warning about such views says nothing here.
warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)

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


XXH3_BYTES = 16
SHA256_BYTES = 32


class Payload:
    """The bytes of named tensors, held as views of the tensors' own memory: nothing is copied until a chunk is
    cut, and the checksum is taken once, over the views."""

    def __init__(self, parts: Iterable[memoryview]) -> None:
        self.parts = tuple(part for part in parts if part.nbytes)
        self.nbytes = sum(part.nbytes for part in self.parts)
        digest = xxhash.xxh3_128()
        for part in self.parts:
            digest.update(part)  # reads the views in place
        self.checksum = digest.digest()

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
    return pb.PayloadHeader(tensors=infos, total_bytes=payload.nbytes, xxh3_128=payload.checksum), payload


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
    _check_checksums(header)
    return infos


def _check_checksums(header: pb.PayloadHeader) -> None:
    if not header.xxh3_128 and not header.sha256:
        raise InvalidArgument("payload", "carries no checksum (xxh3_128, or sha256 from earlier senders)")
    if header.xxh3_128 and len(header.xxh3_128) != XXH3_BYTES:
        raise InvalidArgument("payload.xxh3_128", f"must be {XXH3_BYTES} bytes, got {len(header.xxh3_128)}")
    if header.sha256 and len(header.sha256) != SHA256_BYTES:
        raise InvalidArgument("payload.sha256", f"must be {SHA256_BYTES} bytes, got {len(header.sha256)}")


def checksum_key(header: pb.PayloadHeader) -> bytes:
    """What names a payload's bytes for recognising a resent upload: its checksum, tagged with the algorithm."""
    return b"xxh3_128:" + header.xxh3_128 if header.xxh3_128 else b"sha256:" + header.sha256


class _Digest(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...

    def digest(self) -> bytes: ...


class _Checksums:
    """Every checksum a header sets, taken over the bytes as they arrive."""

    def __init__(self, header: pb.PayloadHeader) -> None:
        self.wanted: list[tuple[str, bytes, _Digest]] = []
        if header.xxh3_128:
            self.wanted.append(("payload.xxh3_128", header.xxh3_128, xxhash.xxh3_128()))
        if header.sha256:
            self.wanted.append(("payload.sha256", header.sha256, hashlib.sha256()))

    def update(self, data: bytes | memoryview) -> None:
        for _, _, digest in self.wanted:
            digest.update(data)

    def verify(self) -> None:
        for field_name, expected, digest in self.wanted:
            if digest.digest() != expected:
                raise IntegrityError(field_name, "checksum does not match the bytes received")


TensorSink = Callable[[str, torch.Tensor], None]


class PayloadReader:
    """A chunked payload reassembled as it arrives and verified at the end; raises before allocating anything
    oversize. Chunks may be added from any thread, one at a time.

    A tensor whose bytes all lie in one chunk, aligned for its dtype, is a view of that chunk: nothing is copied,
    and the chunk (gRPC's received message) lives as long as the tensor. Only a tensor that spans chunks, or that
    the wire leaves misaligned, is copied, into memory of its own. The chunks passed in must not change afterwards.

    on_tensor, when given, sees each tensor as soon as its last byte is in, before the checksum is known (the
    coordinator screens an upload while the rest of it arrives): what it learns must wait for tensors() to
    verify the payload before it counts."""

    def __init__(
        self, header: pb.PayloadHeader, max_bytes: int, max_chunk_bytes: int, on_tensor: TensorSink | None = None
    ) -> None:
        self.infos = tensor_infos(header)
        if header.total_bytes > max_bytes:
            raise ResourceExhausted(f"payload of {header.total_bytes} bytes exceeds the limit of {max_bytes}")
        self.header = header
        self.max_chunk_bytes = max_chunk_bytes
        self.on_tensor = on_tensor
        self.checksums = _Checksums(header)
        self.filled = 0
        self.ends = list(itertools.accumulate(info.nbytes for info in self.infos))
        self.built: dict[str, torch.Tensor] = {}
        self.partial: np.ndarray[tuple[int], np.dtype[np.uint8]] | None = None  # the spanning tensor's bytes so far
        self.copied = 0  # bytes copied out of the chunks (the rest are viewed in place)

    def add(self, chunk: bytes | memoryview) -> None:
        """Hash one chunk and take the tensors it holds (then hand on_tensor every tensor it completes)."""
        size = len(chunk)
        if size > self.max_chunk_bytes:
            raise ResourceExhausted(f"chunk of {size} bytes exceeds the limit of {self.max_chunk_bytes}")
        if self.filled + size > self.header.total_bytes:
            raise IntegrityError("payload", f"more bytes than the declared {self.header.total_bytes}")
        self.checksums.update(chunk)
        base, self.filled = self.filled, self.filled + size
        data = np.frombuffer(chunk, dtype=np.uint8)
        while len(self.built) < len(self.infos):
            index = len(self.built)
            info = self.infos[index]
            end = self.ends[index]
            start = end - info.nbytes
            if start >= self.filled and info.nbytes:
                break  # it begins in a later chunk
            if self.partial is None and start >= base and end <= self.filled:
                tensor = self._tensor_at(chunk, data, start - base, info)
            else:
                # numpy copies without the GIL, so the gRPC threads run meanwhile.
                if self.partial is None:
                    self.partial = np.empty(info.nbytes, dtype=np.uint8)
                low, high = max(start, base), min(end, self.filled)
                np.copyto(self.partial[low - start : high - start], data[low - base : high - base])
                self.copied += high - low
                if end > self.filled:
                    break  # the rest of it comes in the next chunk
                tensor = torch.from_numpy(self.partial).view(TORCH_DTYPES[info.dtype]).reshape(info.shape)
                self.partial = None
            self.built[info.name] = tensor
            if self.on_tensor is not None:
                self.on_tensor(info.name, tensor)

    def _tensor_at(
        self, chunk: bytes | memoryview, data: np.ndarray[tuple[int], np.dtype[np.uint8]], offset: int, info: TensorInfo
    ) -> torch.Tensor:
        """The tensor stored at offset of chunk: a view of it when the address suits the dtype, else a copy."""
        dtype = TORCH_DTYPES[info.dtype]
        count = info.nbytes // DTYPE_SIZES[info.dtype]
        if not count:
            return torch.empty(info.shape, dtype=dtype)
        if (data.ctypes.data + offset) % DTYPE_SIZES[info.dtype]:
            self.copied += info.nbytes
            return torch.from_numpy(data[offset : offset + info.nbytes].copy()).view(dtype).reshape(info.shape)
        return torch.frombuffer(chunk, dtype=dtype, count=count, offset=offset).reshape(info.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The payload's tensors, once every byte is in and the checksum matches."""
        if self.filled != self.header.total_bytes:
            raise IntegrityError("payload", f"stream ended after {self.filled} of {self.header.total_bytes} bytes")
        self.checksums.verify()
        for info in self.infos[len(self.built) :]:  # empty tensors at the end, which no chunk completes
            self.built[info.name] = torch.empty(info.shape, dtype=TORCH_DTYPES[info.dtype])
        return dict(self.built)


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
# chunk (into the message, and out of it when serializing); headers still go through protobuf. Before the chunk
# goes the field `bytes align = 15`, sized so that the chunk's bytes start at a multiple of 8 into the message: the
# receiver's bytes object then holds them 8-byte aligned, and tensors of every dtype are read in place
# (PayloadReader). (A padded length varint would not do: protobuf reads no length over 5 bytes.)
CHUNK_TAG = 2 << 3 | 2
ALIGN_TAG = 15 << 3 | 2
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
        length = _varint(size)
        pad = -(3 + len(length)) % 8  # align tag and length (1 + 1), chunk tag (1), then the chunk's length
        yield b"".join([bytes([ALIGN_TAG, pad]), bytes(pad), bytes([CHUNK_TAG]), length, *views])


def chunk_view(data: bytes) -> memoryview | None:
    """The chunk of a serialized message in the plain chunk form (the align field or not, the chunk, nothing more),
    as a view of data; None for any other message (a header, or a chunk written another valid way), which protobuf
    parses."""
    pos = 0
    if data and data[0] == ALIGN_TAG:
        align = _read_varint(data, 1)
        if align is None:
            return None
        pos = align[1] + align[0]
    if len(data) <= pos or data[pos] != CHUNK_TAG:
        return None
    read = _read_varint(data, pos + 1)
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
