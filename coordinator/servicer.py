"""gRPC edge of the coordinator: translate each request, call one domain function, translate back.

Errors map through common.rpc's status table; unexpected ones become INTERNAL with a logged traceback.
Heartbeat, GetTask, DownloadGlobal and UploadUpdate are coroutines on the server's event loop (a call that
waits on the network or the round holds no thread; their computing runs on worker threads); the other
handlers run on the server's worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc
import torch
from fedpipe.v1 import fedpipe_pb2 as pb
from fedpipe.v1 import fedpipe_pb2_grpc as pb_grpc

from common import serde, transfer
from common.errors import FedPipeError, InvalidArgument, UnknownAgent
from common.rpc import status_for
from common.security import ServerSecurity
from common.types import Task
from coordinator.admission import Admission, UploadAnswer
from coordinator.bounds import check_agent_id
from coordinator.config import ServerSection
from coordinator.metrics import CoordinatorMetrics
from coordinator.round_state import POLL_S

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
A = TypeVar("A", bound=Callable[..., Awaitable[Any]])
T = TypeVar("T")

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


def _refusal(servicer: Any, name: str, err: Exception) -> tuple[grpc.StatusCode, str]:
    """The status a handler's exception is answered with, counted and logged."""
    if not isinstance(err, FedPipeError):
        log.error("%s failed", name, exc_info=err)
        return grpc.StatusCode.INTERNAL, f"{name}: internal error (see coordinator log)"
    code = status_for(err)
    if name == "UploadUpdate":
        servicer.metrics.updates_rejected.labels(REJECT_REASONS.get(code, "other")).inc()
    log.warning("%s refused: %s %s", name, code.name, err)
    return code, str(err)


def mapped(method: F) -> F:
    """Turn domain errors into gRPC statuses (the one table in common.rpc), for a handler on a worker thread."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as err:
            context.abort(*_refusal(self, method.__name__, err))

    return wrapper  # type: ignore[return-value]


def amapped(method: A) -> A:
    """mapped, for a coroutine handler on the event loop."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await method(self, request, context)
        except Exception as err:
            await context.abort(*_refusal(self, method.__name__, err))

    return wrapper  # type: ignore[return-value]


