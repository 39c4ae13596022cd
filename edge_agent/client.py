"""The agent's only gRPC user: typed calls, retries with backoff, chunked upload and download."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

import grpc
import torch
from fedpipe.v1 import fedpipe_pb2 as pb
from fedpipe.v1 import fedpipe_pb2_grpc as pb_grpc

from common import serde, transfer
from common.errors import Rejected, ServerUnavailable, UnknownAgent
from common.rpc import RetryPolicy, make_channel
from common.types import DeviceProfile, Evaluation, ImportanceReport, ModelSpec, Task, UpdateMeta
from edge_agent.metrics import AgentMetrics
from edge_agent.workspace import RunDescription

T = TypeVar("T")

RETRIED = (
    "DescribeRun",
    "Register",
    "GetTask",
    "DownloadGlobal",
    "UploadUpdate",
    "ReportEvaluation",
    "ReportImportance",
    "AdvertiseKeys",  # the three secure-aggregation steps take an identical resend
    "ShareKeys",
    "Unmask",
)
MAX_DOWNLOAD_BYTES = 1 << 31  # the global adapter of a 70B model at rank 64 all-linear is far below this


class CoordinatorClient:
    """Typed access to the coordinator's service for one agent."""

    def __init__(
        self,
        address: str,
        agent_id: str,
        metrics: AgentMetrics,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.metrics = metrics
        self.retry = retry or RetryPolicy()
        self.channel = make_channel(address, credentials, server_name)
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        # The payload streams with common.transfer's chunk (de)serializers instead of protobuf's.
        self.upload_stream = self.channel.stream_unary(
            transfer.UPLOAD_METHOD,
            request_serializer=transfer.serialize_part,
            response_deserializer=pb.UploadUpdateResponse.FromString,
        )
        self.download_stream = self.channel.unary_stream(
            transfer.DOWNLOAD_METHOD,
            request_serializer=pb.DownloadGlobalRequest.SerializeToString,
            response_deserializer=transfer.parse_download_part,
        )
        self.chunk_bytes = transfer.DEFAULT_CHUNK_BYTES
        self.last_answer = float("-inf")  # monotonic time the coordinator last answered (readiness)
        self.run_id = ""  # the run the last registration joined
        for method in RETRIED:
            metrics.rpc_retries.labels(method)  # at 0 from the start

    def _call(self, fn: Callable[[], T], what: str, method: str) -> T:
        """fn with retries; any answer from the coordinator, refusals included, shows it is reachable."""
        try:
            result = _translate(lambda: self.retry.call(fn, what, self._retrying(method)))
        except (Rejected, UnknownAgent):
            self.last_answer = time.monotonic()
            raise
        self.last_answer = time.monotonic()
        return result

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def _retrying(self, method: str) -> Callable[[], None]:
        """A callback that counts one retry of method."""
        return lambda: self.metrics.rpc_retries.labels(method).inc()

    def describe_run(self) -> RunDescription | None:
        """What the coordinator's current run trains; None from a coordinator that cannot say (an older one)."""
        request = pb.DescribeRunRequest(agent_id=self.agent_id)
        try:
            response = self._call(lambda: self.stub.DescribeRun(request, timeout=30), "describe run", "DescribeRun")
        except Rejected as err:
            if err.status == "UNIMPLEMENTED":
                return None
            raise
        return RunDescription(
            response.run_id,
            response.model,
            response.task,
            response.include_mlp,
            tuple(response.candidates),
            response.dataset,
        )

    def register(self, profile: DeviceProfile, spec: ModelSpec, version: str) -> float:
        """Register; returns the heartbeat interval the coordinator asks for."""
        request = pb.RegisterRequest(
            agent_id=self.agent_id,
            profile=serde.profile_to_pb(profile),
            model=serde.spec_to_pb(spec),
            agent_version=version,
        )
        response = self._call(lambda: self.stub.Register(request, timeout=30), "register", "Register")
        if response.chunk_bytes:
            self.chunk_bytes = int(response.chunk_bytes)
        self.run_id = response.run_id
        return float(response.heartbeat_interval_s)

    def heartbeat(self, state: str) -> bool:
        """One heartbeat; False when the coordinator no longer knows this agent."""
        request = pb.HeartbeatRequest(agent_id=self.agent_id, state=state)
        try:
            response = self.stub.Heartbeat(request, timeout=10)
        except grpc.RpcError as err:
            code = err.code().name if isinstance(err, grpc.Call) else "?"
            details = err.details() if isinstance(err, grpc.Call) else str(err)
            raise ServerUnavailable(f"heartbeat: {code}: {(details or '').splitlines()[0][:160]}") from None
        self.last_answer = time.monotonic()
        return bool(response.known)

    def get_task(self, wait_s: float) -> Task:
        """Long-poll for the next task."""
        request = pb.GetTaskRequest(agent_id=self.agent_id, wait_s=wait_s)
        response = self._call(lambda: self.stub.GetTask(request, timeout=wait_s + 30), "get task", "GetTask")
        return serde.task_from_pb(response)

    def download(self, global_round: int, plan_id: str, have_digest: str = "") -> dict[str, torch.Tensor]:
        """The global for this agent's plan, reassembled and checksum-verified (Ferret: relative to the weights
        whose digest it names)."""
        request = pb.DownloadGlobalRequest(
            agent_id=self.agent_id, global_round=global_round, plan_id=plan_id, have_digest=have_digest
        )

        def fetch() -> dict[str, torch.Tensor]:
            start = time.perf_counter()
            stream: Iterator[transfer.DownloadPart] = iter(self.download_stream(request, timeout=300))
            first = next(stream)
            if not isinstance(first, pb.DownloadGlobalResponse) or first.WhichOneof("part") != "header":
                raise Rejected("DATA_LOSS", "download did not start with a header")
            tensors = transfer.decode_payload(
                first.header, _chunks(stream), MAX_DOWNLOAD_BYTES, transfer.DEFAULT_CHUNK_BYTES * 2
            )
            self.metrics.download_bytes.inc(first.header.total_bytes)
            self.metrics.download_seconds.inc(time.perf_counter() - start)
            return tensors

        return self._call(fetch, "download", "DownloadGlobal")

    def upload(self, meta: UpdateMeta, tensors: Mapping[str, torch.Tensor]) -> str:
        """Stream the update as a header and chunks; returns the coordinator's message."""
        header, payload = transfer.encode_payload(tensors)

        def messages() -> Iterator[pb.UploadUpdateRequest | bytes]:
            yield pb.UploadUpdateRequest(header=serde.update_header_to_pb(meta, header))
            yield from transfer.chunk_messages(payload, self.chunk_bytes)

        def send() -> pb.UploadUpdateResponse:
            start = time.perf_counter()
            response: pb.UploadUpdateResponse = self.upload_stream(messages(), timeout=300)
            self.metrics.upload_bytes.inc(len(payload))
            self.metrics.upload_seconds.inc(time.perf_counter() - start)
            return response

        # A retry after a lost answer resends the same bytes; the coordinator acknowledges such a replay.
        response = self._call(send, "upload", "UploadUpdate")
        return str(response.message)

    def report_evaluation(self, global_round: int, evaluation: Evaluation) -> None:
        """Send the loss, accuracy and confusion matrix of a global adapter on the local validation split."""
        request = serde.evaluation_to_pb(self.agent_id, global_round, evaluation)
        self._call(lambda: self.stub.ReportEvaluation(request, timeout=30), "report", "ReportEvaluation")

    def report_importance(self, report: ImportanceReport) -> None:
        """Send the probe's score per candidate matrix."""
        request = serde.importance_to_pb(self.agent_id, report)
        self._call(lambda: self.stub.ReportImportance(request, timeout=30), "report importance", "ReportImportance")

    def advertise_keys(
        self, round_: int, plan_id: str, keys: tuple[bytes, bytes], proof: tuple[bytes, bytes] | None = None
    ) -> None:
        """Secure aggregation: the agent's two public keys for the round, after training (signed: with its
        certificate and signature)."""
        request = pb.AdvertiseKeysRequest(
            agent_id=self.agent_id, round=round_, plan_id=plan_id, keys=serde.peer_keys_to_pb(keys, proof)
        )
        self._call(lambda: self.stub.AdvertiseKeys(request, timeout=30), "advertise keys", "AdvertiseKeys")

    def share_keys(self, round_: int, sealed: Mapping[str, bytes]) -> None:
        """Secure aggregation: the sealed shares, one per neighbour."""
        request = pb.ShareKeysRequest(agent_id=self.agent_id, round=round_, sealed=dict(sealed))
        self._call(lambda: self.stub.ShareKeys(request, timeout=30), "share keys", "ShareKeys")

    def unmask(self, round_: int, revealed: Mapping[str, tuple[str, int]]) -> None:
        """Secure aggregation: the shares that unmask the sum."""
        request = serde.revealed_to_pb(self.agent_id, round_, revealed)
        self._call(lambda: self.stub.Unmask(request, timeout=30), "unmask", "Unmask")


def _translate(fn: Callable[[], T]) -> T:
    """Run a call; NOT_FOUND becomes UnknownAgent, other refusals Rejected with the server's reason."""
    try:
        return fn()
    except grpc.RpcError as err:
        if not isinstance(err, grpc.Call):
            raise
        code, details = err.code(), err.details() or ""
        if code == grpc.StatusCode.NOT_FOUND:
            raise UnknownAgent(details) from err
        raise Rejected(code.name, details) from err


def _chunks(parts: Iterator[transfer.DownloadPart]) -> Iterator[bytes | memoryview]:
    for part in parts:
        chunk = transfer.chunk_of(part)
        if chunk is None:
            raise Rejected("DATA_LOSS", "a download part after the header is not a chunk")
        yield chunk
