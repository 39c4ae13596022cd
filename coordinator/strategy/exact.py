"""Exact rank padding (`rank-padding`, the default): the sample-weighted FedAvg of the agents' changes in
product space, kept SVD-ordered at a global rank.

Per module, over the agents that trained it with normalised weights w_i: agent i was sent the global
G = B_g A_g truncated to its rank, G_i = B_g[:, :r_i] A_g[:r_i] (padding beyond the global rank has B = 0),
and returned P_i = B_i A_i (folded, so every dW shares one scale). Its change is P_i - G_i, and

    G' = G + sum_i w_i (P_i - G_i) = B_g diag(c) A_g + sum_i w_i B_i A_i,   c_j = 1 - sum_{i: r_i > j} w_i,

so the part of G that a low-rank agent could not hold is kept rather than averaged away. G' is a factored
sum (coordinator/strategy/lowrank.py): re-factored by SVD and truncated to the module's global rank (at
least its current rank and the largest rank trained this round, or `aggregation.global_rank`), so the
broadcast's leading r_i components are the best rank-r_i approximation of G'. What the truncation drops is
reported as a share of the round's update energy ||G' - G||^2, which it never exceeds (G itself is a
candidate of that rank).

`flexlora` (Bai et al. 2024) differs in one term: G' = SVD_R(sum_i w_i P_i), the weighted mean of the full
products, so what an agent was not sent is lost. Heads are sample-weighted means in both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from common.adapters import FoldedUpdate, GlobalAdapter, LoraPair
from coordinator.strategy.lowrank import Refactored, energy, inner, refactor, stack
from coordinator.strategy.weighted import assemble, by_module


@dataclass(frozen=True)
class ModuleResult:
    """One module's new pair, and the energies of its update and of what truncation dropped."""

    refactored: Refactored
    update_energy: float


def target_rank(current: LoraPair | None, pairs: Sequence[LoraPair], global_rank: int) -> int:
    """The rank the new global keeps: global_rank when set, else the largest of the current and trained."""
    if global_rank > 0:
        return global_rank
    return max([pair.rank for pair in pairs] + ([current.rank] if current is not None else []))


def _result(
    refactored: Refactored, bs: list[torch.Tensor], as_: list[torch.Tensor], current: LoraPair | None
) -> ModuleResult:
    # ||G' - G||^2 = ||G'||^2 - 2 <G', G> + ||G||^2, with ||G'||^2 the sum of the squared singular values:
    # no K x K Gram of the stacked factors.
    total = float(refactored.singular_values.pow(2).sum())
    if current is None:
        return ModuleResult(refactored, total)
    own = energy([current.b], [current.a])
    return ModuleResult(refactored, max(total - 2 * inner(bs, as_, current) + own, 0.0))


def exact_module(
    current: LoraPair | None, pairs: Sequence[LoraPair], weights: Sequence[float], global_rank: int = 0
) -> ModuleResult:
    """G + sum_i w_i (P_i - G_i) for one module, SVD-ordered at its target rank."""
    total = float(sum(weights))
    norm = [w / total for w in weights]
    bs = [w * pair.b.to(torch.float64) for pair, w in zip(pairs, norm, strict=True)]
    as_ = [pair.a for pair in pairs]
    if current is not None:
        # c_j = 1 - (weight of the agents that were sent slot j): the part of G their changes replace.
        sent = torch.zeros(current.rank, dtype=torch.float64)
        for pair, w in zip(pairs, norm, strict=True):
            sent[: min(pair.rank, current.rank)] += w
        bs.append(current.b.to(torch.float64) * (1.0 - sent))
        as_.append(current.a)
    b, a = stack(bs, as_)  # once: the refactoring and the energy both read the stacks
    return _result(refactor([b], [a], target_rank(current, pairs, global_rank)), [b], [a], current)


def flexlora_module(
    current: LoraPair | None, pairs: Sequence[LoraPair], weights: Sequence[float], global_rank: int = 0
) -> ModuleResult:
    """SVD of sum_i w_i P_i at the target rank (FlexLoRA)."""
    total = float(sum(weights))
    bs = [(w / total) * pair.b.to(torch.float64) for pair, w in zip(pairs, weights, strict=True)]
    b, a = stack(bs, [pair.a for pair in pairs])
    return _result(refactor([b], [a], target_rank(current, pairs, global_rank)), [b], [a], current)


def _aggregate(
    global_: GlobalAdapter, updates: Sequence[FoldedUpdate], global_rank: int, flex: bool
) -> tuple[GlobalAdapter, dict[str, float]]:
    round_ = by_module(updates)
    lora = {}
    dropped = 0.0
    update_energy = 0.0
    worst = 0.0
    module_fn = flexlora_module if flex else exact_module
    for module in round_.holders:
        result = module_fn(global_.lora.get(module), round_.pairs(module), round_.weights(module), global_rank)
        lora[module] = result.refactored.pair
        dropped += result.refactored.dropped_energy
        update_energy += result.update_energy
        if result.update_energy > 0:
            worst = max(worst, result.refactored.dropped_energy / result.update_energy)
    new, metrics = assemble(global_, round_, lora)
    metrics["truncated_energy_share"] = dropped / update_energy if update_energy > 0 else 0.0
    metrics["truncated_energy_share_max"] = worst
    return new, metrics


def aggregate(
    global_: GlobalAdapter, updates: Sequence[FoldedUpdate], global_rank: int = 0
) -> tuple[GlobalAdapter, dict[str, float]]:
    """Exact rank padding; modules nobody trained keep their value."""
    return _aggregate(global_, updates, global_rank, flex=False)


def flexlora(
    global_: GlobalAdapter, updates: Sequence[FoldedUpdate], global_rank: int = 0
) -> tuple[GlobalAdapter, dict[str, float]]:
    """FlexLoRA; modules nobody trained keep their value."""
    return _aggregate(global_, updates, global_rank, flex=True)