class Wakeup:
    """Wakes coroutines of one event loop when the round state changes, from whichever thread changed it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.event = asyncio.Event()  # replaced by a fresh one at each ring: a waiter holds the one it saw
        self.pending = False  # a ring is queued on the loop; bursts of changes coalesce into it

    def ring(self) -> None:
        """Called under the state's lock by notify(): schedule the wake, never block."""
        if not self.pending:
            self.pending = True
            self.loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        self.pending = False
        event, self.event = self.event, asyncio.Event()
        event.set()

    async def wait(self, event: asyncio.Event, timeout_s: float) -> None:
        """Until event is set (a change since it was taken) or timeout_s passed."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), max(timeout_s, 0.0))


async def _watch_lag(metrics: CoordinatorMetrics, period_s: float = 1.0, window: int = 10) -> None:
    """fedpipe_event_loop_lag_seconds: how late a period_s sleep wakes, the worst of the last window sleeps.
    A loop blocked by a handler (or starved of the GIL) shows here before heartbeats time out."""
    loop = asyncio.get_running_loop()
    recent: list[float] = []
    while True:
        due = loop.time() + period_s
        await asyncio.sleep(period_s)
        recent = [*recent[-(window - 1) :], max(0.0, loop.time() - due)]
        metrics.loop_lag.set(max(recent))


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    """fedpipe.v1.Coordinator over the agent-call handlers; every call must come from the agent it names."""

    def __init__(
        self,
        admission: Admission | None,
        limits: ServerSection,
        metrics: CoordinatorMetrics,
        security: ServerSecurity,
        loop: asyncio.AbstractEventLoop,
        pool: Executor,
    ) -> None:
        """admission: the run the calls go to; None until a serving coordinator starts its first run."""
        self.current: Admission | None = None
        self.limits = limits
        self.metrics = metrics
        self.security = security
        self.loop = loop
        self.pool = pool
        self.wakeup = Wakeup(loop)
        if admission is not None:
            self.attach(admission)
        self.lag_watch = asyncio.run_coroutine_threadsafe(_watch_lag(metrics), loop)
        for reason in {*REJECT_REASONS.values(), "other"}:
            metrics.updates_rejected.labels(reason)  # every reason at 0 from the start

    @property
    def admission(self) -> Admission:
        """The run agents' calls go to now."""
        current = self.current
        if current is None:  # an agent of a run before a restart: registering again tells it to wait
            raise UnknownAgent("no run is active on this coordinator; register again to wait for one")
        return current

    def attach(self, admission: Admission) -> None:
        """Send agents' calls to this run from now on (a serving coordinator's next run); waiting polls look
        again. The run before stays reachable through calls already under way."""
        self._detach()
        with admission.state.cond:
            admission.state.watchers.append(self.wakeup.ring)
        self.current = admission
        self.wakeup.ring()

    def detach(self) -> None:
        """No run from now on: registrations are answered "no run yet", and waiting polls look again."""
        self._detach()
        self.current = None
        self.wakeup.ring()

    def _detach(self) -> None:
        if self.current is None:
            return
        state = self.current.state
        with state.cond:
            if self.wakeup.ring in state.watchers:
                state.watchers.remove(self.wakeup.ring)

    def close(self) -> None:
        """Stop being woken by the round state (the server is gone)."""
        self._detach()
        self.lag_watch.cancel()

    def _authorize(self, context: Any, agent_id: str) -> None:
        """The id has an agent id's form, and the caller is that agent."""
        check_agent_id(agent_id)
        self.security.authorize(context, agent_id)

    @mapped
    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.RegisterResponse:
        if not request.HasField("profile") or not request.HasField("model"):
            raise InvalidArgument("profile" if not request.HasField("profile") else "model", "missing")
        self._authorize(context, request.agent_id)
        if self.current is None:  # serving, no run yet: an empty run id tells the agent to wait for one
            return pb.RegisterResponse(run_id="", heartbeat_interval_s=5.0, chunk_bytes=self.limits.chunk_bytes)
        info = self.admission.register(
            request.agent_id, serde.profile_from_pb(request.profile), serde.spec_from_pb(request.model)
        )
        return pb.RegisterResponse(
            run_id=info.run_id, heartbeat_interval_s=info.heartbeat_interval_s, chunk_bytes=info.chunk_bytes
        )

    @amapped
    async def Heartbeat(  # a coroutine on the event loop (the registry's lock is brief)
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.HeartbeatResponse:
        self._authorize(context, request.agent_id)
        if self.current is None:
            return pb.HeartbeatResponse(known=False, current_round=0)
        known, round_ = self.admission.heartbeat(request.agent_id, request.state)
        return pb.HeartbeatResponse(known=known, current_round=round_)

    @amapped
    async def GetTask(  # a coroutine: a waiting poll holds no thread
        self, request: pb.GetTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetTaskResponse:
        self._authorize(context, request.agent_id)
        agent_id = request.agent_id
        admission = self.admission  # the run this poll asked; a switch to the next one wakes it
        end = admission.open_poll(agent_id, request.wait_s)
        clock = admission.state.clock
        self.metrics.polls_open.inc()
        try:
            while True:
                changed = self.wakeup.event  # taken before looking, so a change made meanwhile wakes the wait
                remaining = end - clock()
                task = await self._next_task(admission, agent_id, final=remaining <= 0)
                if task is not None:
                    return serde.task_to_pb(task)
                # Re-looks at least every POLL_S, as the threaded poll does, so an injected clock is followed.
                await self.wakeup.wait(changed, min(remaining, POLL_S))
        finally:
            self.metrics.polls_open.dec()

    async def _next_task(self, admission: Admission, agent_id: str, final: bool) -> Task | None:
        # On the loop when the state's lock is free (the usual case: its holders are brief); on a worker
        # thread when it is held, so the loop never blocks on it.
        cond = admission.state.cond
        if cond.acquire(blocking=False):
            try:
                return admission.next_task(agent_id, final)
            finally:
                cond.release()
        return await self._on_worker(admission.next_task, agent_id, final)

    async def DownloadGlobal(  # type: ignore[override]  # chunks go out serialized (server.py's payload handlers)
        self, request: pb.DownloadGlobalRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.DownloadGlobalResponse | bytes]:
        # An asyncio generator: a client that reads slowly, or never, holds no thread (gRPC awaits each write),
        # while the encoding of the global (once per global and plan) runs on a worker thread.
        start = time.perf_counter()
        try:
            self._authorize(context, request.agent_id)
            header, chunks = await self._on_worker(
                self.admission.download,
                request.agent_id,
                request.global_round,
                request.plan_id,
                self._encode_download,
                request.have_digest,
            )
        except Exception as err:
            await context.abort(*_refusal(self, "DownloadGlobal", err))
        yield pb.DownloadGlobalResponse(header=header)
        for chunk in chunks:
            yield chunk  # a serialized chunk message (transfer.serialize_part passes it through)
        self.metrics.download_seconds.labels(request.agent_id).inc(time.perf_counter() - start)

    def _encode_download(self, tensors: dict[str, torch.Tensor]) -> tuple[pb.PayloadHeader, tuple[bytes, ...]]:
        # Cut into serialized chunk messages once: however many agents download this copy, none copies it again,
        # and later changes to the global's tensors cannot reach a download in flight.
        header, payload = transfer.encode_payload(tensors)
        return header, tuple(transfer.chunk_messages(payload, self.limits.chunk_bytes))

    @amapped
    async def UploadUpdate(  # chunks arrive as views (server.py's payload handlers)
        self, request_iterator: AsyncIterator[transfer.UploadPart], context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.UploadUpdateResponse:
        # A coroutine: while its chunks are on the way (a slow link, a trickling client) it holds no thread;
        # the header's checks, each chunk's copy and hash, and the screening of each tensor it completes run on
        # worker threads.
        start = time.perf_counter()
        first = await anext(request_iterator, None)
        if not isinstance(first, pb.UploadUpdateRequest) or first.WhichOneof("part") != "header":
            raise InvalidArgument("header", "an upload must start with its header")
        meta = serde.update_meta_from_pb(first.header)
        self._authorize(context, meta.agent_id)
        infos = transfer.tensor_infos(first.header.payload)
        digest = transfer.checksum_key(first.header.payload)
        admission = self.admission  # opened and finished in one run, whatever starts meanwhile
        opened = await self._on_worker(admission.open_update, meta, infos, digest)
        if isinstance(opened, UploadAnswer):
            answer = opened  # a replay: acknowledged unread
        else:
            screening = admission.screening(opened)  # each tensor checked on the worker that copies its last byte
            reader = transfer.PayloadReader(
                first.header.payload,
                self.limits.max_upload_bytes,
                self.limits.max_chunk_bytes,
                screening.tensor if screening is not None else None,
            )
            index = 0
            async for part in request_iterator:
                index += 1
                chunk = transfer.chunk_of(part)
                if chunk is None:
                    raise InvalidArgument(f"message[{index}]", "only chunks may follow the header")
                await self._on_worker(reader.add, chunk)
            answer = await self._on_worker(lambda: admission.finish_update(opened, reader.tensors(), screening))
        if not answer.replay:
            self.metrics.upload_seconds.labels(meta.agent_id).inc(time.perf_counter() - start)
        return pb.UploadUpdateResponse(accepted=True, round=meta.round, message=answer.message)

    async def _on_worker(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on one of the server's worker threads, awaited from the loop."""
        return await self.loop.run_in_executor(self.pool, functools.partial(fn, *args))

    @mapped
    def ReportEvaluation(
        self, request: pb.ReportEvaluationRequest, context: grpc.ServicerContext
    ) -> pb.ReportEvaluationResponse:
        self._authorize(context, request.agent_id)
        evaluation = serde.evaluation_from_pb(request)
        self.admission.report_evaluation(request.agent_id, request.global_round, evaluation)
        return pb.ReportEvaluationResponse()

    @mapped
    def AdvertiseKeys(
        self, request: pb.AdvertiseKeysRequest, context: grpc.ServicerContext
    ) -> pb.AdvertiseKeysResponse:
        self._authorize(context, request.agent_id)
        keys = (request.keys.share_key, request.keys.mask_key)
        proof = (request.keys.certificate, request.keys.signature) if request.keys.certificate else None
        self.admission.advertise_keys(request.agent_id, request.round, request.plan_id, keys, proof)
        return pb.AdvertiseKeysResponse()

    @mapped
    def ShareKeys(self, request: pb.ShareKeysRequest, context: grpc.ServicerContext) -> pb.ShareKeysResponse:
        self._authorize(context, request.agent_id)
        self.admission.share_keys(request.agent_id, request.round, dict(request.sealed))
        return pb.ShareKeysResponse()

    @mapped
    def Unmask(self, request: pb.UnmaskRequest, context: grpc.ServicerContext) -> pb.UnmaskResponse:
        self._authorize(context, request.agent_id)
        self.admission.unmask(request.agent_id, request.round, serde.revealed_from_pb(request))
        return pb.UnmaskResponse()

    @mapped
    def DescribeRun(self, request: pb.DescribeRunRequest, context: grpc.ServicerContext) -> pb.DescribeRunResponse:
        self._authorize(context, request.agent_id)
        current = self.current
        if current is None:
            return pb.DescribeRunResponse(run_id="")
        model = current.config.model
        return pb.DescribeRunResponse(
            run_id=current.state.run_id,
            model=model.name or model.path,
            task=current.registry.spec.task,
            include_mlp=model.include_mlp,
            candidates=model.candidates or [],
            dataset=current.config.run.dataset,
        )

    @mapped
    def ReportImportance(
        self, request: pb.ReportImportanceRequest, context: grpc.ServicerContext
    ) -> pb.ReportImportanceResponse:
        self._authorize(context, request.agent_id)
        self.admission.report_importance(request.agent_id, serde.importance_from_pb(request))
        return pb.ReportImportanceResponse()
