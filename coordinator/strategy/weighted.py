"""Small arithmetic shared by the strategies."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from common.adapters import FoldedUpdate, GlobalAdapter, LoraPair
from coordinator.strategy.lowrank import energy

Combine = Callable[[Sequence[torch.Tensor], Sequence[float]], torch.Tensor]  # tensors and weights -> one tensor


def total_weight(updates: Sequence[FoldedUpdate]) -> float:
    """Sum of update weights; ValueError when there is nothing to average or a weight is negative."""
    if not updates:
        raise ValueError("no updates to aggregate")
    negative = [update.agent_id for update in updates if update.weight < 0]
    if negative:
        raise ValueError(f"negative weight (samples) from {negative[:3]}")
    total = sum(update.weight for update in updates)
    if not total > 0:
        raise ValueError("updates carry no samples (total weight 0)")
    return float(total)


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i x_i / sum_i w_i, accumulated in float64 so the order of agents does not matter."""
    total = float(sum(weights))
    acc = torch.zeros_like(tensors[0], dtype=torch.float64)
    for tensor, weight in zip(tensors, weights, strict=True):
        acc += tensor.to(torch.float64) * weight
    return (acc / total).to(tensors[0].dtype)


def average_heads(
    current: Mapping[str, torch.Tensor], updates: Sequence[FoldedUpdate], combine: Combine = weighted_mean
) -> dict[str, torch.Tensor]:
    """Per head tensor, the combination (weighted mean by default) over the updates that carry it; others keep
    their value."""
    heads = dict(current)
    names = {name for update in updates for name in update.heads}
    for name in sorted(names):
        holders = [update for update in updates if name in update.heads]
        heads[name] = combine([u.heads[name] for u in holders], [u.weight for u in holders])
    return heads


def update_norm(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of the change between two tensor maps over their common names."""
    squared = 0.0
    for name, value in after.items():
        if name in before and before[name].shape == value.shape:
            squared += float((value.double() - before[name].double()).pow(2).sum())
    return float(squared**0.5)  # float ** float is Any to mypy


def delta_norm(before: GlobalAdapter, after: GlobalAdapter) -> float:
    """Norm of the change in dW (factored, comparable across ranks) and heads."""
    squared = 0.0
    for module, pair in after.lora.items():
        old = before.lora.get(module)
        if old is None:
            squared += energy([pair.b], [pair.a])
        else:
            squared += energy([pair.b, -old.b], [pair.a, old.a])
    return float((squared + update_norm(before.heads, after.heads) ** 2) ** 0.5)


@dataclass(frozen=True)
class ModuleRound:
    """A round's updates as the LoRA strategies read them: the total samples, the updates with a say (a
    zero-sample update has none, and kept in alone it could cover a slot or head and divide 0 by 0), and per
    module, in name order, the updates that trained it."""

    total: float
    updates: list[FoldedUpdate]
    holders: dict[str, list[FoldedUpdate]]

    def pairs(self, module: str) -> list[LoraPair]:
        return [u.lora[module] for u in self.holders[module]]

    def weights(self, module: str) -> list[float]:
        return [u.weight for u in self.holders[module]]


def by_module(updates: Sequence[FoldedUpdate]) -> ModuleRound:
    """The round's updates grouped by module; ValueError as total_weight when there is nothing to average."""
    total = total_weight(updates)
    kept = [update for update in updates if update.weight > 0]
    modules = sorted({module for update in kept for module in update.lora})
    return ModuleRound(total, kept, {m: [u for u in kept if m in u.lora] for m in modules})


def assemble(
    global_: GlobalAdapter, round_: ModuleRound, lora: Mapping[str, LoraPair], combine: Combine = weighted_mean
) -> tuple[GlobalAdapter, dict[str, float]]:
    """The new global (the new pairs over the old, heads combined over their holders) and the figures every
    LoRA strategy reports for a round; modules nobody trained keep their value."""
    heads = average_heads(global_.heads, round_.updates, combine)
    new = GlobalAdapter(round=global_.round + 1, lora={**global_.lora, **lora}, heads=heads)
    return new, {
        "updates": float(len(round_.updates)),
        "samples": round_.total,
        "modules": float(len(round_.holders)),
        "max_rank": float(max((pair.rank for pair in new.lora.values()), default=0)),
        "delta_norm": delta_norm(global_, new),
    }
