"""Aggregation strategies: how a round's updates combine into the new global state.

A strategy combines per coordinate (`combine`: tensors and weights in, one tensor out, what the Ferret mode
uses on coefficients) and, for the LoRA mode, per adapter pair (`aggregate(global, updates) -> (new global,
metrics)`, pure, testable on 3x4 tensors). For unequal ranks: `rank-padding` (exact FedAvg of the changes in
product space, the default), `flexlora`, `hetlora` and the per-slot baseline `slot-average`. State it keeps
across rounds (server momentum and the like) comes out of state_dict() and goes back with load_state_dict(),
saved with every checkpoint; the strategies here keep none.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch

from common.adapters import FoldedUpdate, GlobalAdapter
from common.errors import ConfigError
from coordinator.strategy.exact import aggregate as exact
from coordinator.strategy.exact import flexlora
from coordinator.strategy.fedavg import aggregate as fedavg
from coordinator.strategy.hetlora import aggregate as hetlora
from coordinator.strategy.robust import coordinate_median, median_aggregate, trimmed_aggregate, trimmed_mean
from coordinator.strategy.server_opt import ServerSettings, optimize, trained_ranks
from coordinator.strategy.slot_average import aggregate as slot_average
from coordinator.strategy.weighted import Combine, weighted_mean

LoraAggregate = Callable[[GlobalAdapter, Sequence[FoldedUpdate]], tuple[GlobalAdapter, dict[str, float]]]

WHOLE_RANK = 1 << 30  # a global rank no module reaches: nothing truncated
NAMES = ("rank-padding", "slot-average", "flexlora", "hetlora", "fedavg", "coordinate-median", "trimmed-mean")


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

    def step(
        self, global_: GlobalAdapter, target: GlobalAdapter, ranks: Mapping[str, int]
    ) -> tuple[GlobalAdapter, dict[str, float]]:
        """The new global from an averaged target computed elsewhere (the linear path of privacy.dp): the target
        itself (a server optimizer steps towards it, truncating to `ranks`)."""
        return target, {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors the strategy keeps across rounds (none here)."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what state_dict() gave; a stateless strategy takes only an empty state."""
        if state:
            raise ConfigError(f"strategy: {self.name} keeps no state, but the checkpoint holds {sorted(state)[:3]}")


@dataclass(frozen=True)
class ServerOptimized(Strategy):
    """A strategy whose untruncated result is the target of a server optimizer (strategy/server_opt.py); the
    optimizer's moments are its state."""

    settings: ServerSettings
    moments: dict[str, torch.Tensor] = field(default_factory=dict)

    def __call__(
        self, global_: GlobalAdapter, updates: Sequence[FoldedUpdate]
    ) -> tuple[GlobalAdapter, dict[str, float]]:
        target, metrics = self.aggregate(global_, updates)
        new, stepped = self.step(global_, target, trained_ranks(updates))
        return new, {**metrics, **stepped}

    def step(
        self, global_: GlobalAdapter, target: GlobalAdapter, ranks: Mapping[str, int]
    ) -> tuple[GlobalAdapter, dict[str, float]]:
        """The optimizer's step from the global towards the target (moments updated in place)."""
        return optimize(self.settings, self.moments, global_, target, ranks)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The moments, by m::<key> and v::<key>."""
        return dict(self.moments)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """The moments a checkpoint saved (replacing the current ones)."""
        unknown = sorted(key for key in state if not key.startswith(("m::", "v::")))
        if unknown:
            raise ConfigError(f"strategy: {self.name} keeps moments (m::, v::), the checkpoint holds {unknown[:3]}")
        self.moments.clear()
        self.moments.update({key: value.to(torch.float64) for key, value in state.items()})


def get_strategy(
    name: str, trim_fraction: float = 0.2, global_rank: int = 0, server: ServerSettings | None = None
) -> Strategy:
    """The strategy registered under name (trim_fraction for trimmed-mean, global_rank for the SVD-ordered
    ones, 0 = the largest rank in play), under a server optimizer when `server` is given; ConfigError lists
    the known ones."""
    if server is not None:
        # The optimizer needs the whole averaged change, so the base strategy keeps every component; the
        # optimizer truncates after its step.
        base = get_strategy(name, trim_fraction, WHOLE_RANK)
        return ServerOptimized(f"{server.kind}({name})", base.aggregate, base.combine, server)
    trimmed = partial(trimmed_mean, fraction=trim_fraction)
    strategies = {
        "rank-padding": Strategy("rank-padding", partial(exact, global_rank=global_rank), weighted_mean),
        "slot-average": Strategy("slot-average", slot_average, weighted_mean),
        "flexlora": Strategy("flexlora", partial(flexlora, global_rank=global_rank), weighted_mean),
        "hetlora": Strategy("hetlora", hetlora, weighted_mean),
        "fedavg": Strategy("fedavg", fedavg, weighted_mean),
        "coordinate-median": Strategy("coordinate-median", median_aggregate, coordinate_median),
        "trimmed-mean": Strategy("trimmed-mean", trimmed_aggregate(trim_fraction), trimmed),
    }
    try:
        return strategies[name]
    except KeyError:
        raise ConfigError(f"strategy: unknown {name!r}; choose one of {sorted(strategies)}") from None
