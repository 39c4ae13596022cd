"""Builds the coordinator's gRPC server: servicer, health, reflection, RPC latency interceptor, bound port.

The server is grpc's asyncio server on an event loop thread of its own. A task poll that waits, and an
upload or download waiting on the network, is a coroutine, not a thread, so a thousand agents need no
tuning; what computes (payload copies, hashes, screening, encoding) and the other handlers run on
server.workers threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import grpc
from fedpipe.v1 import fedpipe_pb2 as pb
from fedpipe.v1 import fedpipe_pb2_grpc as pb_grpc
from grpc_health.v1 import _async as health_aio  # what grpc_health.v1.health.aio names, visible to mypy
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Histogram

from common import transfer
from common.rpc import SERVER_OPTIONS
from common.security import ServerSecurity
from coordinator.admission import Admission
from coordinator.config import ServerSection
from coordinator.guard import CallGuard, wrap_handler
from coordinator.metrics import CoordinatorMetrics
from coordinator.servicer import CoordinatorServicer

START_TIMEOUT_S = 30.0
DRAIN_S = 10.0  # longest a stop waits for worker threads still in a handler

log = logging.getLogger(__name__)


class _Recorded:
    """A call's context that remembers the status it was aborted with (plain handlers' contexts cannot tell)."""

    def __init__(self, context: Any) -> None:
        self._context = context
        self.aborted: grpc.StatusCode | None = None

    def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> Any:
        self.aborted = code
        # raises (plain handler) or is awaited (coroutine handler)
        return self._context.abort(code, details, trailing_metadata)

    def abort_with_status(self, status: Any) -> Any:
        self.aborted = status.code
        return self._context.abort_with_status(status)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


@contextmanager
def _observed(histogram: Histogram, method: str, context: Any) -> Iterator[_Recorded]:
    """Time the enclosed call into histogram{method, code}, code from its abort when it raised."""
    start = time.perf_counter()
    recorded = _Recorded(context)
    code = "OK"
    try:
        yield recorded
    except Exception:
        code = recorded.aborted.name if recorded.aborted is not None else "UNKNOWN"
        raise
    except BaseException:  # a coroutine handler cancelled when its client hung up
        code = "CANCELLED"
        raise
    finally:
        histogram.labels(method, code).observe(time.perf_counter() - start)


class LatencyInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Observes fedpipe_rpc_duration_seconds{method, code} for every RPC of the server."""

    def __init__(self, metrics: CoordinatorMetrics) -> None:
        self.metrics = metrics

    async def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        method = str(details.method).rsplit("/", 1)[-1]
        histogram = self.metrics.rpc_duration
        return wrap_handler(handler, lambda context: _observed(histogram, method, context))


SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name
ADMIN_SERVICE = pb.DESCRIPTOR.services_by_name["Admin"].full_name


@dataclass
class Serving:
    """A started server on its event loop thread, the port it bound and its health service."""

    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    servicer: CoordinatorServicer
    pool: ThreadPoolExecutor

    def stop(self, grace_s: float | None) -> None:
        """Report NOT_SERVING to health checks, stop taking calls (in-flight ones get grace_s), end the loop."""
        if not self.thread.is_alive():
            return
        grace = grace_s or 0.0
        try:
            asyncio.run_coroutine_threadsafe(self._stop(grace_s), self.loop).result(grace + START_TIMEOUT_S)
        finally:
            self.servicer.close()
            _drain(self.pool)
            _end_loop(self.loop, self.thread)

    async def _stop(self, grace_s: float | None) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


def _payload_handlers(servicer: CoordinatorServicer) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """UploadUpdate and DownloadGlobal with common.transfer's chunk (de)serializers instead of protobuf's."""
    return {
        "UploadUpdate": grpc.stream_unary_rpc_method_handler(
            servicer.UploadUpdate,
            request_deserializer=transfer.parse_upload_part,
            response_serializer=pb.UploadUpdateResponse.SerializeToString,
        ),
        "DownloadGlobal": grpc.unary_stream_rpc_method_handler(
            servicer.DownloadGlobal,
            request_deserializer=pb.DownloadGlobalRequest.FromString,
            response_serializer=transfer.serialize_part,
        ),
    }


