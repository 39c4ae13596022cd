"""gRPC plumbing for both sides: channel factory and server options, the error -> status table, retries."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

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
SERVER_OPTIONS = tuple(_OPTIONS)  # the coordinator builds its (asyncio) server with these

# One table from domain errors to status codes; the first matching class wins (subclasses first).
STATUS_TABLE: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.IntegrityError, grpc.StatusCode.DATA_LOSS),
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ModelMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.UnknownAgent, grpc.StatusCode.NOT_FOUND),
    (errors.UnknownRun, grpc.StatusCode.NOT_FOUND),
    (errors.StaleRound, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.AlreadyUploaded, grpc.StatusCode.ALREADY_EXISTS),
    (errors.NotReady, grpc.StatusCode.UNAVAILABLE),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
)


def status_for(error: Exception) -> grpc.StatusCode:
    """The gRPC status of a domain error; INTERNAL for anything unexpected."""
    for cls, code in STATUS_TABLE:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def make_channel(
    address: str, credentials: grpc.ChannelCredentials | None, server_name: str | None = None
) -> grpc.Channel:
    """A channel to the coordinator: TLS with credentials, plaintext with None (--insecure)."""
    if credentials is None:
        return grpc.insecure_channel(address, options=_OPTIONS)
    options = [*_OPTIONS, ("grpc.ssl_target_name_override", server_name)] if server_name else _OPTIONS
    return grpc.secure_channel(address, credentials, options=options)


RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter for idempotent calls, for up to give_up_s.

    The default outlasts a coordinator restart (model load, resume) so agents need no operator.
    """

    give_up_s: float = 900.0
    initial_s: float = 0.25
    max_s: float = 8.0
    # Set by a stop request (SIGTERM): the wait between tries ends and the call raises errors.Stopped, so a
    # process told to stop while the coordinator is unreachable does not retry for give_up_s first.
    stop: threading.Event | None = field(default=None, compare=False)

    def call(self, fn: Callable[[], T], what: str, on_retry: Callable[[], None] | None = None) -> T:
        """Run fn, retrying retryable gRPC errors; ServerUnavailable once give_up_s has passed."""
        delay = self.initial_s
        start = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except grpc.RpcError as err:
                code = err.code() if isinstance(err, grpc.Call) else None
                if code not in RETRYABLE:
                    raise
                elapsed = time.monotonic() - start
                if elapsed >= self.give_up_s:
                    raise errors.ServerUnavailable(
                        f"{what}: coordinator unreachable for {elapsed:.0f}s ({attempt} tries)"
                    ) from err
                if on_retry is not None:
                    on_retry()
                sleep = min(random.uniform(0, delay), max(self.give_up_s - elapsed, 0.0))
                # the first tries are routine (a busy server); say it loudly once it looks like an outage
                level = logging.INFO if attempt < 4 else logging.WARNING
                log.log(level, "%s failed (%s), retry %d in %.1fs", what, code.name if code else "?", attempt, sleep)
                if self.stop is None:
                    time.sleep(sleep)
                elif self.stop.is_set() or self.stop.wait(sleep):
                    raise errors.Stopped(
                        f"{what}: stopping; the coordinator was unreachable ({attempt} tries)"
                    ) from err
                delay = min(delay * 2, self.max_s)
