"""Client-level differential privacy of a run (privacy.dp): DP-FedAvg's clip, noise and budget.

Per round (McMahan et al. 2018): each update's change, in the linear layout the mode sums in, is clipped to
L2 norm C; the clipped changes are summed; Gaussian noise of standard deviation z * C is added to every
coordinate some plan trains; the noisy sum is divided per coordinate by how many plans cover it, counted
from the plans when the round opened, so an agent that does not deliver counts as a zero change, and the
denominator says nothing about who delivered. Each agent weighs the same, whatever it trained on: a weight
by sample count would let one agent's data move the mean by more than C / n.

The guarantee is for the published globals: a skipped round publishes nothing and costs nothing. The
accountant (coordinator.privacy) composes one subsampled Gaussian per published round at that round's
sampling rate (drawn agents / alive agents). The noise comes from the operating system's entropy, never
from the run seed: a seed anyone can read would let them subtract it.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from common.errors import ConfigError
from common.linear import clip
from coordinator import privacy

if TYPE_CHECKING:
    from common.types import GlobalState, TrainPlan
    from coordinator.config import DpSection
    from coordinator.metrics import CoordinatorMetrics
    from coordinator.modes import Contribution, Mode
    from coordinator.strategy import Strategy

log = logging.getLogger(__name__)


def add_noise(
    sums: Mapping[str, torch.Tensor], layout: Mapping[str, torch.Tensor], std: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """sums + N(0, std^2) on every coordinate the layout covers (count > 0); the others stay as they are."""
    noisy: dict[str, torch.Tensor] = {}
    for name in sorted(sums):
        value = sums[name]
        noise = torch.randn(value.shape, generator=generator, dtype=torch.float64) * std
        noisy[name] = value + torch.where(layout[name] > 0, noise, torch.zeros_like(noise))
    return noisy


def system_generator() -> torch.Generator:
    """A CPU generator seeded from the operating system's entropy."""
    return torch.Generator().manual_seed(secrets.randbits(63))


@dataclass
class Ledger:
    """The published rounds' (sampling rate, noise multiplier), and epsilon over them."""

    delta: float
    events: list[tuple[float, float]]

    def epsilon(self, extra: Sequence[tuple[float, float]] = ()) -> float:
        """Epsilon at delta over the recorded rounds (and `extra` ones not yet published)."""
        return privacy.epsilon_of([*self.events, *extra], self.delta)


