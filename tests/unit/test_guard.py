"""Per-caller limits of the coordinator's call guard: open calls, call rate, health watches."""

from __future__ import annotations

from coordinator.config import ServerSection
from coordinator.guard import CallLimits


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def limits(**changes: float) -> tuple[CallLimits, Clock]:
    clock = Clock()
    section = ServerSection().model_copy(
        update={"max_calls_per_agent": 3, "calls_per_second_per_agent": 5.0, **changes}
    )
    return CallLimits(section, clock), clock


def test_a_caller_holds_at_most_its_open_calls_and_gets_a_slot_back_when_one_ends() -> None:
    # Prepare
    guard, _ = limits()

    # Execute
    taken = [guard.acquire("mallory", watch=False) for _ in range(3)]
    fourth = guard.acquire("mallory", watch=False)
    other = guard.acquire("honest", watch=False)
    guard.release("mallory", watch=False)
    after = guard.acquire("mallory", watch=False)

    # Assert: the fourth is refused, another agent is not affected, a slot comes back
    assert taken == [None, None, None]
    assert fourth is not None and fourth[0] == "limit" and "mallory already has 3 calls open" in fourth[1]
    assert other is None and after is None


def test_a_caller_faster_than_its_rate_is_refused_until_the_bucket_refills() -> None:
    # Prepare: 5 calls/s, bursts of 10; every call ends at once
    guard, clock = limits(max_calls_per_agent=100)

    # Execute
    burst = []
    for _ in range(11):
        burst.append(guard.acquire("mallory", watch=False))
        guard.release("mallory", watch=False)
    clock.now += 0.2  # one token back
    refilled = guard.acquire("mallory", watch=False)

    # Assert
    assert burst[:10] == [None] * 10
    assert burst[10] is not None and burst[10][0] == "rate"
    assert refilled is None


def test_health_watches_are_limited_over_all_callers() -> None:
    # Prepare
    guard, _ = limits(max_health_watches=2)

    # Execute
    first, second = guard.acquire("a", watch=True), guard.acquire("b", watch=True)
    third = guard.acquire("c", watch=True)
    plain = guard.acquire("c", watch=False)
    guard.release("a", watch=True)
    again = guard.acquire("c", watch=True)

    # Assert
    assert first is None and second is None and plain is None and again is None
    assert third is not None and third[0] == "watches"
