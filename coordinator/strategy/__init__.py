"""Aggregation strategies: pure functions (global, updates) -> (new global, metrics)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from common.adapters import FoldedUpdate, GlobalAdapter
from common.errors import ConfigError
from coordinator.strategy.fedavg import aggregate as fedavg
from coordinator.strategy.rank_padding import aggregate as rank_padding
from coordinator.strategy.robust import median_aggregate, trimmed_aggregate

Strategy = Callable[[GlobalAdapter, Sequence[FoldedUpdate]], tuple[GlobalAdapter, dict[str, float]]]

NAMES = ("rank-padding", "fedavg", "coordinate-median", "trimmed-mean")


def get_strategy(name: str, trim_fraction: float = 0.2) -> Strategy:
    """The strategy registered under name (trim_fraction for trimmed-mean); ConfigError lists the known ones."""
    strategies: dict[str, Strategy] = {
        "rank-padding": rank_padding,
        "fedavg": fedavg,
        "coordinate-median": median_aggregate,
        "trimmed-mean": trimmed_aggregate(trim_fraction),
    }
    try:
        return strategies[name]
    except KeyError:
        raise ConfigError(f"strategy: unknown {name!r}; choose one of {sorted(strategies)}") from None
