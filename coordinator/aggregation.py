"""How a round's accepted updates become the new global: through the mode and its strategy, through DP-FedAvg's
noisy linear mean (privacy.dp), or from a secure round's unmasked sum (privacy.secure_aggregation).

A result that would leave the finite range or updates.max_abs_value is refused with its reason, and then
nothing is published: a stateful strategy's moments go back to where the round found them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from common.errors import InvalidArgument
from common.types import GlobalState, TrainPlan
from coordinator.config import CoordinatorConfig
from coordinator.dp import DpAggregation
from coordinator.metrics import CoordinatorMetrics
from coordinator.modes import Contribution, Mode
from coordinator.round_state import Admitted
from coordinator.secure_round import SecureOutcome
from coordinator.strategy import Strategy

Aggregated = tuple[GlobalState, dict[str, float], float]  # new global, figures for the log, seconds


class Aggregation:
    """One run's aggregation step."""

    def __init__(
        self,
        config: CoordinatorConfig,
        mode: Mode,
        strategy: Strategy,
        metrics: CoordinatorMetrics,
        dp: DpAggregation | None,
    ) -> None:
        self.config = config
        self.mode = mode
        self.strategy = strategy
        self.metrics = metrics
        self.dp = dp

    def updates(
        self,
        global_: GlobalState,
        inbox: Mapping[str, Admitted],
        weights: Mapping[str, float],
        plans: Mapping[str, TrainPlan],
        round_: int,
    ) -> Aggregated | str:
        """The new global from the round's accepted updates and their weights (privacy.dp: each agent weighs
        the same); the reason as a string when it is refused."""
        contributions = [
            Contribution(agent, weights[agent], admitted.update.tensors, plans[agent])
            for agent, admitted in sorted(inbox.items())
        ]

        def combine() -> tuple[GlobalState, dict[str, float]]:
            if self.dp is None:
                return self.mode.aggregate(global_, contributions, self.strategy, round_)
            new, metrics = self.dp.aggregate(self.mode, global_, contributions, plans, self.strategy, round_)
            return new, {**metrics, "updates": float(len(contributions))}

        return self._guarded(combine)

    def secure_sum(
        self, global_: GlobalState, outcome: SecureOutcome, plans: Mapping[str, TrainPlan], round_: int
    ) -> Aggregated | str:
        """The new global from a secure round's unmasked sum. The denominators count every planned agent under
        privacy.dp (a missing one is a zero change), else the agents in the sum."""
        layout = self.mode.linear_layout(global_, plans, None if self.dp is not None else outcome.survivors)

        def combine() -> tuple[GlobalState, dict[str, float]]:
            new, metrics = self.mode.apply_linear(global_, outcome.sums, layout, self.strategy, round_)
            metrics["updates"] = float(len(outcome.survivors))
            if self.dp is not None:
                z = self.dp.secure_round(outcome.sharers, len(outcome.survivors))
                metrics["dp_noise_std"] = z * self.config.privacy.dp.clip_norm
            return new, metrics

        return self._guarded(combine)

    def _guarded(self, combine: Callable[[], tuple[GlobalState, dict[str, float]]]) -> Aggregated | str:
        start = time.perf_counter()
        kept = self.strategy.state_dict()
        try:
            new_global, metrics = combine()
            self.mode.check_global(new_global, self.config.updates.max_abs_value)
        except (InvalidArgument, ArithmeticError) as err:
            self.strategy.load_state_dict(kept)
            return str(err)
        seconds = time.perf_counter() - start
        self.metrics.aggregation_duration.observe(seconds)
        return new_global, metrics, seconds
