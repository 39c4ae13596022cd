"""RetryPolicy: backoff on retryable gRPC errors, the give-up time, and a stop request ending the wait."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from common import errors
from common.rpc import RetryPolicy


class Unavailable(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """What a call to an unreachable server raises."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection refused"


def unreachable() -> None:
    raise Unavailable()


def test_a_stop_request_ends_the_retries_at_once() -> None:
    # Prepare: a 15-minute reconnect window, and a stop request 0.3 s in
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    start = time.monotonic()

    # Execute / Assert
    with pytest.raises(errors.Stopped, match="task poll: stopping"):
        RetryPolicy(give_up_s=900.0, initial_s=0.05, max_s=0.2, stop=stop).call(unreachable, "task poll")
    assert time.monotonic() - start < 2.0


def test_without_a_stop_request_the_policy_gives_up_after_its_window() -> None:
    tries: list[int] = []

    def counted() -> None:
        tries.append(1)
        unreachable()

    with pytest.raises(errors.ServerUnavailable, match="unreachable"):
        RetryPolicy(give_up_s=0.3, initial_s=0.02, max_s=0.05, stop=threading.Event()).call(counted, "register")
    assert len(tries) > 2


def test_a_successful_call_after_retries_returns_its_value() -> None:
    outcomes = iter([Unavailable(), Unavailable(), None])

    def flaky() -> str:
        outcome = next(outcomes)
        if outcome is not None:
            raise outcome
        return "ok"

    assert RetryPolicy(give_up_s=5.0, initial_s=0.01, max_s=0.02).call(flaky, "upload") == "ok"
