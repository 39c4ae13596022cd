"""Admission control at the transport edge, before any handler reads a request.

Every call is tied to its caller (the certificate's common name under mTLS, the token's agent under token
auth) and refused before its request is read when the caller has no credentials (token mode; only the
health Check is open to anonymous callers, so probes work), already holds server.max_calls_per_agent calls
or streams, or calls faster than server.calls_per_second_per_agent. Health Watch streams are limited over
all callers. A call's slot is given back when the RPC ends, however it ends (a client that hangs up
included), so one agent can never hold more than its share of the server's worker threads. The
interceptor runs in the asyncio server and wraps plain handlers (run on the worker threads) and coroutine
handlers alike. Plaintext
(--insecure) has no identities: nothing is limited per caller there.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import grpc

from common.security import ServerSecurity
from coordinator.config import ServerSection
from coordinator.metrics import CoordinatorMetrics

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
ANONYMOUS = "(anonymous)"


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class CallLimits:
    """Per-caller open calls and call rate, and open health watches; thread-safe."""

    def __init__(self, section: ServerSection, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_open = section.max_calls_per_agent
        self.rate = section.calls_per_second_per_agent
        self.burst = 2 * section.calls_per_second_per_agent
        self.max_watches = section.max_health_watches
        self.clock = clock
        self.open: dict[str, int] = {}
        self.buckets: dict[str, _Bucket] = {}
        self.watches = 0
        self.lock = threading.Lock()

    def acquire(self, caller: str, watch: bool) -> tuple[str, str] | None:
        """Take a slot for a call; (reason, message) when it must be refused."""
        with self.lock:
            if watch and self.watches >= self.max_watches:
                return "watches", f"{self.watches} health watches are open (server.max_health_watches)"
            now = self.clock()
            bucket = self.buckets.setdefault(caller, _Bucket(self.burst, now))
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
            if bucket.tokens < 1:
                return "rate", f"{caller} calls faster than server.calls_per_second_per_agent ({self.rate:g}/s)"
            if self.open.get(caller, 0) >= self.max_open:
                return "limit", f"{caller} already has {self.max_open} calls open (server.max_calls_per_agent)"
            bucket.tokens -= 1
            self.open[caller] = self.open.get(caller, 0) + 1
            if watch:
                self.watches += 1
            return None

    def release(self, caller: str, watch: bool) -> None:
        """Give a call's slot back."""
        with self.lock:
            left = self.open.get(caller, 1) - 1
            if left > 0:
                self.open[caller] = left
            else:
                self.open.pop(caller, None)
            if watch:
                self.watches -= 1


class Refused(Exception):
    """Raised on entry by a wrap_handler context: the call is aborted with this status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


Around = Callable[[Any], AbstractContextManager[Any]]  # given the call's context, yields the one passed inward


class CallGuard(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Refuses a call before its handler runs (module docstring); counted in fedpipe_calls_refused_total."""

    def __init__(
        self,
        security: ServerSecurity,
        section: ServerSection,
        metrics: CoordinatorMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.security = security
        self.metrics = metrics
        self.limits = CallLimits(section, clock)

    @contextmanager
    def _admitted(self, method: str, context: Any) -> Iterator[Any]:
        """Refuse (Refused) or take a slot that is given back when the RPC ends."""
        if self.security.mode == "insecure":
            yield context
            return
        caller = self.security.identity(context)
        if caller is None:
            if method != HEALTH_CHECK:
                self.metrics.calls_refused.labels("unauthenticated").inc()
                what = "client certificate" if self.security.mode == "mtls" else "bearer token"
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, f"no valid {what}")
            caller = ANONYMOUS
        watch = method == HEALTH_WATCH
        refusal = self.limits.acquire(caller, watch)
        if refusal is not None:
            reason, message = refusal
            self.metrics.calls_refused.labels(reason).inc()
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        released = threading.Event()

        def release(*_: object) -> None:
            if not released.is_set():
                released.set()
                self.limits.release(caller, watch)

        # The slot goes back when the RPC ends (a client that hung up on a stream included), or when the
        # behaviour returns, whichever is first; sync handlers' contexts take callbacks of no argument.
        if hasattr(context, "add_done_callback"):
            context.add_done_callback(release)
        else:
            context.add_callback(release)
        try:
            yield context
        finally:
            release()

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        method = str(details.method)
        return wrap_handler(handler, lambda context: self._admitted(method, context))


def wrap_handler(handler: Any, around: Around) -> Any:
    """An RPC method handler whose behaviour (plain or asyncio, unary or streaming responses) runs inside
    around(context): a unary call while it runs, a response stream until its last message is handed to
    gRPC. around may raise Refused on entry, which aborts the call with its status."""

    def unary(inner: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        if inspect.iscoroutinefunction(inner):

            async def acall(request: Any, context: Any) -> Any:
                with ExitStack() as stack:
                    try:
                        inward = stack.enter_context(around(context))
                    except Refused as refused:
                        await context.abort(refused.code, refused.details)
                    return await inner(request, inward)

            return acall

        def call(request: Any, context: Any) -> Any:
            with ExitStack() as stack:
                try:
                    inward = stack.enter_context(around(context))
                except Refused as refused:
                    context.abort(refused.code, refused.details)
                return inner(request, inward)

        return call

    def streaming(inner: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        if inspect.iscoroutinefunction(inner):  # an asyncio handler that writes its responses to the context
            return unary(inner)
        if inspect.isasyncgenfunction(inner):

            async def agenerate(request: Any, context: Any) -> AsyncIterator[Any]:
                with ExitStack() as stack:
                    try:
                        inward = stack.enter_context(around(context))
                    except Refused as refused:
                        await context.abort(refused.code, refused.details)
                    async for item in inner(request, inward):
                        yield item

            return agenerate

        def generate(request: Any, context: Any) -> Iterator[Any]:
            with ExitStack() as stack:
                try:
                    inward = stack.enter_context(around(context))
                except Refused as refused:
                    context.abort(refused.code, refused.details)
                yield from inner(request, inward)

        return generate

    if handler.unary_unary is not None:
        return handler._replace(unary_unary=unary(handler.unary_unary))
    if handler.stream_unary is not None:
        return handler._replace(stream_unary=unary(handler.stream_unary))
    if handler.unary_stream is not None:
        return handler._replace(unary_stream=streaming(handler.unary_stream))
    if handler.stream_stream is not None:
        return handler._replace(stream_stream=streaming(handler.stream_stream))
    return handler
