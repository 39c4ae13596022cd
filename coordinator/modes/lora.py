"""The LoRA training mode: agents train low-rank adapters (rank padding across agents) and heads in full.

Everything the coordinator does that depends on what an upload holds goes through this object: the tensors
a plan asks for, their checks, the change norm, the global's broadcast to one plan, and folding an upload
for the aggregation strategy (common.adapters holds the arithmetic).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch

from common.adapters import (
    FoldedUpdate,
    GlobalAdapter,
    broadcast_tensors,
    change_norms,
    check_tensors,
    check_values,
    expected_tensors,
    fold_update,
    init_global,
    scale_change,
    with_modules,
)
from common.types import ModelSpec, TensorInfo, TrainPlan


class LoraMode:
    """LoRA adapters, folded (alpha / r in B) on the coordinator, truncated to each agent's ranks."""

    name = "lora"

    def expected(self, plan: TrainPlan, spec: ModelSpec) -> list[TensorInfo]:
        """The exact tensors an upload for this plan carries."""
        return expected_tensors(plan, spec)

    def check(self, tensors: Mapping[str, torch.Tensor], expected: list[TensorInfo]) -> None:
        """Names, shapes and dtypes of an upload's tensors (InvalidArgument naming the first off)."""
        check_tensors(tensors, expected, finite=False)

    def check_values(self, tensors: Mapping[str, torch.Tensor], bound: float) -> None:
        """Every value of an upload finite and within bound (0: finiteness only)."""
        check_values(tensors, bound)

    def check_global(self, global_: GlobalAdapter, bound: float) -> None:
        """A global about to be published: every value finite and within bound (InvalidArgument otherwise)."""
        named = {f"{m}.lora_A": p.a for m, p in global_.lora.items()}
        named.update({f"{m}.lora_B": p.b for m, p in global_.lora.items()})
        named.update(global_.heads)
        check_values(named, bound, "global")

    def broadcast(self, global_: GlobalAdapter, plan: TrainPlan, spec: ModelSpec) -> dict[str, torch.Tensor]:
        """The global as this plan loads it."""
        return broadcast_tensors(global_, plan, spec)

    def change_norms(self, tensors: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Per tensor, the L2 norm of an upload's change to what it was sent."""
        return change_norms(tensors, sent)

    def scale_change(
        self, tensors: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor], factor: float | Mapping[str, float]
    ) -> dict[str, torch.Tensor]:
        """The upload with its change scaled by factor, one for all tensors or one per tensor (clipping)."""
        return scale_change(tensors, sent, factor)

    def fold(self, agent_id: str, weight: float, tensors: Mapping[str, torch.Tensor], plan: TrainPlan) -> FoldedUpdate:
        """An upload in the strategies' folded convention, with its aggregation weight; InvalidArgument when
        folding (alpha / r into B) left the finite range."""
        folded = fold_update(agent_id, weight, tensors, plan)
        check_values({f"{m}.lora_B": pair.b for m, pair in folded.lora.items()}, 0.0, f"{agent_id}'s folded update")
        return folded

    def initial(self, spec: ModelSpec, plans: Mapping[str, TrainPlan], seed: int) -> GlobalAdapter:
        """The round-0 global over the union of the plans' modules at each one's largest rank."""
        return init_global(spec, widest(plans), seed)

    def extend(self, global_: GlobalAdapter, plans: Mapping[str, TrainPlan], spec: ModelSpec) -> GlobalAdapter:
        """The global plus a fresh pair (dW = 0) for every planned module it lacks."""
        return with_modules(global_, widest(plans).rank_pattern, spec)


def widest(plans: Mapping[str, TrainPlan]) -> TrainPlan:
    """A plan over the union of modules at each module's largest planned rank (the round-0 global's layout)."""
    first = next(iter(plans.values()))
    ranks: dict[str, int] = {}
    for plan in plans.values():
        for module, rank in plan.rank_pattern.items():
            ranks[module] = max(rank, ranks.get(module, 0))
    return replace(first, target_modules=tuple(ranks), rank_pattern=ranks)
