"""Builds the coordinator's gRPC server: servicer, RPC latency interceptor, bound port."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
from fedpipe.v1 import fedpipe_pb2_grpc as pb_grpc

from common.metrics import CoordinatorMetrics
from common.rpc import make_server
from coordinator.config import ServerSection
from coordinator.orchestrator import Orchestrator
from coordinator.servicer import CoordinatorServicer


class LatencyInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Observes fedpipe_rpc_duration_seconds{method, code} for unary-response RPCs."""

    def __init__(self, metrics: CoordinatorMetrics) -> None:
        self.metrics = metrics

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = str(details.method).rsplit("/", 1)[-1]
        histogram = self.metrics.rpc_duration

        def timed(
            inner: Callable[[Any, grpc.ServicerContext], Any],
        ) -> Callable[[Any, grpc.ServicerContext], Any]:
            def call(request: Any, context: grpc.ServicerContext) -> Any:
                start = time.perf_counter()
                code = "OK"
                try:
                    return inner(request, context)
                except Exception:
                    status = getattr(context, "code", lambda: None)()
                    code = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
                    raise
                finally:
                    histogram.labels(method, code).observe(time.perf_counter() - start)

            return call

        if handler.unary_unary is not None:
            return handler._replace(unary_unary=timed(handler.unary_unary))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=timed(handler.stream_unary))
        return handler


def start_server(
    orchestrator: Orchestrator, section: ServerSection, metrics: CoordinatorMetrics
) -> tuple[grpc.Server, int]:
    """Start serving; returns the server and the port it bound (section.port 0 picks one)."""
    server = make_server(section.workers, interceptors=[LatencyInterceptor(metrics)])
    pb_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(orchestrator, section, metrics), server)
    port = server.add_insecure_port(f"{section.host}:{section.port}")
    if port == 0:
        raise OSError(f"server: cannot bind {section.host}:{section.port}")
    server.start()
    return server, port
