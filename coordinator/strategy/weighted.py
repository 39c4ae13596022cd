"""Small arithmetic shared by the strategies."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from common.adapters import FoldedUpdate, GlobalAdapter
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


def round_metrics(
    before: GlobalAdapter, after: GlobalAdapter, updates: int, samples: float, modules: int
) -> dict[str, float]:
    """The figures every LoRA strategy reports for a round."""
    return {
        "updates": float(updates),
        "samples": samples,
        "modules": float(modules),
        "max_rank": float(max((pair.rank for pair in after.lora.values()), default=0)),
        "delta_norm": delta_norm(before, after),
    }
