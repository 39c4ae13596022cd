"""Builds the coordinator's gRPC server: servicer, health, reflection, RPC latency interceptor, bound port."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import grpc
from fedpipe.v1 import fedpipe_pb2 as pb
from fedpipe.v1 import fedpipe_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Histogram

from common import transfer
from common.rpc import make_server
from common.security import ServerSecurity
from coordinator.admission import Admission
from coordinator.config import ServerSection
from coordinator.guard import CallGuard, wrap_handler
from coordinator.metrics import CoordinatorMetrics
from coordinator.servicer import CoordinatorServicer


@contextmanager
def _observed(histogram: Histogram, method: str, context: grpc.ServicerContext) -> Iterator[None]:
    """Time the enclosed call into histogram{method, code}, code from the context when it raised."""
    start = time.perf_counter()
    code = "OK"
    try:
        yield
    except Exception:
        status = getattr(context, "code", lambda: None)()
        code = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
        raise
    finally:
        histogram.labels(method, code).observe(time.perf_counter() - start)


class LatencyInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Observes fedpipe_rpc_duration_seconds{method, code} for every RPC of the server."""

    def __init__(self, metrics: CoordinatorMetrics) -> None:
        self.metrics = metrics

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = str(details.method).rsplit("/", 1)[-1]
        histogram = self.metrics.rpc_duration
        return wrap_handler(handler, lambda context: _observed(histogram, method, context))


SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name


@dataclass
class Serving:
    """A started server, the port it bound and its health service."""

    server: grpc.Server
    port: int
    health: health.HealthServicer

    def stop(self, grace_s: float) -> None:
        """Report NOT_SERVING to health checks, then stop taking calls."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace=grace_s).wait(grace_s + 5)


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
    admission: Admission, section: ServerSection, metrics: CoordinatorMetrics, security: ServerSecurity
) -> Serving:
    """Start serving (TLS unless security is insecure); section.port 0 picks a free port."""
    # The latency interceptor is outermost, so refusals by the guard are timed and counted with their code.
    server = make_server(
        section.workers, interceptors=[LatencyInterceptor(metrics), CallGuard(security, section, metrics)]
    )
    servicer = CoordinatorServicer(admission, section, metrics, security)
    payload = _payload_handlers(servicer)
    # Both lookups must find these two: generic handlers are asked in order (so this one goes first), and the
    # generated stubs' registered methods are looked up by name (so these entries replace the generated ones).
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, payload),))
    pb_grpc.add_CoordinatorServicer_to_server(servicer, server)
    cast(Any, server).add_registered_method_handlers(SERVICE, payload)  # grpc-stubs 1.53 predates it
    checker = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    names = (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    address = f"{section.host}:{section.port}"
    if security.credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, security.credentials)
    if port == 0:
        raise OSError(f"server: cannot bind {address}")
    server.start()
    for name in ("", SERVICE):
        checker.set(name, health_pb2.HealthCheckResponse.SERVING)
    return Serving(server, port, checker)
