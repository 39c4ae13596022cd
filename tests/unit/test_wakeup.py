"""servicer.Wakeup: rings from any thread wake the coroutines waiting on the event they took, and bursts
coalesce into one wake on the loop."""

from __future__ import annotations

import asyncio
import threading
import time

from coordinator.servicer import Wakeup


def test_a_ring_from_another_thread_wakes_every_waiter_at_once() -> None:
    async def main() -> tuple[float, int]:
        wakeup = Wakeup(asyncio.get_running_loop())
        seen = wakeup.event
        start = time.monotonic()
        waiters = [asyncio.ensure_future(wakeup.wait(seen, 10.0)) for _ in range(100)]
        await asyncio.sleep(0.05)
        threading.Thread(target=wakeup.ring).start()
        await asyncio.gather(*waiters)
        return time.monotonic() - start, sum(w.done() for w in waiters)

    took, done = asyncio.run(main())
    assert done == 100
    assert took < 2.0  # woken by the ring, not by the 10 s timeout


def test_a_waiter_that_took_the_event_before_a_ring_is_woken_even_if_it_waits_after_it() -> None:
    async def main() -> float:
        wakeup = Wakeup(asyncio.get_running_loop())
        seen = wakeup.event  # a poll looked, found nothing...
        wakeup.ring()  # ...a change lands before it waits...
        await asyncio.sleep(0.01)
        start = time.monotonic()
        await wakeup.wait(seen, 10.0)  # ...so its wait returns at once
        return time.monotonic() - start

    assert asyncio.run(main()) < 1.0


def test_bursts_of_rings_coalesce_and_a_fresh_event_waits_for_the_next() -> None:
    async def main() -> tuple[int, bool, bool]:
        loop = asyncio.get_running_loop()
        wakeup = Wakeup(loop)
        events = []
        original = wakeup._wake

        def counted() -> None:
            events.append(1)
            original()

        wakeup._wake = counted  # type: ignore[method-assign]
        first = wakeup.event
        for _ in range(1000):
            wakeup.ring()
        await asyncio.sleep(0.05)
        fresh = wakeup.event
        await wakeup.wait(fresh, 0.05)  # nothing rang since: times out
        return len(events), first.is_set(), fresh.is_set()

    wakes, first_set, fresh_set = asyncio.run(main())
    assert wakes == 1
    assert first_set and not fresh_set
