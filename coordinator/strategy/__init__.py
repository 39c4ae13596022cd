"""Aggregation strategies: pure functions (global, updates) -> (new global, metrics)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from common.adapters import FoldedUpdate, GlobalAdapter
from common.errors import ConfigError
from coordinator.strategy.fedavg import aggregate as fedavg
from coordinator.strategy.rank_padding import aggregate as rank_padding

Strategy = Callable[[GlobalAdapter, Sequence[FoldedUpdate]], tuple[GlobalAdapter, dict[str, float]]]

STRATEGIES: dict[str, Strategy] = {"rank-padding": rank_padding, "fedavg": fedavg}


def get_strategy(name: str) -> Strategy:
    """The strategy registered under name; ConfigError lists the known ones otherwise."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ConfigError(f"strategy: unknown {name!r}; choose one of {sorted(STRATEGIES)}") from None
