"""Aggregation strategies: how a round's updates combine into the new global state.

A strategy combines per coordinate (`combine`: tensors and weights in, one tensor out, what the Ferret mode
uses on coefficients) and, for the LoRA mode, per adapter pair (`aggregate(global, updates) -> (new global,
metrics)`, pure, testable on 3x4 tensors). State it keeps across rounds (server momentum and the like)
comes out of state_dict() and goes back with load_state_dict(), saved with every checkpoint; the strategies
here keep none.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from common.adapters import FoldedUpdate, GlobalAdapter
from common.errors import ConfigError
from coordinator.strategy.fedavg import aggregate as fedavg
from coordinator.strategy.rank_padding import aggregate as rank_padding
from coordinator.strategy.robust import coordinate_median, median_aggregate, trimmed_aggregate, trimmed_mean
from coordinator.strategy.weighted import Combine, weighted_mean

LoraAggregate = Callable[[GlobalAdapter, Sequence[FoldedUpdate]], tuple[GlobalAdapter, dict[str, float]]]

NAMES = ("rank-padding", "fedavg", "coordinate-median", "trimmed-mean")


@dataclass(frozen=True)
class Strategy:
    """One aggregation strategy; calling it aggregates LoRA updates."""

    name: str
    aggregate: LoraAggregate
    combine: Combine

    def __call__(
        self, global_: GlobalAdapter, updates: Sequence[FoldedUpdate]
    ) -> tuple[GlobalAdapter, dict[str, float]]:
        return self.aggregate(global_, updates)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors the strategy keeps across rounds (none here)."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what state_dict() gave; a stateless strategy takes only an empty state."""
        if state:
            raise ConfigError(f"strategy: {self.name} keeps no state, but the checkpoint holds {sorted(state)[:3]}")


def get_strategy(name: str, trim_fraction: float = 0.2) -> Strategy:
    """The strategy registered under name (trim_fraction for trimmed-mean); ConfigError lists the known ones."""
    trimmed = partial(trimmed_mean, fraction=trim_fraction)
    strategies = {
        "rank-padding": Strategy("rank-padding", rank_padding, weighted_mean),
        "fedavg": Strategy("fedavg", fedavg, weighted_mean),
        "coordinate-median": Strategy("coordinate-median", median_aggregate, coordinate_median),
        "trimmed-mean": Strategy("trimmed-mean", trimmed_aggregate(trim_fraction), trimmed),
    }
    try:
        return strategies[name]
    except KeyError:
        raise ConfigError(f"strategy: unknown {name!r}; choose one of {sorted(strategies)}") from None
