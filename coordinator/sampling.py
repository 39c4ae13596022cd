"""Client sampling: which of the alive agents train a round (`run.sample_fraction`, `run.sample_count`).

The draw is seeded by the run seed and the round, so a resumed coordinator that sees the same agents alive
draws the same ones again, and it is uniform without replacement over the alive agents in sorted order: each
agent's chance per round is k / n, the sampling rate a differential-privacy accountant needs. Never fewer
than run.min_agents are drawn.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable


def sample_size(alive: int, fraction: float, count: int, minimum: int) -> int:
    """How many of `alive` agents train: count if set, else ceil(fraction x alive); at least minimum."""
    wanted = count if count > 0 else math.ceil(fraction * alive - 1e-9)
    return min(alive, max(wanted, minimum))


def draw(agents: Iterable[str], size: int, seed: int, round_: int) -> tuple[str, ...]:
    """`size` of the agents, drawn uniformly without replacement from a generator of (seed, round)."""
    pool = sorted(agents)
    if size >= len(pool):
        return tuple(pool)
    key = hashlib.sha256(f"fedpipe-sample|{seed}|{round_}".encode()).digest()
    return tuple(sorted(random.Random(int.from_bytes(key[:8], "big")).sample(pool, size)))


def sit_outs(agents: Iterable[str], drawn: Iterable[str]) -> dict[str, str]:
    """Each agent not drawn, with the reason it is told while it waits."""
    pool, chosen = sorted(agents), set(drawn)
    reason = f"not drawn this round ({len(chosen)} of {len(pool)} agents train)"
    return {agent: reason for agent in pool if agent not in chosen}
