"""Operator caps on an agent's memory and compute, to share a device or to emulate a weaker server.

Memory: on a GPU the cap is enforced by the CUDA caching allocator (torch.cuda.set_per_process_memory_fraction),
so an allocation beyond it raises an out-of-memory error as a smaller card would. On a CPU nothing can
enforce it (an address-space rlimit would also count torch's untouched virtual mappings), so the cap is
reported in the profile, the planner keeps the agent's configurations under it, and the measured peak
of every run is compared against it.

Compute: a duty cycle. After each piece of work the agent sleeps work * (1/share - 1), so over time it
computes for exactly `share` of the wall clock. Torch's thread count is deliberately left as configured:
FLOP/s does not scale linearly with threads (memory bandwidth, SMT, the matmul blocking change), so a
thread count cannot express "a quarter of this machine", while a measured duty cycle is exact on CPU and
GPU alike, and the profile's FLOP/s benchmark runs under the same throttle.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in a human size ("1.5GiB", "800MiB", "2GB", "1024"); ValueError says what is accepted."""
    match = _SIZE.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size: use bytes or a number with B, KB, MB, GB, TB, KiB, MiB, GiB, TiB")
    size = round(float(match.group(1)) * SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"{text!r}: a size must be at least one byte")
    return size


def format_size(size: int) -> str:
    """A byte count as MiB or GiB, for logs."""
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


class Throttle:
    """Duty-cycle throttling: sleep after work so that work takes `share` of the wall clock.

    Use `with throttle:` around a piece of work (it is timed with perf_counter), or call after_work with
    a duration measured elsewhere. Sleeps that overshoot (the OS wakes late) are credited against the next
    one, so the long-run duty cycle stays at share even for work pieces shorter than the sleep granularity.
    A share of 1.0 never sleeps. Not thread-safe: one throttle per training loop.
    """

    def __init__(
        self,
        share: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"compute share must be in (0, 1], got {share}")
        self.share = share
        self._sleep = sleep
        self._clock = clock
        self._owed = 0.0  # sleep still owed (negative: slept ahead after an overshoot)
        self._started = 0.0
        self.work_s = 0.0  # totals since construction, for tests and logs
        self.slept_s = 0.0

    @property
    def active(self) -> bool:
        """Whether this throttle ever sleeps."""
        return self.share < 1.0

    def after_work(self, seconds: float) -> float:
        """Sleep what `seconds` of work owes at this share; returns the seconds actually slept."""
        if seconds <= 0:
            return 0.0
        self.work_s += seconds
        if not self.active:
            return 0.0
        self._owed += seconds * (1.0 / self.share - 1.0)
        if self._owed <= 0:
            return 0.0
        start = self._clock()
        self._sleep(self._owed)
        slept = self._clock() - start
        self._owed -= slept
        self.slept_s += slept
        return slept

    def __enter__(self) -> Throttle:
        self._started = self._clock()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if kind is None:  # a failed step owes nothing: the error propagates at once
            self.after_work(self._clock() - self._started)


def apply_memory_cap(device: torch.device, limit_bytes: int) -> float | None:
    """Enforce a memory cap on a CUDA device; returns the allocator fraction set, None on CPU or no cap."""
    if limit_bytes <= 0:
        return None
    if device.type != "cuda":
        log.info("memory cap %s: reported and planned for; a CPU cannot enforce it", format_size(limit_bytes))
        return None
    import torch

    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, limit_bytes / total)  # a cap above the card's memory caps nothing
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    log.info("memory cap %s: %.3f of %s on %s", format_size(limit_bytes), fraction, format_size(total), device)
    return fraction


def check_peak(peak_bytes: int, limit_bytes: int, what: str) -> bool:
    """Whether a measured peak stayed under the cap (no cap: True); logs a warning when it did not."""
    if limit_bytes <= 0 or peak_bytes <= limit_bytes:
        return True
    log.warning(
        "%s: measured peak %s exceeds the memory cap %s", what, format_size(peak_bytes), format_size(limit_bytes)
    )
    return False
