"""gRPC edge of the coordinator: translate each request, call one domain function, translate back.

Errors map through common.rpc's status table; unexpected ones become INTERNAL with a logged traceback.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
import torch
from fedpipe.v1 import fedpipe_pb2 as pb
from fedpipe.v1 import fedpipe_pb2_grpc as pb_grpc

from common import serde, transfer
from common.errors import FedPipeError, InvalidArgument
from common.rpc import status_for
from common.security import ServerSecurity
from coordinator.admission import Admission
from coordinator.bounds import check_agent_id
from coordinator.config import ServerSection
from coordinator.metrics import CoordinatorMetrics

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

REJECT_REASONS = {  # bounded label values for fedpipe_updates_rejected_total
    grpc.StatusCode.INVALID_ARGUMENT: "invalid",
    grpc.StatusCode.DATA_LOSS: "integrity",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "too_large",
    grpc.StatusCode.NOT_FOUND: "unknown_agent",
    grpc.StatusCode.FAILED_PRECONDITION: "stale",
    grpc.StatusCode.ALREADY_EXISTS: "duplicate",
    grpc.StatusCode.PERMISSION_DENIED: "identity",
    grpc.StatusCode.UNAUTHENTICATED: "unauthenticated",
}


def mapped(method: F) -> F:
    """Turn domain errors into gRPC statuses (the one table in common.rpc)."""

    @functools.wraps(method)
    def wrapper(self: CoordinatorServicer, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except FedPipeError as err:
            code = status_for(err)
            if method.__name__ == "UploadUpdate":
                self.metrics.updates_rejected.labels(REJECT_REASONS.get(code, "other")).inc()
            log.warning("%s refused: %s %s", method.__name__, code.name, err)
            context.abort(code, str(err))
        except Exception:
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__}: internal error (see coordinator log)")

    return wrapper  # type: ignore[return-value]


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    """fedpipe.v1.Coordinator over the agent-call handlers; every call must come from the agent it names."""

    def __init__(
        self,
        admission: Admission,
        limits: ServerSection,
        metrics: CoordinatorMetrics,
        security: ServerSecurity,
    ) -> None:
        self.admission = admission
        self.limits = limits
        self.metrics = metrics
        self.security = security
        for reason in {*REJECT_REASONS.values(), "other"}:
            metrics.updates_rejected.labels(reason)  # every reason at 0 from the start

    def _authorize(self, context: grpc.ServicerContext, agent_id: str) -> None:
        """The id has an agent id's form, and the caller is that agent."""
        check_agent_id(agent_id)
        self.security.authorize(context, agent_id)

    @mapped
    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.RegisterResponse:
        if not request.HasField("profile") or not request.HasField("model"):
            raise InvalidArgument("profile" if not request.HasField("profile") else "model", "missing")
        self._authorize(context, request.agent_id)
        info = self.admission.register(
            request.agent_id, serde.profile_from_pb(request.profile), serde.spec_from_pb(request.model)
        )
        return pb.RegisterResponse(
            run_id=info.run_id, heartbeat_interval_s=info.heartbeat_interval_s, chunk_bytes=info.chunk_bytes
        )

    @mapped
    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        self._authorize(context, request.agent_id)
        known, round_ = self.admission.heartbeat(request.agent_id, request.state)
        return pb.HeartbeatResponse(known=known, current_round=round_)

    @mapped
    def GetTask(self, request: pb.GetTaskRequest, context: grpc.ServicerContext) -> pb.GetTaskResponse:
        self._authorize(context, request.agent_id)
        return serde.task_to_pb(self.admission.get_task(request.agent_id, request.wait_s, context.is_active))

    @mapped
    def DownloadGlobal(  # type: ignore[override]  # chunks go out serialized (server.py's payload handlers)
        self, request: pb.DownloadGlobalRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.DownloadGlobalResponse | bytes]:
        self._authorize(context, request.agent_id)
        start = time.perf_counter()
        header, chunks = self.admission.download(
            request.agent_id, request.global_round, request.plan_id, self._encode_download, request.have_digest
        )
        seconds = self.metrics.download_seconds.labels(request.agent_id)
        return _download_stream(header, chunks, lambda: seconds.inc(time.perf_counter() - start))

    def _encode_download(self, tensors: dict[str, torch.Tensor]) -> tuple[pb.PayloadHeader, tuple[bytes, ...]]:
        # Cut into serialized chunk messages once: however many agents download this copy, none copies it again,
        # and later changes to the global's tensors cannot reach a download in flight.
        header, payload = transfer.encode_payload(tensors)
        return header, tuple(transfer.chunk_messages(payload, self.limits.chunk_bytes))

    @mapped
    def UploadUpdate(  # chunks arrive as views (server.py's payload handlers)
        self, request_iterator: Iterator[transfer.UploadPart], context: grpc.ServicerContext
    ) -> pb.UploadUpdateResponse:
        start = time.perf_counter()
        first = next(request_iterator, None)
        if not isinstance(first, pb.UploadUpdateRequest) or first.WhichOneof("part") != "header":
            raise InvalidArgument("header", "an upload must start with its header")
        meta = serde.update_meta_from_pb(first.header)
        self._authorize(context, meta.agent_id)
        infos = transfer.tensor_infos(first.header.payload)
        digest = bytes(first.header.payload.sha256)
        answer = self.admission.admit_update(
            meta,
            infos,
            digest,
            lambda: transfer.decode_payload(
                first.header.payload,
                _chunks(request_iterator),
                self.limits.max_upload_bytes,
                self.limits.max_chunk_bytes,
            ),
        )
        if not answer.replay:
            self.metrics.upload_seconds.labels(meta.agent_id).inc(time.perf_counter() - start)
        return pb.UploadUpdateResponse(accepted=True, round=meta.round, message=answer.message)

    @mapped
    def ReportEvaluation(
        self, request: pb.ReportEvaluationRequest, context: grpc.ServicerContext
    ) -> pb.ReportEvaluationResponse:
        self._authorize(context, request.agent_id)
        evaluation = serde.evaluation_from_pb(request)
        self.admission.report_evaluation(request.agent_id, request.global_round, evaluation)
        return pb.ReportEvaluationResponse()

    @mapped
    def ReportImportance(
        self, request: pb.ReportImportanceRequest, context: grpc.ServicerContext
    ) -> pb.ReportImportanceResponse:
        self._authorize(context, request.agent_id)
        self.admission.report_importance(request.agent_id, serde.importance_from_pb(request))
        return pb.ReportImportanceResponse()


def _download_stream(
    header: pb.PayloadHeader, chunks: tuple[bytes, ...], done: Callable[[], None]
) -> Iterator[pb.DownloadGlobalResponse | bytes]:
    yield pb.DownloadGlobalResponse(header=header)
    yield from chunks  # serialized chunk messages (transfer.serialize_part passes them through)
    done()


def _chunks(parts: Iterator[transfer.UploadPart]) -> Iterator[bytes | memoryview]:
    for index, part in enumerate(parts, start=1):
        chunk = transfer.chunk_of(part)
        if chunk is None:
            raise InvalidArgument(f"message[{index}]", "only chunks may follow the header")
        yield chunk
