"""gRPC edge of the admin API (fedpipe.v1.Admin): submit, list, inspect, cancel and follow runs.

Every call must come from an admin (common.security: an `admin:NAME` certificate or admin token); an
agent's credentials are refused with PERMISSION_DENIED. The API shares the agents' port and call limits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from fedpipe.v1 import fedpipe_pb2 as pb
from fedpipe.v1 import fedpipe_pb2_grpc as pb_grpc

from common.security import ServerSecurity
from coordinator.jobs import Job
from coordinator.servicer import amapped, mapped

if TYPE_CHECKING:
    from coordinator.service import Service

log = logging.getLogger(__name__)
FOLLOW_S = 0.5  # how often a followed log is read again
MAX_LINES = 256  # lines per message of a log stream


class AdminServicer(pb_grpc.AdminServicer):
    """fedpipe.v1.Admin over a Service."""

    def __init__(self, service: Service, security: ServerSecurity) -> None:
        self.service = service
        self.security = security

    def _status(self, job: Job) -> pb.RunStatus:
        service = self.service
        progress = service.progress(job)
        status = pb.RunStatus(
            run_id=job.run_id,
            name=job.name,
            state=job.state,
            submitted_at=job.submitted_at,
            started_at=job.started_at,
            ended_at=job.ended_at,
            message=job.message,
            run_dir=str(service.run_dir(job)),
            queue_position=service.queue.position(job.run_id),
        )
        if progress is not None:
            status.round, status.rounds, status.agents = progress.round, progress.rounds, progress.agents
        if job.final_accuracy is not None:
            status.has_accuracy, status.final_accuracy = True, job.final_accuracy
        return status

    @mapped
    def SubmitRun(self, request: pb.SubmitRunRequest, context: grpc.ServicerContext) -> pb.RunStatus:
        who = self.security.admin(context)
        job = self.service.submit(request.config_yaml, request.name)
        log.info("run %s submitted by %s", job.run_id, who)
        return self._status(job)

    @mapped
    def ListRuns(self, request: pb.ListRunsRequest, context: grpc.ServicerContext) -> pb.ListRunsResponse:
        self.security.admin(context)
        return pb.ListRunsResponse(runs=[self._status(job) for job in self.service.queue.all()])

    @mapped
    def GetRun(self, request: pb.GetRunRequest, context: grpc.ServicerContext) -> pb.RunStatus:
        self.security.admin(context)
        return self._status(self.service.queue.get(request.run_id))

    @mapped
    def CancelRun(self, request: pb.CancelRunRequest, context: grpc.ServicerContext) -> pb.RunStatus:
        who = self.security.admin(context)
        job = self.service.cancel(request.run_id)
        log.warning("run %s: cancelled by %s", job.run_id, who)
        return self._status(job)

    @amapped
    async def _check_logs(self, request: pb.StreamLogsRequest, context: Any) -> Job:
        self.security.admin(context)
        return self.service.queue.get(request.run_id)

    async def StreamLogs(  # an asyncio generator: a followed log holds no thread
        self, request: pb.StreamLogsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.LogLines]:
        job = await self._check_logs(request, context)
        path = self.service.log_path(job)
        offset = 0
        first = True
        while True:
            lines: list[str] = []
            data = await asyncio.to_thread(_read_from, path, offset)  # file reads off the event loop
            if data:
                whole = data[: data.rfind(b"\n") + 1]  # a line still being written waits for its end
                offset += len(whole)
                lines = whole.decode("utf-8", errors="replace").splitlines()
                if first and request.tail:
                    lines = lines[-request.tail :]
                for start in range(0, len(lines), MAX_LINES):
                    yield pb.LogLines(lines=lines[start : start + MAX_LINES])
            first = False
            job = self.service.queue.get(job.run_id)
            if not request.follow or (job.ended and not lines):
                return
            await asyncio.sleep(FOLLOW_S)


def _read_from(path: Path, offset: int) -> bytes:
    """What the file holds after offset; nothing while it does not exist."""
    try:
        with path.open("rb") as log_file:
            log_file.seek(offset)
            return log_file.read()
    except FileNotFoundError:
        return b""