class DpAggregation:
    """One run's DP-FedAvg: aggregates a round through the mode's linear layout, keeps the ledger."""

    def __init__(
        self,
        section: DpSection,
        rounds: int,
        metrics: CoordinatorMetrics,
        generator: torch.Generator | None = None,
    ) -> None:
        self.section = section
        self.rounds = rounds
        self.metrics = metrics
        self.generator = generator or system_generator()
        self.noise_multiplier = section.noise_multiplier
        self.round_noise = section.noise_multiplier  # the noise multiplier the last aggregated round had
        self.ledger = Ledger(section.delta, [])
        self.prepared = False  # prepare() ran in this process

    # ------------------------------------------------------------------ the budget

    def prepare(self, sampling_rate: float) -> None:
        """Before the first round this process trains: derive the noise multiplier from privacy.dp.target_epsilon
        when none is set, for run.rounds rounds at this sampling rate (a resumed run keeps the one it had)."""
        self.prepared = True
        section = self.section
        if self.noise_multiplier == 0:
            self.noise_multiplier = privacy.noise_for(section.target_epsilon, sampling_rate, self.rounds, section.delta)
            log.info(
                "privacy.dp: noise multiplier %.4g derived for epsilon %g at delta %g over %d rounds at sampling "
                "rate %.4g",
                self.noise_multiplier,
                section.target_epsilon,
                section.delta,
                self.rounds,
                sampling_rate,
            )
        self.round_noise = self.noise_multiplier
        self.metrics.dp_noise_multiplier.set(self.noise_multiplier)
        self.metrics.dp_epsilon.set(self.ledger.epsilon())
        log.info(
            "privacy.dp: updates clipped to %g, noise %.4g x that on the sum, delta %g%s",
            section.clip_norm,
            self.noise_multiplier,
            section.delta,
            f", budget epsilon {section.target_epsilon:g}" if section.target_epsilon else "",
        )

    def over_budget(self, sampling_rate: float) -> str | None:
        """Why one more published round at this sampling rate would spend more than the budget; None if not."""
        target = self.section.target_epsilon
        if not target:
            return None
        after = self.ledger.epsilon([(sampling_rate, self.noise_multiplier)])
        if after <= target * (1 + 1e-9):
            return None
        return (
            f"privacy budget: one more round would bring epsilon to {after:.4g}, over privacy.dp.target_epsilon "
            f"{target:g} (now {self.ledger.epsilon():.4g} after {len(self.ledger.events)} rounds)"
        )

    def published(self, sampling_rate: float) -> float:
        """Record a published round; epsilon after it."""
        self.ledger.events.append((sampling_rate, self.round_noise))
        epsilon = self.ledger.epsilon()
        self.metrics.dp_epsilon.set(epsilon)
        return epsilon

    # ------------------------------------------------------------------ one round

    def aggregate(
        self,
        mode: Mode,
        global_: GlobalState,
        contributions: Sequence[Contribution],
        plans: Mapping[str, TrainPlan],
        strategy: Strategy,
        round_: int,
    ) -> tuple[GlobalState, dict[str, float]]:
        """The round's noisy mean through the mode's linear layout (denominators from every planned agent)."""
        bound = self.section.clip_norm
        layout = mode.linear_layout(global_, plans)
        sums = {name: torch.zeros_like(count) for name, count in layout.items()}
        clipped = 0
        for contribution in contributions:
            terms, total = clip(mode.linear_terms(global_, contribution, layout), bound)
            if total > bound:
                clipped += 1
                self.metrics.dp_updates_clipped.labels(contribution.agent_id).inc()
                log.info("round %d: %s's change norm %.4g clipped to %g", round_, contribution.agent_id, total, bound)
            for name, value in terms.items():
                sums[name] += value
        std = self.noise_multiplier * bound
        self.round_noise = self.noise_multiplier
        noisy = add_noise(sums, layout, std, self.generator)
        new_global, metrics = mode.apply_linear(global_, noisy, layout, strategy, round_)
        return new_global, {**metrics, "dp_clipped": float(clipped), "dp_noise_std": std}

    def agent_noise(self, sharers: int) -> float:
        """Under secure aggregation the agents add the noise: each its share, z C / sqrt(n) per coordinate, so
        that n of them add z C."""
        return self.noise_multiplier * self.section.clip_norm / math.sqrt(max(sharers, 1))

    def secure_round(self, sharers: int, survivors: int) -> float:
        """A secure round's noise as added: survivors of the sharers' shares, z sqrt(m / n) (what the ledger
        records for it); returns that multiplier."""
        self.round_noise = self.noise_multiplier * math.sqrt(survivors / max(sharers, 1))
        if survivors < sharers:
            log.warning(
                "privacy.dp: %d of the %d agents that shared sent no masked update, so the round's noise is z %.4g, "
                "not %.4g; the ledger counts what was added",
                sharers - survivors,
                sharers,
                self.round_noise,
                self.noise_multiplier,
            )
        return self.round_noise

    # ------------------------------------------------------------------ checkpoints and reports

    def state(self) -> dict[str, Any]:
        """What a resumed run needs: the noise multiplier (derived or set) and the published rounds."""
        return {"noise_multiplier": self.noise_multiplier, "events": [list(e) for e in self.ledger.events]}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore what state() gave, so a resumed run keeps its noise and its spent budget."""
        if not state:
            raise ConfigError(
                "privacy.dp: the run directory holds a run without differential privacy; use another run.run_dir"
            )
        self.noise_multiplier = self.round_noise = float(state["noise_multiplier"])
        self.ledger.events = [(float(q), float(z)) for q, z in state["events"]]

    def summary(self) -> dict[str, Any]:
        """The guarantee the published globals carry, for summary.json."""
        return {
            "epsilon": self.ledger.epsilon(),
            "delta": self.section.delta,
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.section.clip_norm,
            "rounds": len(self.ledger.events),
            "sampling_rates": sorted({q for q, _ in self.ledger.events}),
            "target_epsilon": self.section.target_epsilon or None,
            "accountant": "dp-accounting RDP, Poisson-subsampled Gaussian",
        }

    def metadata(self) -> dict[str, str]:
        """The guarantee as safetensors metadata of every adapter the run writes."""
        return {
            "fedpipe_dp_epsilon": f"{self.ledger.epsilon():.6g}",
            "fedpipe_dp_delta": f"{self.section.delta:g}",
            "fedpipe_dp_noise_multiplier": f"{self.noise_multiplier:.6g}",
            "fedpipe_dp_clip_norm": f"{self.section.clip_norm:g}",
            "fedpipe_dp_rounds": str(len(self.ledger.events)),
        }