def start_server(
    admission: Admission | None,
    section: ServerSection,
    metrics: CoordinatorMetrics,
    security: ServerSecurity,
    admin: pb_grpc.AdminServicer | None = None,
) -> Serving:
    """Start serving (TLS unless security is insecure); section.port 0 picks a free port. admission: the run
    agents' calls go to (None: none yet, see CoordinatorServicer.attach); admin: the admin API, if any.

    OSError when the address cannot be bound; nothing is left running then.
    """
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="grpc-asyncio", daemon=True)
    thread.start()
    pool = ThreadPoolExecutor(max_workers=section.workers, thread_name_prefix="grpc-worker")
    servicer = CoordinatorServicer(admission, section, metrics, security, loop, pool)
    started = asyncio.run_coroutine_threadsafe(_start(servicer, section, metrics, security, pool, admin), loop)
    try:
        server, port, checker = started.result(START_TIMEOUT_S)
    except BaseException:
        servicer.close()
        _drain(pool)
        _end_loop(loop, thread)
        raise
    return Serving(server, port, checker, loop, thread, servicer, pool)


def _drain(pool: ThreadPoolExecutor) -> None:
    """Let worker threads still in a handler finish while the loop runs (one waiting for a stream's next
    message needs it), for at most DRAIN_S; one still stuck then is logged, not waited for."""
    drained = threading.Thread(target=pool.shutdown, kwargs={"wait": True, "cancel_futures": True}, daemon=True)
    drained.start()
    drained.join(DRAIN_S)
    if drained.is_alive():
        log.warning("server: worker threads still in a handler %.0fs after the server stopped", DRAIN_S)


async def _cancel_rest() -> None:
    """Cancel what still runs on the loop (the lag watch, a handler grpc left behind) and let it unwind."""
    rest = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in rest:
        task.cancel()
    await asyncio.gather(*rest, return_exceptions=True)


def _end_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    with contextlib.suppress(Exception):  # a loop that no longer runs has nothing left to cancel
        asyncio.run_coroutine_threadsafe(_cancel_rest(), loop).result(DRAIN_S)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(START_TIMEOUT_S)
    if not thread.is_alive():
        loop.close()


async def _start(
    servicer: CoordinatorServicer,
    section: ServerSection,
    metrics: CoordinatorMetrics,
    security: ServerSecurity,
    pool: ThreadPoolExecutor,
    admin: pb_grpc.AdminServicer | None,
) -> tuple[grpc.aio.Server, int, health_aio.HealthServicer]:
    # The latency interceptor is outermost, so refusals by the guard are timed and counted with their code.
    server = grpc.aio.server(
        migration_thread_pool=pool,
        interceptors=[LatencyInterceptor(metrics), CallGuard(security, section, metrics)],
        options=SERVER_OPTIONS,
    )
    payload = _payload_handlers(servicer)
    # Both lookups must find these two: generic handlers are asked in order (so this one goes first), and the
    # generated stubs' registered methods are looked up by name (so these entries replace the generated ones).
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, payload),))
    pb_grpc.add_CoordinatorServicer_to_server(servicer, server)
    cast(Any, server).add_registered_method_handlers(SERVICE, payload)  # grpc-stubs 1.53 predates it
    names: tuple[str, ...] = (SERVICE,)
    if admin is not None:
        pb_grpc.add_AdminServicer_to_server(admin, server)
        names += (ADMIN_SERVICE,)
    checker = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    names += (health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    address = f"{section.host}:{section.port}"
    try:
        try:
            if security.credentials is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, security.credentials)
        except RuntimeError as err:  # grpc's asyncio server raises where the threaded one returned 0
            raise OSError(f"server: cannot bind {address}: {err}") from None
        if port == 0:
            raise OSError(f"server: cannot bind {address}")
        await server.start()
        for name in ("", SERVICE):
            await checker.set(name, health_pb2.HealthCheckResponse.SERVING)
    except BaseException:
        await server.stop(None)  # nothing half-started stays bound
        raise
    return server, port, checker
