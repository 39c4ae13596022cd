"""gRPC plumbing for both sides: channel and server factories, the error -> status table, retries."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from common import errors

log = logging.getLogger(__name__)

T = TypeVar("T")

# Chunks stay at a few MiB, so gRPC's default 4 MiB limit is kept on purpose (ARCHITECTURE.md, 10).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

# One table from domain errors to status codes; the first matching class wins (subclasses first).
STATUS_TABLE: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.IntegrityError, grpc.StatusCode.DATA_LOSS),
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ModelMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.UnknownAgent, grpc.StatusCode.NOT_FOUND),
    (errors.StaleRound, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.AlreadyUploaded, grpc.StatusCode.ALREADY_EXISTS),
    (errors.NotReady, grpc.StatusCode.UNAVAILABLE),
)


def status_for(error: Exception) -> grpc.StatusCode:
    """The gRPC status of a domain error; INTERNAL for anything unexpected."""
    for cls, code in STATUS_TABLE:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def make_server(max_workers: int, interceptors: Sequence[grpc.ServerInterceptor[Any, Any]] = ()) -> grpc.Server:
    """A gRPC server with FedPipe's message limits and keepalive settings."""
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers), interceptors=list(interceptors), options=_OPTIONS
    )


def make_channel(address: str) -> grpc.Channel:
    """A plaintext channel to the coordinator (TLS arrives with the security work)."""
    return grpc.insecure_channel(address, options=_OPTIONS)


RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter for idempotent calls."""

    attempts: int = 8
    initial_s: float = 0.25
    max_s: float = 8.0

    def call(self, fn: Callable[[], T], what: str, on_retry: Callable[[], None] | None = None) -> T:
        """Run fn, retrying retryable gRPC errors; ServerUnavailable when every attempt failed."""
        delay = self.initial_s
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except grpc.RpcError as err:
                code = err.code() if isinstance(err, grpc.Call) else None
                if code not in RETRYABLE or attempt == self.attempts:
                    if code in RETRYABLE:
                        raise errors.ServerUnavailable(
                            f"{what}: coordinator unreachable after {attempt} tries"
                        ) from err
                    raise
                if on_retry is not None:
                    on_retry()
                sleep = random.uniform(0, delay)
                log.warning("%s failed (%s), retry %d/%d in %.1fs", what, code, attempt, self.attempts - 1, sleep)
                time.sleep(sleep)
                delay = min(delay * 2, self.max_s)
        raise AssertionError("unreachable")  # pragma: no cover
