"""Round-close screening: which of a round's admitted updates count, and with what weight.

Admission (coordinator.admission) checks each upload on its own; only at round close, with every update in
hand, can an update be compared with the round's others. Here: the relative norm bounds (reject or clip)
and the aggregation weights the coordinator stands behind.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

from common.types import GlobalState, ModelSpec, TrainPlan
from coordinator.bounds import capped, relative_bound, tensor_bounds
from coordinator.config import UpdatesSection
from coordinator.metrics import CoordinatorMetrics
from coordinator.modes import Mode
from coordinator.round_state import Admitted

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Screened:
    """The updates that count (some possibly clipped) and, per agent left out, the reason it is told."""

    kept: dict[str, Admitted]
    refused: dict[str, str]


class Screening:
    """The round-close checks of one run's updates section."""

    def __init__(
        self, updates: UpdatesSection, mode: Mode, spec: ModelSpec, metrics: CoordinatorMetrics, relative: bool = True
    ) -> None:
        self.updates = updates
        self.relative = relative  # False: no relative bounds (privacy.dp clips every update instead)
        self.mode = mode
        self.spec = spec
        self.metrics = metrics

    def screen(
        self, round_: int, inbox: Mapping[str, Admitted], plans: Mapping[str, TrainPlan], global_: GlobalState
    ) -> Screened:
        """The relative norm bounds (rounds of 3 or more updates): an update whose change norm exceeds
        updates.norm_multiple x the round's median, or whose change to one tensor exceeds that multiple of the
        tensor's median change, is left out (reject) or scaled down to the bounds (clip)."""
        updates = self.updates
        total_bound = relative_bound({a: x.norm for a, x in inbox.items()}, updates.norm_multiple)
        if total_bound is None or not self.relative:
            return Screened(dict(inbox), {})
        sizes = {name: t.numel() for x in inbox.values() for name, t in x.update.tensors.items()}
        bounds = tensor_bounds(
            {a: x.tensor_norms for a, x in inbox.items()}, updates.norm_multiple, sizes=sizes, total_bound=total_bound
        )
        kept: dict[str, Admitted] = {}
        refused: dict[str, str] = {}
        for agent, admitted in sorted(inbox.items()):
            over = {n: v / bounds[n] for n, v in admitted.tensor_norms.items() if n in bounds and v > bounds[n]}
            if admitted.norm <= total_bound and not over:
                kept[agent] = admitted
                continue
            if over:
                worst = max(over, key=over.__getitem__)
                reason = (
                    f"its change to {worst} ({admitted.tensor_norms[worst]:.4g}) exceeds {updates.norm_multiple:g} "
                    f"x the round's median for that tensor (bound {bounds[worst]:.4g})"
                )
            else:
                reason = (
                    f"its change norm {admitted.norm:.4g} exceeds {updates.norm_multiple:g} x the round's median "
                    f"({total_bound:.4g})"
                )
            if updates.norm_action == "clip":
                kept[agent] = self.clip(admitted, plans[agent], global_, bounds, total_bound)
                self.metrics.updates_clipped.labels(agent).inc()
                self.metrics.updates_screened.labels(agent, "clipped").inc()
                log.warning("round %d: update from %s clipped: %s", round_, agent, reason)
                continue
            refused[agent] = reason
            self.metrics.updates_screened.labels(agent, "rejected").inc()
            log.warning("round %d: update from %s left out: %s", round_, agent, reason)
        return Screened(kept, refused)

    def clip(
        self,
        admitted: Admitted,
        plan: TrainPlan,
        global_: GlobalState,
        bounds: Mapping[str, float],
        total_bound: float,
    ) -> Admitted:
        """The update with each tensor's change scaled down to its bound, then the whole to the total bound."""
        factors = {
            name: min(1.0, bounds[name] / norm) if name in bounds and norm > 0 else 1.0
            for name, norm in admitted.tensor_norms.items()
        }
        norms = {name: norm * factors[name] for name, norm in admitted.tensor_norms.items()}
        total = math.sqrt(sum(v * v for v in norms.values()))
        if total > total_bound:
            scale = total_bound / total
            factors = {name: f * scale for name, f in factors.items()}
            norms = {name: v * scale for name, v in norms.items()}
        tensors = self.mode.scale_change(admitted.update.tensors, global_, plan, self.spec, factors)
        return replace(
            admitted,
            update=replace(admitted.update, tensors=tensors),
            norm=math.sqrt(sum(v * v for v in norms.values())),
            tensor_norms=norms,
        )

    def weights(self, round_: int, inbox: Mapping[str, Admitted], allowed: Mapping[str, int]) -> dict[str, float]:
        """Aggregation weights the coordinator stands behind: the samples an update claims, never more than its
        plan allows on the agent's counted data (`allowed`), each at most updates.max_weight_ratio x the round's
        median."""
        claimed = {a: float(min(x.update.meta.samples, allowed.get(a, 0))) for a, x in inbox.items()}
        weights = capped(claimed, self.updates.max_weight_ratio)
        total = sum(weights.values())
        for agent, weight in weights.items():
            if weight < claimed[agent]:
                self.metrics.weights_capped.labels(agent).inc()
                log.warning(
                    "round %d: %s's weight cut from %d to %.0f samples (%g x the round's median)",
                    round_,
                    agent,
                    claimed[agent],
                    weight,
                    self.updates.max_weight_ratio,
                )
            self.metrics.agent_weight_share.labels(agent).set(weight / total if total > 0 else 0.0)
        return weights
